"""Lung-scale benchmark of the expensive stages, each next to its naive version: ``python -m workflow_scripts.bench``.

Data: :func:`workflow_scripts.bench.synthetic.synthetic_dataset` at ``--scale`` × lung scale (71,000 patches on a
54.4 µm grid in 7 slides, 1,536-d IMG, 512-d GEX, 22 region classes, 9-d composition); the lung's 8 rings
(``config/paper.yaml``). Stages (``--stages``):

``rings``
    neighbour pairs of every ring: :func:`~workflow_scripts.evaluation.spatial_probe.ring_pairs` (one KD-tree
    radius query per slide) against the naive all-pairs distance matrix of each slide
    (:func:`naive_ring_pairs`); the pair sets are compared.
``ring_probes``
    spatial-ring probes of one embedding (IMG), ``region`` (macro-F1) and ``composition`` (R²), 8 rings × 5
    repeats: :func:`~workflow_scripts.evaluation.spatial_probe.run_spatial_probe` (float32, warm starts, ridge
    leave-one-out in the eigenbasis) against the naive fits, one unwarmed default-solver fit per ring and
    repeat (:func:`workflow_scripts.evaluation.probes.fit_classifier_fold` / a standardised ``RidgeCV``:
    float64) on the same splits. ``--naive-fits K`` times only K fits per task (spread over the rings) and
    extrapolates the naive total from their mean; the scores of those fits are compared.
``probes``
    the 5-fold macro-F1 and R² probes of one embedding (IMG) as the workflow runs them
    (:func:`workflow_scripts.evaluation.probes.run_probes`: C chosen by inner CV over the default grid, or the grid
    of ``--logreg-cs``; one value = one fit per fold) and, with one C, the same folds fitted the naive way
    (:func:`naive_probe_fold`: float64, every fold rotated by a full SVD, cold L-BFGS, ``RidgeCV``; ``--naive-fits
    K`` times the first K folds of each task and extrapolates); the scores of both are compared fold by fold.
``align``
    training speed of each method in epochs/s at batch 32 and at the largest batch that fits
    (:func:`workflow_scripts.methods.benchmark.benchmark_training` / ``largest_batch_size`` where the methods
    package has them, else :func:`workflow_scripts.methods.fit_method` with one epoch on a subset).

Every stage prints wall time, CPU time, peak RSS of this process during the stage (``VmHWM``, reset before the
stage; the data held by the process are included) and, on a GPU, peak GPU memory; ``ratio`` = naive / fast.
``--out`` writes the table as TSV. Figures, commands and the machine: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..io import setup_logging
from .synthetic import LUNG_RING_EDGES_UM, scaled, synthetic_dataset

log = logging.getLogger("workflow_scripts.bench")

STAGES = ("rings", "ring_probes", "probes", "align")
COLUMNS = ["stage", "variant", "wall_s", "cpu_s", "peak_rss_gib", "peak_gpu_gib", "ratio", "agree", "note"]
TASKS = {"region": {"type": "classification", "label": "region"},
         "composition": {"type": "regression", "obsm": "composition"}}
PROBE_PARAMS = {"n_folds": 5, "cv": "kfold", "logreg_max_iter": 2000,
                "ridge_alphas": list(np.logspace(-3, 3, 10))}
SPATIAL_PARAMS = {"n_repeats": 5, "test_size": 0.2, "min_spots": 20}


# ---------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------
def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    except ImportError:
        pass


def _peak_gib() -> tuple[float, float]:
    rss = float("nan")
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 2**20
    if rss != rss:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gpu = float("nan")
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.max_memory_allocated() / 2**30
    return rss, gpu


class Timer:
    """Wall and CPU seconds and the peak memory of a block (``with Timer() as t: ...``)."""

    def __enter__(self):
        _reset_peak()
        self.c0, self.t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        self.rss, self.gpu = _peak_gib()
        return False

    def row(self, stage: str, variant: str, **extra) -> dict:
        return dict(stage=stage, variant=variant, wall_s=self.wall, cpu_s=self.cpu, peak_rss_gib=self.rss,
                    peak_gpu_gib=self.gpu, **extra)


# ---------------------------------------------------------------------------------------------------------
# naive comparators
# ---------------------------------------------------------------------------------------------------------
def naive_ring_pairs(adata, edges_um: Sequence[float], block: int = 2048) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ring pairs from the full distance matrix of each slide (``scipy.spatial.distance.cdist``; O(n²) per slide).

    Same output as :func:`workflow_scripts.evaluation.spatial_probe.ring_pairs` (all spots as centres): per ring
    ``(centre_pos, neighbour_pos)`` sorted by centre then neighbour. The matrix is formed in row blocks of
    ``block`` rows so its memory stays at ``block × n_slide`` distances.
    """
    from scipy.spatial.distance import cdist

    e = np.asarray(edges_um, dtype=float)
    xy = adata.obs[["x_um", "y_um"]].to_numpy(dtype=float)
    slides = adata.obs["slide"].astype(str).to_numpy()
    parts: list[list] = [[] for _ in range(len(e) - 1)]
    for s in pd.unique(slides):
        idx = np.flatnonzero(slides == s)
        for i0 in range(0, len(idx), block):
            rows = idx[i0:i0 + block]
            D = cdist(xy[rows], xy[idx])
            for b in range(len(e) - 1):
                r, c = np.nonzero((D > e[b]) & (D <= e[b + 1]))
                ci, nj = rows[r], idx[c]
                keep = ci != nj
                parts[b].append((ci[keep], nj[keep]))
    out = []
    for b in range(len(e) - 1):
        ci = np.concatenate([p[0] for p in parts[b]]) if parts[b] else np.zeros(0, np.int64)
        nj = np.concatenate([p[1] for p in parts[b]]) if parts[b] else np.zeros(0, np.int64)
        order = np.lexsort((nj, ci))
        out.append((ci[order].astype(np.int64), nj[order].astype(np.int64)))
    return out


