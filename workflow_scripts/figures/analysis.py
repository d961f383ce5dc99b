"""Figures of the analyses beyond the probes: spectra, spatial consistency, data scaling, training curves, UMAPs.

Subcommands (each reads only result tables, so redrawing a figure reruns no analysis):

* ``spectral``: singular values of the whitened cross-covariance (:mod:`workflow_scripts.analysis.spectral`) per rank,
  one panel per source (``unimodal`` = GEX vs IMG embeddings, then each method's two projected views); one
  line per seed; the shuffled-pairing permutation null as a grey band (α … 1−α quantiles) with its median
  dashed; a vertical line at the number K of significant directions; last panel: K per source
  (mean ± sd over seeds). Ranks beyond max(``--max-rank``, 2·K+5) are not drawn.
* ``spatial_consistency``: ROC-AUC, F1 and accuracy of the close-vs-far pair classifier per embedding
  (mean ± sd over folds × seeds) with chance (0.5) as a line.
* ``scaling``: probe score against the data fraction (log axis) per task, one line per embedding (gex,
  concat, comm) and post-training configuration; error bars = sd over seeds of the per-seed fold means (sd
  over folds when there is one seed); a fraction-0 (pretrained) row is drawn as a horizontal dotted line.
* ``training_curves``: training and validation loss per epoch for every method (panel) and seed (colour),
  from the align rule's ``*.history.tsv``; a dot marks the epoch with the best smoothed validation loss.
* ``umap``: grid of the UMAPs of all embeddings (coordinates from :mod:`workflow_scripts.analysis.umap`)
  coloured by a label column or by slide.

PNG, 150 dpi.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..io import setup_logging  # noqa: E402

log = logging.getLogger(__name__)

DPI = 150
METHOD_ORDER = ["unimodal", "unimodal_gex", "unimodal_img", "gex", "concat", "cca", "dcca", "comm", "simclr", "byol",
                "simsiam", "barlow_twins", "vicreg", "dim", "random"]
EMB_COLOURS = {"unimodal": "#495057", "gex": "#2b8a3e", "concat": "#868e96", "comm": "#f08c00", "unimodal_gex": "#2b8a3e",
               "unimodal_img": "#a61e4d", "random": "#495057", "cca": "#1c7ed6", "dcca": "#1864ab"}
METRIC_LABEL = {"macro_f1": "macro-F1", "r2": "R²", "roc_auc": "ROC-AUC", "f1": "F1", "accuracy": "accuracy"}


def _order(names: Sequence[str]) -> list[str]:
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(dict.fromkeys(names), key=lambda m: (rank.get(m, len(rank)), m))


def _grid(n: int, max_cols: int = 4, w: float = 3.8, h: float = 3.2):
    cols = min(max_cols, max(1, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    flat = axes.ravel()
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _save(fig, out: str | Path) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    log.info("wrote %s", out)


def _read(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"table not found: {path} (run the rule that writes it first)")
    return pd.read_csv(path, sep="\t")


def _need(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: table lacks columns {missing}; it has {list(df.columns)}")


# ------------------------------------------------------------------------------------------------ spectral
def plot_spectral(df: pd.DataFrame, out: str | Path, max_rank: int = 20) -> None:
    """Spectra with permutation null per source (module docstring). ``df``: concatenated spectral TSVs."""
    _need(df, ["source", "seed", "rank", "singular_value", "null_median", "null_lo", "null_hi", "n_significant"],
          "spectral figure")
    sources = _order(df["source"].astype(str).unique())
    fig, axes = _grid(len(sources) + 1)
    ks = []
    for ax, src in zip(axes, sources):
        d = df[df["source"].astype(str) == src]
        k_seed = d.groupby("seed")["n_significant"].first()
        k_max = int(k_seed.max())
        r_show = int(min(d["rank"].max(), max(max_rank, 2 * k_max + 5)))
        d = d[d["rank"] <= r_show]
        band = d.groupby("rank")[["null_lo", "null_median", "null_hi"]].mean()
        ax.fill_between(band.index, band["null_lo"], band["null_hi"], color="0.8", label="null (shuffled pairs)")
        ax.plot(band.index, band["null_median"], ls="--", color="0.45", lw=1)
        cmap = plt.get_cmap("viridis", max(2, len(k_seed)))
        for i, (seed, g) in enumerate(d.groupby("seed")):
            ax.plot(g["rank"], g["singular_value"], "o-", ms=2.5, lw=1, color=cmap(i), label=f"seed {seed}")
        k_mean = float(k_seed.mean())
        if k_mean > 0:
            ax.axvline(k_mean + 0.5, color="#c92a2a", lw=1, ls=":")
        ax.set_title(f"{src}: K = {k_mean:.3g}" + (f" ({', '.join(map(str, k_seed.tolist()))})" if len(k_seed) > 1 else ""),
                     fontsize=9)
        ax.set_xlabel("rank")
        ax.set_ylabel("singular value (canonical corr.)")
        ax.set_ylim(0, 1.02)
        ks.append((src, k_mean, float(k_seed.std(ddof=0))))
    axes[0].legend(fontsize=7, frameon=False)
    ax = axes[-1]
    names = [k[0] for k in ks]
    ax.bar(range(len(ks)), [k[1] for k in ks], yerr=[k[2] for k in ks], color=[EMB_COLOURS.get(n, "#f08c00") for n in names],
           capsize=2)
    ax.set_xticks(range(len(ks)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("significant directions K")
    ax.set_title("directions above the permutation null", fontsize=9)
    fig.suptitle("Whitened cross-covariance spectrum (GEX vs IMG) against a shuffled-pairing null", y=1.0)
    fig.tight_layout()
    _save(fig, out)


# ------------------------------------------------------------------------------------------------ spatial consistency
def plot_spatial_consistency(df: pd.DataFrame, out: str | Path) -> None:
    """Bars of ROC-AUC / F1 / accuracy per embedding (mean ± sd). ``df``: long table or summary (mean, sd)."""
    if "mean" not in df.columns:
        _need(df, ["embedding", "metric", "value"], "spatial consistency figure")
        df = df.groupby(["embedding", "metric"])["value"].agg(mean="mean", sd=lambda v: float(np.std(v))).reset_index()
    metrics = [m for m in ("roc_auc", "f1", "accuracy") if m in set(df["metric"])]
    fig, axes = _grid(len(metrics), max_cols=3, w=4.8)
    for ax, m in zip(axes, metrics):
        d = df[df["metric"] == m].set_index("embedding")
        names = _order(d.index.astype(str))
        d = d.loc[names]
        ax.bar(range(len(names)), d["mean"], yerr=d["sd"], capsize=2,
               color=[EMB_COLOURS.get(n, "#f08c00") for n in names])
        ax.axhline(0.5, color="k", lw=0.8, ls="--", label="chance")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel(METRIC_LABEL.get(m, m))
        ax.set_title(METRIC_LABEL.get(m, m), fontsize=9)
    if len(axes):
        axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle("Spatial consistency: close (k-NN) vs far pairs within a slide (mean ± sd over folds × seeds)", y=1.0)
    fig.tight_layout()
    _save(fig, out)


# ------------------------------------------------------------------------------------------------ scaling
def scaling_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and error per (mode, config, embedding, task, metric, fraction): per-seed fold means first, then mean and
    sd over seeds (sd over folds when a single seed). Columns ``... mean, sd, n_seeds, n_fit``."""
    _need(df, ["config", "fraction", "seed", "embedding", "task", "metric", "value"], "scaling summary")
    keys = [c for c in ("mode", "config", "embedding", "task", "metric", "fraction") if c in df.columns]
    per_seed = df.groupby(keys + ["seed"]).agg(v=("value", "mean"), sd_f=("value", lambda v: float(np.std(v))),
                                               n_fit=("n_fit", "first") if "n_fit" in df.columns else ("value", "size"))
    per_seed = per_seed.reset_index()
    g = per_seed.groupby(keys)
    out = g.agg(mean=("v", "mean"), sd=("v", lambda v: float(np.std(v))), n_seeds=("v", "size"),
                n_fit=("n_fit", "mean"), sd_folds=("sd_f", "first")).reset_index()
    one = out["n_seeds"] == 1
    out.loc[one, "sd"] = out.loc[one, "sd_folds"]
    return out.drop(columns="sd_folds")


