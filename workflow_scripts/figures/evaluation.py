"""The workflow's figures, drawn only from the summary tables: figures (i)–(iii) of docs/reference.md#figures.

* ``probe_scores``: probe score (macro-F1 / R²) per fused embedding, mean ± sd over folds × seeds, one panel
  per dataset × task; fused methods coloured by family (spectral: cca, dcca; non-spectral; concat);
  unimodal GEX, unimodal IMG and random as horizontal reference lines.
* ``sis_heatmap``: SIS per method × task (metric), diverging colour map centred at 0, values written in.
* ``spatial_rings``: neighbour-ring probe score vs the ring's outer radius (µm), one line per embedding,
  one panel per dataset × task, error bars = sd over repeats × seeds.

Inputs are the TSVs of :mod:`workflow_scripts.evaluation.tables` (``summarise``; a long table with a ``value`` column
is summarised on the fly) and :mod:`workflow_scripts.evaluation.sis`. Output: PNG, 150 dpi.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ..io import setup_logging  # noqa: E402
from ..evaluation.tables import read_table, summarise  # noqa: E402

log = logging.getLogger(__name__)

DPI = 150
SPECTRAL = ("cca", "dcca")
CONCAT = ("concat",)
BASELINES = {"unimodal_gex": ("GEX only", "-", "#2b8a3e"), "unimodal_img": ("IMG only", "--", "#a61e4d"),
             "random": ("random", ":", "#495057")}
FAMILY_COLOURS = {"spectral": "#1c7ed6", "non-spectral": "#f08c00", "concat": "#868e96"}
FAMILY_LABELS = {"spectral": "spectral fusion (cca, dcca)", "non-spectral": "non-spectral fusion",
                 "concat": "concatenation"}
METRIC_LABEL = {"macro_f1": "macro-F1", "r2": "R²"}


def family(name: str) -> str:
    """Method family used for colouring: ``spectral`` (cca, dcca), ``concat``, ``baseline`` or ``non-spectral``."""
    if name in SPECTRAL:
        return "spectral"
    if name in CONCAT:
        return "concat"
    if name in BASELINES:
        return "baseline"
    return "non-spectral"


def as_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Return ``df`` if it already has ``mean``/``sd`` columns, else :func:`tables.summarise` of it.

    Raises ValueError when it has neither ``mean`` nor ``value``.
    """
    if {"mean", "sd"} <= set(df.columns):
        return df
    if "value" in df.columns:
        return summarise(df)
    raise ValueError(f"table has neither summary columns (mean, sd) nor a value column: {list(df.columns)}")


def _method_order(names: Sequence[str]) -> list[str]:
    rank = {"spectral": 0, "non-spectral": 1, "concat": 2}
    fused = [n for n in dict.fromkeys(names) if family(n) != "baseline"]
    return sorted(fused, key=lambda n: (rank[family(n)], fused.index(n)))


def _grid(n: int, max_cols: int = 3, w: float = 4.6, h: float = 3.6):
    ncols = min(max_cols, max(n, 1))
    nrows = math.ceil(max(n, 1) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols + 2.4, h * nrows + 0.6), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def _save(fig, out: str | Path) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    log.info("wrote %s", out)


def _panel_title(dataset: str, task: str, n_datasets: int) -> str:
    return f"{dataset}: {task}" if n_datasets > 1 else task


def plot_probe_scores(summary: pd.DataFrame, out: str | Path) -> None:
    """Figure (i): mean ± sd probe score per fused embedding and task, baselines as horizontal lines.

    ``summary``: columns ``dataset, embedding, task, metric, mean, sd`` (one row per group).
    Raises ValueError when the table is empty.
    """
    if summary.empty:
        raise ValueError("probe summary table is empty; nothing to plot")
    groups = list(summary.groupby(["dataset", "task", "metric"], sort=True))
    n_ds = summary["dataset"].nunique()
    fig, axes = _grid(len(groups))
    for ax, ((ds, task, metric), g) in zip(axes, groups):
        g = g.set_index("embedding")
        order = _method_order(list(g.index))
        x = np.arange(len(order))
        for i, m in enumerate(order):
            c = FAMILY_COLOURS[family(m)]
            ax.bar(i, g.loc[m, "mean"], color=c, alpha=0.35, width=0.7)
            ax.errorbar(i, g.loc[m, "mean"], yerr=g.loc[m, "sd"], fmt="o", color=c, capsize=3, ms=4)
        for b, (lab, ls, col) in BASELINES.items():
            if b in g.index:
                mu, sd = g.loc[b, "mean"], g.loc[b, "sd"]
                ax.axhline(mu, ls=ls, color=col, lw=1.5)
                ax.axhspan(mu - sd, mu + sd, color=col, alpha=0.08, lw=0)
        ax.set_xticks(x, order, rotation=45, ha="right")
        ax.set_xlim(-0.6, len(order) - 0.4)
        ax.set_ylabel(f"{METRIC_LABEL.get(metric, metric)} (mean ± sd)")
        ax.set_title(_panel_title(ds, task, n_ds))
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=c, alpha=0.6, label=FAMILY_LABELS[f]) for f, c in FAMILY_COLOURS.items()]
    handles += [Line2D([], [], ls=ls, color=col, label=lab) for lab, ls, col in BASELINES.values()]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle("Linear-probe scores (folds × seeds); lines: unimodal and random baselines ± sd", y=1.0)
    fig.tight_layout()
    _save(fig, out)