def naive_ring_fit(prob, split: int, max_iter: int, alphas, seed: int) -> float | None:
    """One unwarmed default-solver fit of a ring problem's split (the previous implementation: float64,
    :func:`~workflow_scripts.evaluation.probes.fit_classifier_fold`, or a standardised ``RidgeCV(alphas,
    scoring="r2")``, which does n·d² work per alpha)."""
    from ..evaluation.probes import fit_classifier_fold

    tr, te = prob.splits[split]
    X = prob.X.astype(np.float64)
    if prob.classification:
        res = fit_classifier_fold(X[tr], prob.y[tr], X[te], prob.y[te], max_iter, seed, "naive", min_train=1,
                                  min_test=1)
        return None if res is None else res["value"]
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.preprocessing import StandardScaler

    if len(tr) < 2 or len(te) < 1:
        return None
    sc = StandardScaler().fit(X[tr])
    reg = RidgeCV(alphas=np.asarray(alphas, dtype=float), scoring="r2").fit(sc.transform(X[tr]), prob.y[tr])
    return float(r2_score(prob.y[te], reg.predict(sc.transform(X[te])), multioutput="uniform_average"))


# ---------------------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------------------
def stage_rings(data, adata, naive: bool = True) -> list[dict]:
    from ..evaluation.spatial_probe import ring_pairs

    with Timer() as t:
        fast = ring_pairs(adata, LUNG_RING_EDGES_UM)
    n_pairs = sum(len(c) for c, _ in fast)
    rows = [t.row("rings", "fast: KD-tree per slide", note=f"{n_pairs:,} pairs in {len(fast)} rings")]
    if naive:
        with Timer() as t2:
            slow = naive_ring_pairs(adata, LUNG_RING_EDGES_UM)
        agree = all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(fast, slow))
        rows.append(t2.row("rings", "naive: all-pairs distances per slide", ratio=t2.wall / t.wall,
                           agree="same pairs" if agree else "PAIRS DIFFER"))
    return rows