def plot_scaling(df: pd.DataFrame, out: str | Path) -> None:
    """Scaling curves per task (module docstring). ``df``: concatenated scaling TSVs."""
    s = scaling_summary(df)
    panels = s[["task", "metric"]].drop_duplicates().sort_values(["task", "metric"]).to_numpy().tolist()
    fig, axes = _grid(len(panels), max_cols=3, w=4.6, h=3.6)
    styles = ["-", "--", ":", "-."]
    configs = [c for c in dict.fromkeys(s["config"].astype(str)) if c != "pretrained"]
    for ax, (task, metric) in zip(axes, panels):
        d = s[(s["task"] == task) & (s["metric"] == metric)]
        for emb in _order(d["embedding"].astype(str).unique()):
            e = d[d["embedding"].astype(str) == emb]
            col = EMB_COLOURS.get(emb, None)
            for ci, cfg in enumerate(configs):
                c = e[(e["config"].astype(str) == cfg) & (e["fraction"] > 0)].sort_values("fraction")
                if len(c):
                    ax.errorbar(c["fraction"], c["mean"], yerr=c["sd"], fmt="o" + styles[ci % 4], ms=3, capsize=2,
                                color=col, label=f"{emb}" + (f" ({cfg})" if len(configs) > 1 else ""))
            pre = e[(e["config"].astype(str) == "pretrained") | (e["fraction"] == 0)]
            if len(pre):
                ax.axhline(float(pre["mean"].mean()), color=col, ls=":", lw=1, label=f"{emb} (pretrained)")
        ax.set_xscale("log")
        ax.set_xlabel("fraction of training data")
        ax.set_ylabel(METRIC_LABEL.get(metric, metric))
        ax.set_title(task, fontsize=9)
    if len(axes):
        axes[0].legend(fontsize=6, frameon=False)
    fig.suptitle("Data scaling: probe score vs fraction of data fitting the models (mean ± sd over seeds)", y=1.0)
    fig.tight_layout()
    _save(fig, out)


