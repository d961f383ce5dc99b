"""PID figure, drawn only from the PID table (:mod:`workflow_scripts.evaluation.pid`) and, for a synthetic
dataset, the planted PID.

* Top: per task, the BROJA decomposition of I(Y; GEX, IMG) into redundancy, unique GEX, unique IMG and synergy
  (bits, stacked bars, estimated on k-means clusters); beside it, outlined, the planted decomposition when given.
* Bottom: per task, I(Y; fused) of every fused embedding (dots: mean over seeds, bars: min–max over seeds) against
  I(Y; GEX), I(Y; IMG) and I(Y; GEX, IMG) of the same discretisation (horizontal marks; same colours as the other
  figures), and the random baseline (the plug-in bias floor).

CLI: ``python -m workflow_scripts.figures.pid --pid results/pid/D.tsv [--truth results/D/pid_truth.tsv]
--out results/figures/D/pid.png --log LOG``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ..io import setup_logging  # noqa: E402

log = logging.getLogger(__name__)

DPI = 150
TERMS = ("redundancy", "unique_gex", "unique_img", "synergy")
TERM_COLOURS = {"redundancy": "#868e96", "unique_gex": "#2b8a3e", "unique_img": "#a61e4d", "synergy": "#f08c00"}
TERM_LABELS = {"redundancy": "redundancy", "unique_gex": "unique to GEX", "unique_img": "unique to IMG",
               "synergy": "synergy"}
PAIR = "unimodal_pair"
# the same colours as figures/evaluation.py: GEX green, IMG red, random grey
REFERENCE = {"i_gex": ("I(Y; GEX)", "#2b8a3e"), "i_img": ("I(Y; IMG)", "#a61e4d"),
             "i_joint": ("I(Y; GEX, IMG)", "#212529")}


def _read(path: str | Path, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} (run the rule that writes it first)")
    return pd.read_csv(path, sep="\t")


def plot_pid(pid: pd.DataFrame, out: str | Path, truth: pd.DataFrame | None = None) -> None:
    """Draw the figure of the module docstring to ``out`` (PNG).

    ``pid``: the PID table (columns of :data:`workflow_scripts.evaluation.pid.PID_COLUMNS`); ``truth``: the planted
    PID (one row per task) or None. Raises ValueError when ``pid`` has no ``unimodal_pair`` row.
    """
    pair = pid[pid["embedding"] == PAIR].drop_duplicates("task").set_index("task")
    if pair.empty:
        raise ValueError("PID table has no unimodal_pair rows")
    tasks = list(pair.index)
    tr = truth.set_index("task") if truth is not None else None
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 1.3 * len(tasks) + 2.5), 7.5), sharex=True)
    x = np.arange(len(tasks))
    width = 0.36 if tr is not None else 0.6
    offset = -width / 2 - 0.02 if tr is not None else 0.0
    bottom = np.zeros(len(tasks))
    for term in TERMS:
        v = pair[term].to_numpy(dtype=float)
        ax1.bar(x + offset, v, width, bottom=bottom, color=TERM_COLOURS[term], label=TERM_LABELS[term])
        bottom += v
    if tr is not None:
        bottom = np.zeros(len(tasks))
        for term in TERMS:
            v = np.array([float(tr.loc[t, term]) if t in tr.index else np.nan for t in tasks])
            ax1.bar(x + width / 2 + 0.02, np.nan_to_num(v), width, bottom=bottom, facecolor="none",
                    edgecolor=TERM_COLOURS[term], hatch="//", linewidth=1.2)
            bottom += np.nan_to_num(v)
    top = max(float(pair[list(TERMS)].sum(axis=1).max()),
              float(tr[list(TERMS)].sum(axis=1).max()) if tr is not None else 0.0)
    ax1.set_ylim(0, 1.12 * top if top > 0 else 1.0)
    ax1.set_ylabel("information (bits)")
    k = int(pair["k"].iloc[0])
    ax1.set_title(f"{pid['dataset'].iloc[0]}: PID of each task w.r.t. GEX and IMG (k-means, k = {k})"
                  + ("; left: estimated, right (hatched): planted" if tr is not None else ""), fontsize=9)
    ax1.legend(fontsize=7, loc="upper right")
    fused = pid[pid["embedding"] != PAIR]
    names = [e for e in pd.unique(fused["embedding"]) if e != "random"]
    span = 0.7
    for j, t in enumerate(tasks):
        for key, (label, colour) in REFERENCE.items():
            ax2.hlines(float(pair.loc[t, key]), j - span / 2, j + span / 2, colors=colour, linewidth=1.6,
                       linestyles="-" if key != "i_img" else "--")
        rnd = fused[(fused["task"] == t) & (fused["embedding"] == "random")]["i_fused"]
        if len(rnd):
            ax2.hlines(float(rnd.mean()), j - span / 2, j + span / 2, colors="#495057", linestyles=":")
    cmap = plt.get_cmap("tab20")
    for i, e in enumerate(names):
        g = fused[fused["embedding"] == e].groupby("task")["i_fused"].agg(["mean", "min", "max"])
        xs = [j - span / 2 + span * (i + 0.5) / max(len(names), 1) for j, t in enumerate(tasks) if t in g.index]
        g = g.reindex([t for t in tasks if t in g.index])
        ax2.errorbar(xs, g["mean"], yerr=[g["mean"] - g["min"], g["max"] - g["mean"]], fmt="o", ms=4,
                     color=cmap(i % 20), label=e, linewidth=0.8)
    ax2.set_ylabel("I(Y; embedding) (bits)")
    ax2.set_xticks(x, tasks, rotation=30, ha="right", fontsize=8)
    ax2.set_title(f"I(Y; fused) on k² = {k * k} clusters vs the pair on k × k cells", fontsize=9)
    ref = [Line2D([], [], color=c, linestyle="--" if key == "i_img" else "-", label=lab)
           for key, (lab, c) in REFERENCE.items()]
    ref.append(Line2D([], [], color="#495057", linestyle=":", label="random (plug-in bias)"))
    handles = ref + [Patch(color=cmap(i % 20), label=e) for i, e in enumerate(names)]
    ax2.legend(handles=handles, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    log.info("wrote %s (%d tasks, %d fused embeddings)", out, len(tasks), len(names))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.figures.pid", description=__doc__.split("\n")[0])
    ap.add_argument("--pid", required=True, help="PID table (results/pid/<dataset>.tsv)")
    ap.add_argument("--truth", default=None, help="planted PID (results/<dataset>/pid_truth.tsv), synthetic only")
    ap.add_argument("--out", required=True)
    ap.add_argument("--log", default=None)
    a = ap.parse_args(argv)
    setup_logging(a.log)
    truth = _read(a.truth, "planted PID table") if a.truth else None
    plot_pid(_read(a.pid, "PID table"), a.out, truth)


if __name__ == "__main__":
    main()