def stage_ring_probes(data, adata, naive_fits: int | None, seed: int = 0) -> list[dict]:
    from ..evaluation.spatial_probe import ring_problems, run_spatial_probe

    emb = data.frame("img")
    with Timer() as t:
        res = run_spatial_probe(emb, adata, TASKS, LUNG_RING_EDGES_UM, PROBE_PARAMS, SPATIAL_PARAMS, seed)
    n_fits = len(res)
    rows = [t.row("ring_probes", "fast: float32, warm starts, ridge LOO in the eigenbasis",
                  note=f"{n_fits} fits ({(res.metric == 'macro_f1').sum()} logistic, {(res.metric == 'r2').sum()} "
                       f"ridge); mean macro-F1 {res.loc[res.metric == 'macro_f1', 'value'].mean():.3f}, "
                       f"mean R² {res.loc[res.metric == 'r2', 'value'].mean():.3f}")]
    if naive_fits == 0:
        return rows
    # the same ring problems and splits; naive fits on K of them per task, spread over the rings
    per_task: dict[str, list] = {}
    for prob in ring_problems(emb, adata, TASKS, LUNG_RING_EDGES_UM, SPATIAL_PARAMS, seed):
        per_task.setdefault(prob.task, []).extend((prob, r) for r in range(len(prob.splits)))
    picked = []
    for task, items in per_task.items():
        k = len(items) if naive_fits is None else min(naive_fits, len(items))
        picked += [items[i] for i in np.linspace(0, len(items) - 1, k).round().astype(int)]
    diffs, wall, cpu = [], 0.0, 0.0
    with Timer() as t2:
        for prob, r in picked:
            c0, w0 = time.process_time(), time.perf_counter()
            v = naive_ring_fit(prob, r, PROBE_PARAMS["logreg_max_iter"], PROBE_PARAMS["ridge_alphas"], seed)
            wall += time.perf_counter() - w0
            cpu += time.process_time() - c0
            fast_v = res.loc[(res.task == prob.task) & (res.ring == prob.ring) & (res["repeat"] == r), "value"]
            if v is not None and len(fast_v):
                diffs.append((prob.metric, abs(float(fast_v.iloc[0]) - v)))
    scale = n_fits / max(len(picked), 1)
    d = pd.DataFrame(diffs, columns=["metric", "d"])
    agree = "; ".join(f"{m}: max |Δ| {g.d.max():.4f}, mean {g.d.mean():.4f}" for m, g in d.groupby("metric"))
    row = t2.row("ring_probes", f"naive: float64, cold L-BFGS, RidgeCV ({len(picked)} of {n_fits} fits timed)",
                 agree=agree, note=f"wall/CPU extrapolated ×{scale:.1f} to all fits")
    row.update(wall_s=wall * scale, cpu_s=cpu * scale, ratio=wall * scale / t.wall)
    rows.append(row)
    return rows


def naive_probe_fold(X: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray, classification: bool, C: float,
                     alphas, max_iter: int) -> float:
    """One fold of the per-task probe as it was implemented before the large-data path: float64 throughout, the
    training part always rotated into its row space by a full SVD, scikit-learn's ``LogisticRegression`` at ``C``
    (solver as :func:`~workflow_scripts.evaluation.probes.logreg_solver`), ``RidgeCV(alphas, scoring="r2")``.
    ``X`` (n, d), ``y`` (n,) labels or (n, k) targets, ``tr`` / ``te`` row indices. Returns macro-F1 (over the
    classes of ``y``) or R²."""
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.preprocessing import StandardScaler

    from ..evaluation.probes import logreg_solver, macro_f1, reduce_rank

    X = np.asarray(X, dtype=np.float64)
    sc = StandardScaler().fit(X[tr])
    A, B = sc.transform(X[tr]), sc.transform(X[te])
    if classification:
        A, B, r = reduce_rank(A, B)
        solver = logreg_solver(r, len(np.unique(y[tr])))
        clf = LogisticRegression(C=float(C), solver=solver, max_iter=int(max_iter)).fit(A, y[tr])
        return macro_f1(y[te], clf.predict(B), sorted(set(y)))
    reg = RidgeCV(alphas=np.asarray(alphas, dtype=float), scoring="r2").fit(A, y[tr])
    return float(r2_score(y[te], reg.predict(B), multioutput="uniform_average"))