# ------------------------------------------------------------------------------------------------ training curves
_HIST_RE = re.compile(r"aligned/(?P<method>[^/]+)/seed(?P<seed>\d+)\.history\.tsv$")


def read_histories(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate align ``*.history.tsv`` files; method and seed parsed from ``.../aligned/{method}/seed{seed}.history.tsv``.

    Header-only histories (concat, random) contribute no rows (logged). Raises ValueError for a path of another form.
    """
    frames = []
    for p in paths:
        m = _HIST_RE.search(str(p).replace("\\", "/"))
        if not m:
            raise ValueError(f"{p}: not a history path of the form .../aligned/<method>/seed<seed>.history.tsv")
        h = _read(p)
        if len(h) == 0:
            log.info("%s: empty history (method without training)", p)
            continue
        h.insert(0, "seed", int(m["seed"]))
        h.insert(0, "method", m["method"])
        frames.append(h)
    if not frames:
        return pd.DataFrame(columns=["method", "seed", "epoch", "train_loss", "val_loss", "val_loss_smooth", "lr"])
    return pd.concat(frames, ignore_index=True)


def plot_training_curves(h: pd.DataFrame, out: str | Path) -> None:
    """Loss per epoch, train (solid) and validation (dashed), one panel per method, one colour per seed."""
    methods = _order(h["method"].astype(str).unique()) if len(h) else []
    fig, axes = _grid(max(1, len(methods)), max_cols=4)
    if not methods:
        axes[0].text(0.5, 0.5, "no trained method", ha="center", va="center")
        axes[0].set_axis_off()
    seeds = sorted(h["seed"].unique()) if len(h) else []
    cmap = plt.get_cmap("tab10")
    for ax, m in zip(axes, methods):
        d = h[h["method"] == m]
        for g_seed, g in d.groupby("seed"):
            c = cmap(seeds.index(g_seed) % 10)
            mk = "o" if len(g) < 3 else None
            ax.plot(g["epoch"], g["train_loss"], "-", marker=mk, color=c, lw=1, label=f"seed {g_seed} train")
            ax.plot(g["epoch"], g["val_loss"], "--", marker=mk, color=c, lw=1, label=f"seed {g_seed} val")
            if "val_loss_smooth" in g and g["val_loss_smooth"].notna().any():
                b = g.loc[g["val_loss_smooth"].idxmin()]
                ax.plot([b["epoch"]], [b["val_loss"]], "o", color=c, ms=5, mfc="none")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
    if methods:
        axes[0].legend(fontsize=6, frameon=False)
    fig.suptitle("Training curves of the fusion methods (solid: train, dashed: validation; circle: best epoch)", y=1.0)
    fig.tight_layout()
    _save(fig, out)


# ------------------------------------------------------------------------------------------------ UMAP
def plot_umaps(coords: Mapping[str, pd.DataFrame], colour: pd.Series, out: str | Path, title: str) -> None:
    """Grid of UMAPs (one panel per embedding) coloured by the categorical ``colour`` (indexed by spot id)."""
    names = _order(list(coords))
    fig, axes = _grid(len(names), max_cols=4, w=3.4, h=3.2)
    cats = sorted(colour.dropna().astype(str).unique())
    cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
    lut = {c: cmap(i % cmap.N) for i, c in enumerate(cats)}
    for ax, n in zip(axes, names):
        c = coords[n]
        lab = colour.reindex(c.index).astype(object)
        cols = [lut.get(str(v), (0.7, 0.7, 0.7, 1.0)) if pd.notna(v) else (0.85, 0.85, 0.85, 1.0) for v in lab]
        ax.scatter(c["umap1"], c["umap2"], c=cols, s=float(np.clip(3000 / max(len(c), 1), 1, 12)), lw=0,
                   rasterized=True)
        ax.set_title(n, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Line2D([], [], marker="o", ls="", color=lut[c], label=c) for c in cats[:30]]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=7)
    fig.suptitle(title, y=1.0)
    fig.tight_layout()
    _save(fig, out)


def _name_from_coords_path(p: str) -> str:
    return Path(p).name.removesuffix(".tsv")


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m workflow_scripts.figures.analysis <spectral|spatial_consistency|scaling|training_curves|
    umap> ... --out OUT --log LOG`` (see ``--help`` of each subcommand)."""
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.figures.analysis", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("spectral")
    s.add_argument("--inputs", nargs="+", required=True, help="spectral TSVs")
    s.add_argument("--max-rank", type=int, default=20)
    c = sub.add_parser("spatial_consistency")
    c.add_argument("--input", required=True, help="long or summary table")
    g = sub.add_parser("scaling")
    g.add_argument("--inputs", nargs="+", required=True, help="scaling TSVs")
    t = sub.add_parser("training_curves")
    t.add_argument("--histories", nargs="+", required=True, help=".../aligned/<method>/seed<seed>.history.tsv")
    f = sub.add_parser("umap")
    f.add_argument("--coords", nargs="+", required=True,
                   help="coordinate TSVs: one table with an 'embedding' column, or files named <embedding>.tsv")
    f.add_argument("--spots", required=True)
    f.add_argument("--colour", required=True, help="obs column (e.g. slide, cluster)")
    f.add_argument("--dataset", default="")
    for p in (s, c, g, t, f):
        p.add_argument("--out", required=True)
        p.add_argument("--log", default=None)
    args = ap.parse_args(argv)
    setup_logging(args.log)
    if args.cmd == "spectral":
        plot_spectral(pd.concat([_read(p) for p in args.inputs], ignore_index=True), args.out, args.max_rank)
    elif args.cmd == "spatial_consistency":
        plot_spatial_consistency(_read(args.input), args.out)
    elif args.cmd == "scaling":
        plot_scaling(pd.concat([_read(p) for p in args.inputs], ignore_index=True), args.out)
    elif args.cmd == "training_curves":
        plot_training_curves(read_histories(args.histories), args.out)
    else:
        import anndata as ad

        obs = ad.read_h5ad(args.spots, backed="r").obs
        obs.index = obs.index.astype(str)
        if args.colour not in obs.columns:
            raise KeyError(f"{args.spots}: obs has no column {args.colour!r} (config umap.label); columns: {list(obs.columns)}")
        coords = {}
        for p in args.coords:
            d = _read(p)
            parts = d.groupby("embedding", sort=False) if "embedding" in d.columns else [(_name_from_coords_path(p), d)]
            for name, g in parts:
                coords[name] = g.set_index(g["spot_id"].astype(str))[["umap1", "umap2"]]
        plot_umaps(coords, obs[args.colour], args.out,
                   f"UMAP of the unimodal and fused embeddings{' of ' + args.dataset if args.dataset else ''}, "
                   f"coloured by {args.colour}")


if __name__ == "__main__":
    main()
