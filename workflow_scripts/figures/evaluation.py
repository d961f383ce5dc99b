"""The workflow's figures, drawn only from the summary tables: figures (i)–(iii) of docs/reference.md#figures.

* ``probe_scores``: probe score (macro-F1 / R²) per fused embedding, mean over folds × seeds with its 95 %
  bootstrap interval, one panel per dataset × protocol × task; fused methods coloured by family (spectral: cca,
  dcca; non-spectral; concat); unimodal GEX, unimodal IMG and random as horizontal reference lines, each method's
  dimension-matched controls as short dashed lines (:data:`CONTROL_STYLES`, the same in every figure).
* ``sis_heatmap``: SIS per method × task (metric), one panel per protocol, diverging colour map centred at 0,
  values and intervals written in, cells whose interval excludes 0 framed.
* ``protocols``: SIS with its interval per method under each protocol, side by side, one panel per task; the best
  control's SIS as a dashed line.
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
from ..evaluation.controls import control_name, parse_control_name  # noqa: E402
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
# dimension-matched controls (workflow_scripts/evaluation/controls.py): the same colour and dash in every figure
CONTROL_STYLES = {"gex": ("random re-encoding of GEX", "#40c057", (0, (3, 1.5))),
                  "img": ("random re-encoding of IMG", "#e64980", (0, (3, 1.5))),
                  "concat": ("random re-encoding of [IMG ‖ GEX]", "#7048e8", (0, (3, 1.5)))}
PROTOCOL_ORDER = ["transductive", "inductive"]
PROTOCOL_COLOURS = {"transductive": "#1c7ed6", "inductive": "#e8590c"}


def family(name: str) -> str:
    """Method family used for colouring: ``spectral`` (cca, dcca), ``concat``, ``baseline`` (baselines and controls)
    or ``non-spectral``."""
    if parse_control_name(name) is not None:
        return "baseline"
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


def _panels(df: pd.DataFrame) -> list:
    keys = [k for k in ("dataset", "protocol", "task", "metric") if k in df.columns]
    order = {p: i for i, p in enumerate(PROTOCOL_ORDER)}
    groups = list(df.groupby(keys, sort=True))
    if "protocol" in keys:
        i = keys.index("protocol")
        groups.sort(key=lambda kv: (order.get(kv[0][i], 9), kv[0]))
    return [(dict(zip(keys, k)), g) for k, g in groups]


def _title(key: dict, n_datasets: int) -> str:
    t = _panel_title(key.get("dataset", ""), key["task"], n_datasets)
    return f"{t} · {key['protocol']}" if "protocol" in key else t


def _interval_err(mean: float, row: pd.Series) -> tuple[float, float]:
    """Asymmetric error bar: the bootstrap interval (lo, hi) when present, else ± sd."""
    if {"lo", "hi"} <= set(row.index) and np.isfinite(row["lo"]) and np.isfinite(row["hi"]):
        return max(mean - row["lo"], 0.0), max(row["hi"] - mean, 0.0)
    sd = row.get("sd", np.nan)
    return (sd, sd) if np.isfinite(sd) else (0.0, 0.0)


def control_handles() -> list:
    """Legend entries of the controls (same colour and dash in every figure)."""
    return [Line2D([], [], color=c, ls=ls, lw=2.0, label=lab) for lab, c, ls in CONTROL_STYLES.values()]


def plot_probe_scores(summary: pd.DataFrame, out: str | Path) -> None:
    """Figure (i): probe score per fused embedding, one panel per protocol and task.

    ``summary``: :func:`workflow_scripts.evaluation.tables.summarise` of the probe table (``dataset, [protocol,]
    embedding, task, metric, mean, sd`` and, when present, the bootstrap interval ``lo, hi``). Bars: mean; error
    bars: the 95 % bootstrap interval (± sd when absent); unimodal and random baselines: horizontal lines with their
    interval as a band; each method's dimension-matched controls: short dashed lines across its bar in the control
    colours. Raises ValueError when the table is empty.
    """
    if summary.empty:
        raise ValueError("probe summary table is empty; nothing to plot")
    panels = _panels(summary)
    n_ds = summary["dataset"].nunique()
    n_tasks = summary.groupby(["dataset", "task"]).ngroups
    fig, axes = _grid(len(panels), max_cols=max(1, min(n_tasks, 4)))
    has_ci = {"lo", "hi"} <= set(summary.columns)
    for ax, (key, g) in zip(axes, panels):
        g = g.set_index("embedding")
        order = _method_order([e for e in g.index if parse_control_name(e) is None])
        for i, m in enumerate(order):
            c = FAMILY_COLOURS[family(m)]
            mu = g.loc[m, "mean"]
            lo, hi = _interval_err(mu, g.loc[m])
            ax.bar(i, mu, color=c, alpha=0.35, width=0.7)
            ax.errorbar(i, mu, yerr=[[lo], [hi]], fmt="o", color=c, capsize=3, ms=4)
            for kind, (_lab, col, ls) in CONTROL_STYLES.items():
                name = control_name(kind, m)
                if name in g.index:
                    ax.hlines(g.loc[name, "mean"], i - 0.42, i + 0.42, colors=col, linestyles=ls, lw=2.0, zorder=4)
        for b, (lab, ls, col) in BASELINES.items():
            if b in g.index:
                mu = g.loc[b, "mean"]
                lo, hi = _interval_err(mu, g.loc[b])
                ax.axhline(mu, ls=ls, color=col, lw=1.5)
                ax.axhspan(mu - lo, mu + hi, color=col, alpha=0.08, lw=0)
        ax.set_xticks(np.arange(len(order)), order, rotation=45, ha="right")
        ax.set_xlim(-0.6, len(order) - 0.4)
        metric = key["metric"]
        ax.set_ylabel(f"{METRIC_LABEL.get(metric, metric)} (mean, {'95 % CI' if has_ci else '± sd'})")
        ax.set_title(_title(key, n_ds), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=c, alpha=0.6, label=FAMILY_LABELS[f]) for f, c in FAMILY_COLOURS.items()]
    handles += [Line2D([], [], ls=ls, color=col, label=lab) for lab, ls, col in BASELINES.values()]
    handles += control_handles()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    what = "95 % bootstrap intervals" if has_ci else "± sd"
    fig.suptitle(f"Linear-probe scores over folds × seeds ({what}); lines: baselines and dimension-matched controls",
                 y=1.0)
    fig.tight_layout()
    _save(fig, out)


def plot_sis_heatmap(sis: pd.DataFrame, out: str | Path) -> None:
    """Figure (ii): SIS per method (rows) × task (columns), one panel per protocol; colour map centred at 0.

    ``sis``: the table of :mod:`workflow_scripts.evaluation.sis`. Each cell: SIS and, below it, its 95 % interval;
    a black frame and ``*`` where the SIS interval excludes 0; ``†`` where the gain over the best control excludes
    0. NaN cells (undefined SIS) are grey, written "n/a". Raises ValueError when the table is empty.
    """
    if sis.empty:
        raise ValueError("SIS table is empty; nothing to plot")
    d = sis.copy()
    if "protocol" not in d.columns:
        d["protocol"] = "transductive"
    multi = d["dataset"].nunique() > 1
    d["col"] = [f"{(ds + ': ') if multi else ''}{t}\n({METRIC_LABEL.get(m, m)})"
                for ds, t, m in zip(d["dataset"], d["task"], d["metric"])]
    methods = list(dict.fromkeys(d["method"]))
    cols = list(dict.fromkeys(d["col"]))
    protocols = sorted(d["protocol"].unique(), key=lambda p: (PROTOCOL_ORDER.index(p) if p in PROTOCOL_ORDER else 9, p))
    vals_all = d["sis"].to_numpy(dtype=float)
    a = np.nanmax(np.abs(vals_all)) if np.isfinite(vals_all).any() else 1.0
    a = a if a > 0 else 1.0
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#dee2e6")
    norm = TwoSlopeNorm(0.0, -a, a)
    fig, axes = plt.subplots(1, len(protocols), squeeze=False, layout="constrained",
                             figsize=(1.9 * len(cols) * len(protocols) + 3.0, 0.62 * len(methods) + 2.4))
    im = None
    for ax, prot in zip(axes[0], protocols):
        dp = d[d["protocol"] == prot].set_index(["method", "col"])
        vals = np.full((len(methods), len(cols)), np.nan)
        for i, m in enumerate(methods):
            for j, c in enumerate(cols):
                if (m, c) in dp.index:
                    vals[i, j] = dp.loc[(m, c), "sis"]
        im = ax.imshow(np.ma.masked_invalid(vals), cmap=cmap, norm=norm, aspect="auto")
        for i, m in enumerate(methods):
            for j, c in enumerate(cols):
                v = vals[i, j]
                if (m, c) not in dp.index or not np.isfinite(v):
                    ax.text(j, i, "n/a", ha="center", va="center", fontsize=7)
                    continue
                r = dp.loc[(m, c)]
                star = "*" if _true(r.get("sis_excludes_0")) else ""
                dag = "†" if _true(r.get("gain_ctrl_excludes_0")) else ""
                lo, hi = r.get("sis_lo", np.nan), r.get("sis_hi", np.nan)
                ci = f"\n[{lo:+.2f}, {hi:+.2f}]" if np.isfinite(lo) and np.isfinite(hi) else ""
                dark = abs(v) > 0.6 * a
                ax.text(j, i, f"{v:+.3f}{star}{dag}{ci}", ha="center", va="center", fontsize=6.5,
                        color="white" if dark else "black")
                if star:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="black", lw=1.4))
        ax.set_xticks(range(len(cols)), cols, fontsize=8)
        ax.set_yticks(range(len(methods)), methods)
        ax.set_xlabel("task (probe metric)")
        ax.set_title(f"{prot} protocol", fontsize=10)
    axes[0][0].set_ylabel("embedding")
    cb = fig.colorbar(im, ax=list(axes[0]), fraction=0.03, pad=0.01)
    cb.set_label("SIS = (fused − best unimodal) / best unimodal (unitless)")
    fig.suptitle("Synergistic Information Score, mean over folds × seeds, with 95 % bootstrap intervals\n"
                 "* / frame: interval excludes 0;  †: gain over the best dimension-matched control excludes 0",
                 fontsize=10)
    _save(fig, out)


def _true(v) -> bool:
    return str(v).strip().lower() in ("true", "1", "1.0")


def plot_protocols(prot: pd.DataFrame, out: str | Path) -> None:
    """Figure: SIS of every fused method under each protocol, one panel per task.

    ``prot``: ``results/tables/<dataset>/protocols.tsv`` (:func:`workflow_scripts.evaluation.sis.protocols_table`).
    Per method one marker per protocol (side by side, protocol colours) at its SIS against the best unimodal
    embedding with the 95 % bootstrap interval; filled where the interval excludes 0. The best control's own SIS
    against the same unimodal reference is a short dashed line in that control's colour. Raises ValueError when the
    table has no fused-method row.
    """
    d = prot[~prot["method"].astype(str).str.startswith("unimodal_")].copy()
    if d.empty:
        raise ValueError("protocols table has no fused-method rows; nothing to plot")
    panels = list(d.groupby(["dataset", "task", "metric"], sort=True))
    n_ds = d["dataset"].nunique()
    protocols = sorted(d["protocol"].unique(), key=lambda p: (PROTOCOL_ORDER.index(p) if p in PROTOCOL_ORDER else 9, p))
    width = 0.8 / max(len(protocols), 1)
    fig, axes = _grid(len(panels), max_cols=2, w=6.0, h=3.8)
    for ax, ((ds, task, metric), g) in zip(axes, panels):
        order = _method_order(list(g["method"]))
        order += [m for m in dict.fromkeys(g["method"]) if m not in order]
        for k, p in enumerate(protocols):
            gp = g[g["protocol"] == p].set_index("method")
            for i, m in enumerate(order):
                if m not in gp.index or not np.isfinite(gp.loc[m, "sis"]):
                    continue
                r = gp.loc[m]
                x = i - 0.4 + width * (k + 0.5)
                lo, hi = r["sis_lo"], r["sis_hi"]
                err = [[max(r["sis"] - lo, 0)], [max(hi - r["sis"], 0)]] if np.isfinite(lo) and np.isfinite(hi) else None
                filled = _true(r.get("excludes_0"))
                col = PROTOCOL_COLOURS.get(p, "#495057")
                ax.errorbar(x, r["sis"], yerr=err, fmt="o", ms=5, capsize=2, color=col,
                            mfc=col if filled else "white")
                best_uni = r["score"] - r["gain"]
                ctrl = r.get("best_control")
                parsed = parse_control_name(str(ctrl)) if isinstance(ctrl, str) else None
                if parsed and np.isfinite(r.get("gain_ctrl", np.nan)) and best_uni > 0:
                    c_sis = ((r["score"] - r["gain_ctrl"]) - best_uni) / best_uni
                    _lab, c_col, c_ls = CONTROL_STYLES[parsed[0]]
                    ax.hlines(c_sis, x - width / 2, x + width / 2, colors=c_col, linestyles=c_ls, lw=2.0, zorder=4)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(np.arange(len(order)), order, rotation=45, ha="right")
        ax.set_xlim(-0.6, len(order) - 0.4)
        ax.set_ylabel(f"SIS vs best unimodal ({METRIC_LABEL.get(metric, metric)}; 95 % CI)")
        ax.set_title(_panel_title(ds, task, n_ds), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles = [Line2D([], [], marker="o", ls="", color=PROTOCOL_COLOURS.get(p, "#495057"), label=f"{p} protocol")
               for p in protocols]
    handles += [Line2D([], [], marker="o", ls="", color="#495057", mfc="white", label="interval contains 0")]
    handles += [Line2D([], [], color=c, ls=ls, lw=2.0, label=f"best control: {lab}")
                for lab, c, ls in CONTROL_STYLES.values()]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle("Transductive (paper) vs inductive (held-out donors) protocol: SIS with 95 % bootstrap intervals",
                 y=1.0)
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
    ``... protocols --protocols PROTOCOLS.tsv --out FIG.png --log LOG``;
    ``... spatial_rings --spatial SPATIAL.tsv --out FIG.png --log LOG``."""
    p = argparse.ArgumentParser(prog="python -m workflow_scripts.figures.evaluation", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("probe_scores")
    a.add_argument("--probes", required=True, help="probe summary (or long) table, TSV")
    b = sub.add_parser("sis_heatmap")
    b.add_argument("--sis", required=True, help="SIS table, TSV")
    c = sub.add_parser("spatial_rings")
    c.add_argument("--spatial", required=True, help="spatial summary (or long) table, TSV")
    e = sub.add_parser("protocols")
    e.add_argument("--protocols", required=True, help="protocols table (results/tables/<dataset>/protocols.tsv)")
    for s in (a, b, c, e):
        s.add_argument("--out", required=True, help="output PNG")
        s.add_argument("--log", default=None)
    args = p.parse_args(argv)
    setup_logging(args.log)
    if args.cmd == "probe_scores":
        plot_probe_scores(as_summary(read_table(args.probes)), args.out)
    elif args.cmd == "sis_heatmap":
        plot_sis_heatmap(read_table(args.sis), args.out)
    elif args.cmd == "protocols":
        plot_protocols(read_table(args.protocols), args.out)
    else:
        plot_spatial_rings(as_summary(read_table(args.spatial)), args.out)


if __name__ == "__main__":
    main()