def stage_probes(data, adata, naive_folds: int | None = None, seed: int = 0,
                 logreg_cs: Sequence[float] | None = None) -> list[dict]:
    """The workflow's per-task probes of the IMG embedding, then (``naive_folds`` != 0, single C only) the same
    folds with :func:`naive_probe_fold`; ``naive_folds`` = k times only the first k folds of each task and
    extrapolates the naive total (× folds / k)."""
    from ..evaluation.probes import DEFAULT_CS, cv_splits, run_probes, task_targets

    params = {**PROBE_PARAMS, "logreg_Cs": list(logreg_cs or DEFAULT_CS)}
    emb = data.frame("img")
    with Timer() as t:
        res = run_probes(emb, adata, TASKS, params, seed)
    grid = params["logreg_Cs"]
    how = f"C by inner CV over {len(grid)} values" if len(grid) > 1 else f"one fit per fold at C = {grid[0]:g}"
    rows = [t.row("probes", f"run_probes as in the workflow ({how})",
                  note="; ".join(f"{m} {g['value'].mean():.3f}" for m, g in res.groupby("metric")))]
    if naive_folds == 0 or len(grid) > 1:
        return rows
    X = data.img
    pos = pd.Series(np.arange(len(emb)), index=emb.index)
    out, n_all = [], 0
    with Timer() as t2:
        for task, spec in TASKS.items():
            y = task_targets(adata, task, spec)
            idx = pos.loc[y.index].to_numpy()
            Xt, yv = X[idx], y.to_numpy()
            splits = list(cv_splits(len(idx), None, PROBE_PARAMS, seed, what=task))
            n_all += len(splits)
            for f, (tr, te) in enumerate(splits[: naive_folds or len(splits)]):
                v = naive_probe_fold(Xt, yv, tr, te, spec["type"] == "classification", grid[0],
                                     PROBE_PARAMS["ridge_alphas"], PROBE_PARAMS["logreg_max_iter"])
                out.append(("macro_f1" if spec["type"] == "classification" else "r2", f, v))
    scale = n_all / len(out)
    t2.wall, t2.cpu = t2.wall * scale, t2.cpu * scale
    ref = res.set_index(["metric", "fold"])["value"]
    agree = "; ".join(
        f"{m}: max |Δ| {max(abs(v - ref.loc[(m, f)]) for mm, f, v in out if mm == m):.4f}"
        for m in ("macro_f1", "r2") if any(mm == m for mm, _, _ in out))
    extra = "" if scale == 1 else f" ({len(out)} of {n_all} folds timed, extrapolated × {scale:.2g})"
    rows.append(t2.row("probes", "naive: float64, SVD rotation of every fold, cold L-BFGS, RidgeCV" + extra,
                       ratio=t2.wall / t.wall, agree=agree, note="ratio = naive / run_probes; the same folds"))
    return rows