def plot_sis_heatmap(sis: pd.DataFrame, out: str | Path) -> None:
    """Figure (ii): SIS per method (rows) × task (metric) (columns); colour map centred at 0.

    ``sis``: the table of :mod:`workflow_scripts.evaluation.sis`. NaN cells (undefined SIS) are grey, written "n/a".
    Raises ValueError when the table is empty.
    """
    if sis.empty:
        raise ValueError("SIS table is empty; nothing to plot")
    d = sis.copy()
    multi = d["dataset"].nunique() > 1
    d["col"] = [f"{(ds + ': ') if multi else ''}{t}\n({METRIC_LABEL.get(m, m)})"
                for ds, t, m in zip(d["dataset"], d["task"], d["metric"])]
    methods = list(dict.fromkeys(d["method"]))
    cols = list(dict.fromkeys(d["col"]))
    M = d.pivot_table(index="method", columns="col", values="sis", aggfunc="first", dropna=False)
    M = M.reindex(index=methods, columns=cols)
    vals = M.to_numpy(dtype=float)
    a = np.nanmax(np.abs(vals)) if np.isfinite(vals).any() else 1.0
    a = a if a > 0 else 1.0
    fig, ax = plt.subplots(figsize=(1.5 * len(cols) + 3.0, 0.45 * len(methods) + 1.8))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#dee2e6")
    im = ax.imshow(np.ma.masked_invalid(vals), cmap=cmap, norm=TwoSlopeNorm(0.0, -a, a), aspect="auto")
    for i in range(len(methods)):
        for j in range(len(cols)):
            v = vals[i, j]
            txt = "n/a" if not np.isfinite(v) else f"{v:+.3f}"
            dark = np.isfinite(v) and abs(v) > 0.6 * a
            ax.text(j, i, txt, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(methods)), methods)
    ax.set_xlabel("task (probe metric)")
    ax.set_ylabel("embedding")
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label("SIS = (fused − best unimodal) / best unimodal")
    ax.set_title("Synergistic Information Score (mean over folds × seeds)")
    fig.tight_layout()
    _save(fig, out)


def plot_spatial_rings(summary: pd.DataFrame, out: str | Path) -> None:
    """Figure (iii): ring probe score vs ring outer radius (µm), one line per embedding, error bars = sd.

    ``summary``: columns ``dataset, embedding, task, metric, outer_um, mean, sd``.
    Raises ValueError when the table is empty.
    """
    if summary.empty:
        raise ValueError("spatial summary table is empty; nothing to plot")
    groups = list(summary.groupby(["dataset", "task", "metric"], sort=True))
    n_ds = summary["dataset"].nunique()
    fused = _method_order(list(summary["embedding"]))
    palette = plt.get_cmap("tab10")
    style = {}
    for i, m in enumerate(fused):
        style[m] = dict(color=palette(i % 10), ls="-" if family(m) != "spectral" else "-.", marker="o", lw=1.3)
    for b, (_lab, ls, col) in BASELINES.items():
        style[b] = dict(color=col, ls=ls, marker="s", lw=2.0)
    fig, axes = _grid(len(groups), max_cols=2, w=5.2, h=3.8)
    for ax, ((ds, task, metric), g) in zip(axes, groups):
        for m in [*fused, *BASELINES]:
            gm = g[g["embedding"] == m].sort_values("outer_um")
            if gm.empty:
                continue
            ax.errorbar(gm["outer_um"], gm["mean"], yerr=gm["sd"], capsize=2, ms=3.5, label=m, **style[m])
        ax.set_xlabel("ring outer radius (µm)")
        ax.set_ylabel(f"{METRIC_LABEL.get(metric, metric)} of neighbours' label")
        ax.set_title(_panel_title(ds, task, n_ds))
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], label=m, **style[m]) for m in [*fused, *BASELINES] if m in set(summary["embedding"])]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title="embedding")
    fig.suptitle("Neighbour-ring probes: predicting the neighbourhood's majority label (mean ± sd)", y=1.0)
    fig.tight_layout()
    _save(fig, out)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m workflow_scripts.figures.evaluation probe_scores --probes PROBES.tsv --out FIG.png --log LOG``;
    ``... sis_heatmap --sis SIS.tsv --out FIG.png --log LOG``;
    ``... spatial_rings --spatial SPATIAL.tsv --out FIG.png --log LOG``."""
    p = argparse.ArgumentParser(prog="python -m workflow_scripts.figures.evaluation", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("probe_scores")
    a.add_argument("--probes", required=True, help="probe summary (or long) table, TSV")
    b = sub.add_parser("sis_heatmap")
    b.add_argument("--sis", required=True, help="SIS table, TSV")
    c = sub.add_parser("spatial_rings")
    c.add_argument("--spatial", required=True, help="spatial summary (or long) table, TSV")
    for s in (a, b, c):
        s.add_argument("--out", required=True, help="output PNG")
        s.add_argument("--log", default=None)
    args = p.parse_args(argv)
    setup_logging(args.log)
    if args.cmd == "probe_scores":
        plot_probe_scores(as_summary(read_table(args.probes)), args.out)
    elif args.cmd == "sis_heatmap":
        plot_sis_heatmap(read_table(args.sis), args.out)
    else:
        plot_spatial_rings(as_summary(read_table(args.spatial)), args.out)


if __name__ == "__main__":
    main()