def stage_align(data, methods: Sequence[str], device: str, steps: int, mem_limit_gib: float,
                threads: int | None, seed: int = 0) -> list[dict]:
    rows = []
    try:
        from ..methods import benchmark as mb
    except ImportError:
        mb = None
    n = len(data.obs)
    if mb is not None:
        for m in [m for m in methods if m in mb.TRAINED]:
            with Timer() as t:
                r32 = mb.benchmark_training(m, batch_size=32, max_steps=steps, device=device, threads=threads,
                                            data=(data.gex, data.img), seed=seed)
            rows.append(t.row("align", f"{m} batch 32", ratio=float("nan"),
                              note=f"{r32['epochs_per_s']:.4g} epochs/s ({r32['steps_per_s']:.1f} steps/s)"))
            best, tried = mb.largest_batch_size(m, n, data.gex.shape[1], data.img.shape[1], device=device,
                                                mem_limit_gib=mem_limit_gib, max_steps=2, threads=threads)
            if best:
                with Timer() as t:
                    rb = mb.benchmark_training(m, batch_size=best, max_steps=max(2, steps * 32 // best), device=device,
                                               threads=threads, data=(data.gex, data.img), seed=seed)
                rows.append(t.row("align", f"{m} batch {best} (largest within {mem_limit_gib:g} GiB)",
                                  ratio=rb["epochs_per_s"] / r32["epochs_per_s"],
                                  note=f"{rb['epochs_per_s']:.4g} epochs/s; ratio = epochs/s vs batch 32"))
        return rows
    # fallback: one epoch of fit_method on a subset of rows (the methods package has no benchmark helper)
    from ..methods import fit_method

    n_sub = min(n, 32 * steps)
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.choice(n, n_sub, replace=False))
    for m in methods:
        for bs in (32, 256):
            params = {"batch_size": bs, "max_epochs": 1, "early_stopping_patience": 10}
            with Timer() as t:
                fit_method(m, data.gex[sub], data.img[sub], params, seed, device=device, progress=False)
            rows.append(t.row("align", f"{m} batch {bs} (fit_method, 1 epoch on {n_sub} rows)",
                              note=f"{n_sub / n / t.wall:.4g} full-data epochs/s (incl. validation and embedding)"))
    return rows


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = float("nan")
    with contextlib.suppress(OSError, ValueError):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = ""
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    return f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB{gpu}; load average {os.getloadavg()[0]:.1f} at start"


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """CLI (module docstring). Returns the result table."""
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=1.0,
                    help="fraction of lung scale: spots × scale, dimensions × sqrt(scale) (tests: 0.01)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    ap.add_argument("--naive-fits", type=int, default=None,
                    help="naive fits timed per task, ring probes: K fits, probes: the first K folds (default all; "
                         "0 = none)")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive comparators of every stage")
    ap.add_argument("--threads", type=int, default=None, help="BLAS/torch threads (default: the libraries' own)")
    ap.add_argument("--methods", default="comm,simclr,byol,simsiam,barlow_twins,vicreg,dim,dcca",
                    help="methods of the align stage")
    ap.add_argument("--align-steps", type=int, default=50, help="optimiser steps timed per method and batch")
    ap.add_argument("--mem-limit-gib", type=float, default=8.0, help="memory limit of the largest-batch search")
    ap.add_argument("--device", default="auto", help="align stage: cpu, cuda or auto")
    ap.add_argument("--logreg-cs", default=None,
                    help="probes stage: comma-separated C grid of the workflow's probe (default: the config default "
                         "grid, chosen by inner CV); one value = one fit per fold, e.g. 1.0 (the large-data setting)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the table as TSV")
    ap.add_argument("--log", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars between the figures
    setup_logging(args.log, level=logging.WARNING)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = sorted(set(stages) - set(STAGES))
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {STAGES}")
    limiter = contextlib.nullcontext()
    if args.threads:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(limits=args.threads)
    size = scaled(args.scale)
    print(f"machine: {machine()}")
    print(f"data: {size} (scale {args.scale:g}), threads {args.threads or 'default'}")
    rows = []
    with limiter:
        with Timer() as t:
            data = synthetic_dataset(seed=args.seed, **size)
            adata = data.anndata()
        rows.append(t.row("data", "synthetic_dataset", note=f"{len(data.obs):,} spots, IMG {data.img.shape[1]}-d, "
                                                            f"GEX {data.gex.shape[1]}-d, {data.obs.region.nunique()} classes"))
        naive_fits = 0 if args.no_naive else args.naive_fits
        for stage in stages:
            print(f"... {stage}", flush=True)
            if stage == "rings":
                rows += stage_rings(data, adata, naive=not args.no_naive)
            elif stage == "ring_probes":
                rows += stage_ring_probes(data, adata, naive_fits, args.seed)
            elif stage == "probes":
                cs = [float(c) for c in args.logreg_cs.split(",")] if args.logreg_cs else None
                rows += stage_probes(data, adata, naive_fits, args.seed, logreg_cs=cs)
            elif stage == "align":
                methods = [m.strip() for m in args.methods.split(",") if m.strip()]
                rows += stage_align(data, methods, args.device, args.align_steps, args.mem_limit_gib, args.threads,
                                    args.seed)
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    with pd.option_context("display.max_colwidth", 90, "display.width", 250, "display.max_rows", 200):
        print(df.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, sep="\t", index=False)
    return df
