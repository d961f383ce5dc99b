"""Partial information decomposition (PID) of a task's label with respect to the GEX and IMG embeddings.

For a target Y and two sources X1 (GEX) and X2 (IMG), the mutual information I(Y; X1, X2) splits into four
non-negative parts (Williams & Beer 2010, arXiv:1004.2515):

    I(Y; X1, X2) = R + U1 + U2 + S,     I(Y; X1) = R + U1,     I(Y; X2) = R + U2

(R redundancy, U1 / U2 unique information of X1 / X2, S synergy). The split is fixed by one more definition; here
the BROJA measure (Bertschinger, Rauh, Olbrich, Jost & Ay 2014, "Quantifying unique information", Entropy 16:2161,
doi:10.3390/e16042161), the one the paper's SIS argument rests on:

    U1 = min_{q ∈ Δ_p} I_q(Y; X1 | X2),   Δ_p = {q(x1, x2, y) : q(x1, y) = p(x1, y), q(x2, y) = p(x2, y)}.

Every I_q(Y; X1 | X2), I_q(Y; X2 | X1) and I_q(Y; X1, X2) is minimised by the same q*, since on Δ_p they differ by
the fixed I(Y; X2), I(Y; X1). So one convex programme gives all four terms:

    U = min_{q ∈ Δ_p} I_q(Y; X1, X2)  (the union information R + U1 + U2),
    S = I_p(Y; X1, X2) − U,  U1 = U − I(Y; X2),  U2 = U − I(Y; X1),  R = I(Y; X1) + I(Y; X2) − U.

The programme is the one of Liang et al. 2023 ("Quantifying & modeling multimodal interactions: an information
decomposition framework", NeurIPS 2023, arXiv:2302.12247, their CVX estimator): minimise
Σ q(x1,x2,y) log[q(x1,x2,y) / (q(x1,x2) p(y))] — a relative entropy, jointly convex in q — over the polytope Δ_p.
It is solved by ``cvxpy`` (exponential-cone solver Clarabel). dit's ``PID_BROJA`` gives the same numbers on small
alphabets (tests) but takes minutes on 6 × 6 × 4 alphabets, where this takes a tenth of a second.

Continuous embeddings are discretised first (:func:`discretise`: k-means with k clusters on the standardised
embedding), so every estimate here is the *plug-in* PID of the clustered embeddings: its mutual informations are
biased upwards by about (cells − 1)(|Y| − 1) / (2 N ln 2) bits (Miller 1955) for N spots — about 0.04 bits for
36 joint cells, |Y| = 2 and N = 1,200 — and the clustering can only lose information (data processing inequality).
Fused embeddings are clustered into k² clusters, the number of cells of the (GEX, IMG) pair, so that
I(Y; fused) and I(Y; GEX, IMG) have the same alphabet size and comparable bias.

All quantities are in bits.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: BROJA terms, in the order of the stacked bars.
PID_TERMS = ("redundancy", "unique_gex", "unique_img", "synergy")
#: Columns of the PID table (:func:`pid_table`).
PID_COLUMNS = [
    "dataset", "task", "embedding", "seed", "n_spots", "k", "k_fused", "h_y", "i_gex", "i_img", "i_joint",
    *PID_TERMS, "i_fused", "gain_captured",
]
#: Row name of the decomposition of the unimodal pair in the PID table.
PAIR = "unimodal_pair"
PID_DEFAULTS = {"k": 6, "y_bins": 4, "n_init": 10, "seed": 0, "max_spots": None}


# ----------------------------------------------------------------------------------------------------
# information on a discrete joint distribution
# ----------------------------------------------------------------------------------------------------
def _check_joint(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=float)
    if p.ndim != 3:
        raise ValueError(f"joint distribution must be 3-D (|X1|, |X2|, |Y|), got shape {p.shape}")
    if (p < 0).any() or not np.isfinite(p).all():
        raise ValueError("joint distribution has negative or non-finite entries")
    total = p.sum()
    if not np.isclose(total, 1.0, atol=1e-6):
        raise ValueError(f"joint distribution sums to {total:.6g}, not 1")
    return p / total


def mutual_information(pxy: np.ndarray) -> float:
    """I(X; Y) in bits of a 2-D joint probability table ``pxy`` (|X|, |Y|) (Shannon 1948).

    Raises ValueError when ``pxy`` is not 2-D.
    """
    pxy = np.asarray(pxy, dtype=float)
    if pxy.ndim != 2:
        raise ValueError(f"pxy must be 2-D, got shape {pxy.shape}")
    px = pxy.sum(axis=1, keepdims=True)
    py = pxy.sum(axis=0, keepdims=True)
    m = pxy > 0
    return float(np.sum(pxy[m] * np.log2(pxy[m] / (px @ py)[m])))


def entropy(p: np.ndarray) -> float:
    """Shannon entropy H in bits of a probability vector or table ``p``."""
    p = np.asarray(p, dtype=float).ravel()
    p = p[p > 0]
    return float(-np.sum(p * np.log2(p)))


def broja_union_information(p: np.ndarray) -> float:
    """Union information min_{q ∈ Δ_p} I_q(Y; X1, X2) in bits (module docstring; Liang et al. 2023).

    Parameters
    ----------
    p : array of shape (|X1|, |X2|, |Y|), a joint probability table (sums to 1).

    Returns the minimum in bits. Solved with cvxpy (Clarabel); raises RuntimeError naming the solver status when the
    solver does not reach an optimal solution, ValueError for an invalid ``p``.
    """
    import cvxpy as cp

    p = _check_joint(p)
    # keep only the outcomes of each variable that occur: zero rows would only add variables fixed at 0
    k1, k2, ky = p.shape
    py = p.sum(axis=(0, 1))
    p1y = p.sum(axis=1)  # (|X1|, |Y|)
    p2y = p.sum(axis=0)  # (|X2|, |Y|)
    # q as a (|X1|·|X2|, |Y|) matrix, row index = x1 * |X2| + x2 (C order)
    q = cp.Variable((k1 * k2, ky), nonneg=True)
    qx = cp.sum(q, axis=1)  # q(x1, x2)
    ref = cp.reshape(qx, (k1 * k2, 1), order="C") @ py.reshape(1, ky)  # q(x1, x2) p(y)
    sum_x2 = np.kron(np.eye(k1), np.ones((1, k2)))  # (|X1|, |X1|·|X2|): sums over x2
    sum_x1 = np.kron(np.ones((1, k1)), np.eye(k2))  # (|X2|, |X1|·|X2|): sums over x1
    problem = cp.Problem(cp.Minimize(cp.sum(cp.rel_entr(q, ref))), [sum_x2 @ q == p1y, sum_x1 @ q == p2y])
    problem.solve(solver=cp.CLARABEL)
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise RuntimeError(f"BROJA programme: solver status {problem.status!r} (alphabet sizes {p.shape})")
    return max(float(problem.value) / np.log(2), 0.0)


def pid_broja(p: np.ndarray) -> dict:
    """BROJA partial information decomposition of Y with respect to (X1, X2), in bits.

    Parameters
    ----------
    p : array of shape (|X1|, |X2|, |Y|), the joint probability table p(x1, x2, y).

    Returns
    -------
    dict with ``redundancy``, ``unique_1``, ``unique_2``, ``synergy`` (the BROJA terms, module docstring; tiny
    negative values from the solver tolerance are clipped to 0) and ``i_1`` = I(Y; X1), ``i_2`` = I(Y; X2),
    ``i_12`` = I(Y; X1, X2), ``h_y`` = H(Y). Source: Bertschinger et al. 2014 (doi:10.3390/e16042161), solved as in
    Liang et al. 2023 (arXiv:2302.12247). Raises ValueError for an invalid ``p``.
    """
    p = _check_joint(p)
    k1, k2, ky = p.shape
    i1 = mutual_information(p.sum(axis=1))
    i2 = mutual_information(p.sum(axis=0))
    i12 = mutual_information(p.reshape(k1 * k2, ky))
    # a source pair without information about Y, or a constant Y: nothing to split
    if i12 <= 1e-12:
        union = 0.0
    else:
        union = min(broja_union_information(p), i12)
    union = min(max(union, i1, i2), i1 + i2)  # the union lies in [max(I1, I2), I1 + I2] (Bertschinger et al. 2014)
    return dict(
        redundancy=max(i1 + i2 - union, 0.0),
        unique_1=max(union - i2, 0.0),
        unique_2=max(union - i1, 0.0),
        synergy=max(i12 - union, 0.0),
        i_1=i1, i_2=i2, i_12=i12, h_y=entropy(p.sum(axis=(0, 1))),
    )


def joint_from_samples(x1: np.ndarray, x2: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Empirical joint table p(x1, x2, y) of three (n,) arrays of discrete codes (any hashable values).

    Returns an array of shape (|X1|, |X2|, |Y|) over the values that occur (sorted). Raises ValueError when the
    arrays differ in length or are empty.
    """
    x1, x2, y = (np.asarray(a) for a in (x1, x2, y))
    if not (len(x1) == len(x2) == len(y)) or len(y) == 0:
        raise ValueError(f"x1, x2, y must be non-empty and of equal length, got {len(x1)}, {len(x2)}, {len(y)}")
    codes = [np.unique(a, return_inverse=True) for a in (x1, x2, y)]
    shape = tuple(len(u) for u, _ in codes)
    p = np.zeros(shape)
    np.add.at(p, tuple(inv.ravel() for _, inv in codes), 1.0)
    return p / p.sum()


def plugin_mi(x: np.ndarray, y: np.ndarray) -> float:
    """Plug-in I(X; Y) in bits of two (n,) arrays of discrete codes."""
    p = joint_from_samples(x, np.zeros(len(np.asarray(x)), dtype=int), y)[:, 0, :]
    return mutual_information(p)


# ----------------------------------------------------------------------------------------------------
# discretisation
# ----------------------------------------------------------------------------------------------------
def discretise(X: np.ndarray, k: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """Cluster codes of the rows of ``X`` (n, d): k-means (scikit-learn, Lloyd; Lloyd 1982) on the standardised
    columns with ``n_init`` restarts and ``random_state=seed`` (deterministic), on one thread.

    A 1-D ``X`` is treated as (n, 1). ``k`` is clipped to the number of distinct rows (logged). Returns (n,) int
    codes in [0, k). Raises ValueError for k < 1 or non-finite values.
    """
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not np.isfinite(X).all():
        raise ValueError("discretise: X has NaN/inf values; drop those rows first")
    n_distinct = len(np.unique(X, axis=0))
    k_eff = min(int(k), n_distinct)
    if k_eff < k:
        log.info("discretise: k clipped from %d to %d distinct rows", k, k_eff)
    if k_eff <= 1:
        return np.zeros(len(X), dtype=int)
    from threadpoolctl import threadpool_limits

    Xs = StandardScaler().fit_transform(X)
    km = KMeans(n_clusters=k_eff, n_init=int(n_init), random_state=int(seed))
    with threadpool_limits(limits=1):  # one job = one core (the rule's threads); no OpenMP oversubscription
        return km.fit_predict(Xs).astype(int)


def discretise_target(y: pd.Series | pd.DataFrame | np.ndarray, y_bins: int, seed: int = 0,
                      n_init: int = 10) -> np.ndarray:
    """Discrete target codes: class labels as they are; a regression target (numeric (n,) or (n, m)) clustered
    into ``y_bins`` k-means clusters (:func:`discretise`). Returns (n,) int codes."""
    if isinstance(y, pd.Series) and not pd.api.types.is_numeric_dtype(y):
        return pd.factorize(y.astype(str), sort=True)[0]
    values = np.asarray(y, dtype=float)
    return discretise(values, y_bins, seed=seed, n_init=n_init)


# ----------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------
def pid_of_task(
    c_gex: np.ndarray, c_img: np.ndarray, c_y: np.ndarray, fused_codes: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict, dict]:
    """PID of one task from discrete codes, plus I(Y; fused) per fused embedding.

    Parameters
    ----------
    c_gex, c_img, c_y : (n,) discrete codes of the GEX cluster, IMG cluster and target of the same spots.
    fused_codes : {name: (n,) cluster codes of a fused embedding on the same spots}.

    Returns ``(terms, fused)``: ``terms`` as :func:`pid_broja` with keys renamed to ``unique_gex``/``unique_img``,
    ``i_gex``, ``i_img``, ``i_joint``; ``fused`` = {name: I(Y; fused) in bits}.
    """
    r = pid_broja(joint_from_samples(c_gex, c_img, c_y))
    terms = dict(redundancy=r["redundancy"], unique_gex=r["unique_1"], unique_img=r["unique_2"],
                 synergy=r["synergy"], i_gex=r["i_1"], i_img=r["i_2"], i_joint=r["i_12"], h_y=r["h_y"])
    fused = {name: plugin_mi(c, c_y) for name, c in (fused_codes or {}).items()}
    return terms, fused


def gain_captured(i_fused: float, i_gex: float, i_img: float, i_joint: float) -> float:
    """Share of the information the pair adds over its better member that a fused embedding holds:
    (I(Y; F) − max(I(Y; X1), I(Y; X2))) / (I(Y; X1, X2) − max(I(Y; X1), I(Y; X2))).

    1 = the fused embedding keeps everything the pair adds (all of the synergy and the weaker modality's unique
    information); 0 = no more than the best modality; negative = less. NaN when the pair adds < 0.01 bits.
    """
    best = max(i_gex, i_img)
    avail = i_joint - best
    return float((i_fused - best) / avail) if avail >= 0.01 else float("nan")


def pid_table(
    dataset: str,
    z_gex: np.ndarray,
    z_img: np.ndarray,
    targets: Mapping[str, tuple[np.ndarray, pd.Series | pd.DataFrame]],
    fused: Mapping[tuple[str, int], np.ndarray] | None = None,
    params: Mapping | None = None,
) -> pd.DataFrame:
    """PID per task of the (GEX, IMG) pair, and I(Y; fused) per fused embedding, on k-means clusters.

    Parameters
    ----------
    dataset : name written in the ``dataset`` column.
    z_gex, z_img : (n, d_gex), (n, d_img) embeddings of the same n spots (rows paired, finite).
    targets : {task: (rows, y)} with ``rows`` (m,) int indices into the n spots and ``y`` the task's target for
        those rows (labels as a Series, or a numeric (m,) / (m, outputs) regression target).
    fused : {(embedding, seed): (n, d) fused embedding, rows paired with ``z_gex``}.
    params : ``{k, y_bins, n_init, seed, max_spots}`` (config ``pid``; :data:`PID_DEFAULTS`); ``max_spots`` caps
        the spots per task (seeded subsample, logged) — the cost grows with n only through k-means.

    Returns the table with :data:`PID_COLUMNS`: per task one row ``embedding = unimodal_pair`` (seed NaN, i_fused
    NaN) with the decomposition, then one row per fused embedding × seed with ``i_fused`` (its k²-cluster codes)
    and :func:`gain_captured`; the pair's columns are repeated there. The clustering of GEX and IMG is done once
    on all n spots (so every task shares it); the fused embeddings are clustered once each.
    """
    p = {**PID_DEFAULTS, **dict(params or {})}
    unknown = sorted(set(p) - set(PID_DEFAULTS))
    if unknown:
        raise ValueError(f"config pid: unknown key(s) {unknown}; allowed: {sorted(PID_DEFAULTS)}")
    k, seed, n_init = int(p["k"]), int(p["seed"]), int(p["n_init"])
    if k < 2:
        raise ValueError(f"config pid.k must be >= 2, got {k}")
    z_gex, z_img = np.asarray(z_gex), np.asarray(z_img)
    if len(z_gex) != len(z_img):
        raise ValueError(f"GEX has {len(z_gex)} rows but IMG has {len(z_img)}")
    c_gex = discretise(z_gex, k, seed, n_init)
    c_img = discretise(z_img, k, seed, n_init)
    k_fused = k * k
    c_fused = {key: discretise(z, k_fused, seed, n_init) for key, z in (fused or {}).items()}
    rng = np.random.default_rng(seed)
    rows = []
    for task, (idx, y) in targets.items():
        idx = np.asarray(idx, dtype=int)
        c_y = discretise_target(y, int(p["y_bins"]), seed, n_init)
        if p["max_spots"] is not None and len(idx) > int(p["max_spots"]):
            keep = np.sort(rng.choice(len(idx), size=int(p["max_spots"]), replace=False))
            log.info("task %s: PID on a seeded subsample of %d of %d spots (pid.max_spots)", task, len(keep),
                     len(idx))
            idx, c_y = idx[keep], c_y[keep]
        terms, f = pid_of_task(c_gex[idx], c_img[idx], c_y, {key: c[idx] for key, c in c_fused.items()})
        base = dict(dataset=dataset, task=task, n_spots=len(idx), k=k, k_fused=k_fused, **terms)
        rows.append(dict(base, embedding=PAIR, seed=np.nan, i_fused=np.nan, gain_captured=np.nan))
        log.info("task %s (%d spots, H(Y) %.3f bits): R %.3f, U_gex %.3f, U_img %.3f, S %.3f bits", task, len(idx),
                 terms["h_y"], terms["redundancy"], terms["unique_gex"], terms["unique_img"], terms["synergy"])
        for (name, s), i_f in f.items():
            rows.append(dict(base, embedding=name, seed=s, i_fused=i_f,
                             gain_captured=gain_captured(i_f, terms["i_gex"], terms["i_img"], terms["i_joint"])))
    return pd.DataFrame(rows, columns=PID_COLUMNS)


def pid_truth_table(dataset: str, joints: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Planted PID terms: :func:`pid_broja` of each task's exact joint p(x1, x2, y) of the latent factors each
    modality sees (:func:`workflow_scripts.data.synthetic.task_joint`).

    Returns columns ``dataset, task, h_y, i_gex, i_img, i_joint, redundancy, unique_gex, unique_img, synergy``
    (bits).
    """
    rows = []
    for task, p in joints.items():
        r = pid_broja(p)
        rows.append(dict(dataset=dataset, task=task, h_y=r["h_y"], i_gex=r["i_1"], i_img=r["i_2"], i_joint=r["i_12"],
                         redundancy=r["redundancy"], unique_gex=r["unique_1"], unique_img=r["unique_2"],
                         synergy=r["synergy"]))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------
def _cmd_estimate(a) -> None:
    from ..io import drop_invalid_rows, intersect_tables, json_arg, read_embedding
    from .probes import read_spots, task_targets

    params = json_arg(a.params, "--params")
    tasks = json_arg(a.tasks, "--tasks")
    fused_names = json_arg(a.fused_names, "--fused-names") if a.fused_names else []
    if len(fused_names) != len(a.fused or []):
        raise SystemExit(f"--fused-names lists {len(fused_names)} entries for {len(a.fused or [])} --fused files")
    tables = {"GEX": drop_invalid_rows(read_embedding(a.gex), f"GEX embedding {a.gex}", log),
              "IMG": drop_invalid_rows(read_embedding(a.img), f"IMG embedding {a.img}", log)}
    for (name, seed), path in zip(fused_names, a.fused or []):
        tables[f"{name} seed {seed}"] = drop_invalid_rows(read_embedding(path), f"{name} embedding {path}", log)
    adata = read_spots(a.spots)
    spot_ids = pd.DataFrame(index=adata.obs_names.astype(str))
    tables = intersect_tables({**tables, "spots": spot_ids}, log)
    ids = tables["GEX"].index
    sub = adata[ids]
    targets = {}
    for task, spec in tasks.items():
        y = task_targets(sub, task, spec, a.min_class_size)
        if y is None:
            continue
        targets[task] = (pd.Index(ids).get_indexer(y.index), y)
    fused = {(name, int(seed)): tables[f"{name} seed {seed}"].to_numpy(np.float64) for name, seed in fused_names}
    df = pid_table(a.dataset, tables["GEX"].to_numpy(np.float64), tables["IMG"].to_numpy(np.float64), targets,
                   fused, params)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out, sep="\t", index=False)
    log.info("wrote %d rows to %s", len(df), a.out)


def _cmd_truth(a) -> None:
    from ..data.synthetic import task_joints
    from ..io import json_arg

    params = json_arg(a.params, "--params")
    df = pid_truth_table(a.dataset, task_joints(params.get("generator") or {}, params.get("tasks") or []))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out, sep="\t", index=False)
    log.info("wrote the planted PID of %d tasks to %s", len(df), a.out)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI.

    ``python -m workflow_scripts.evaluation.pid estimate --gex G.parquet --img I.parquet --spots spots.h5ad
    --dataset D --tasks JSON --params JSON [--fused F.parquet ... --fused-names '[["cca", 0], ...]']
    [--min-class-size N] --out results/pid/D.tsv --log LOG`` writes :func:`pid_table`;

    ``python -m workflow_scripts.evaluation.pid truth --dataset D --params '{"generator": {...}, "tasks": [...]}'
    --out results/D/pid_truth.tsv --log LOG`` writes :func:`pid_truth_table` of a synthetic dataset.
    """
    from ..io import setup_logging

    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.evaluation.pid", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("estimate", help="PID of every task on k-means clusters of the embeddings")
    e.add_argument("--gex", required=True)
    e.add_argument("--img", required=True)
    e.add_argument("--spots", required=True)
    e.add_argument("--dataset", required=True)
    e.add_argument("--tasks", required=True, help="JSON {task: {type, label|obsm, exclude}}")
    e.add_argument("--params", default="{}", help=f"JSON, keys {sorted(PID_DEFAULTS)}")
    e.add_argument("--fused", nargs="*", default=[], help="fused embedding tables")
    e.add_argument("--fused-names", default=None, help="JSON list of [name, seed], one per --fused file")
    e.add_argument("--min-class-size", type=int, default=10)
    e.add_argument("--out", required=True)
    e.add_argument("--log", default=None)
    t = sub.add_parser("truth", help="planted PID of a synthetic dataset's tasks")
    t.add_argument("--dataset", required=True)
    t.add_argument("--params", required=True, help='JSON {"generator": {...}, "tasks": [label names]}')
    t.add_argument("--out", required=True)
    t.add_argument("--log", default=None)
    a = ap.parse_args(argv)
    setup_logging(a.log)
    {"estimate": _cmd_estimate, "truth": _cmd_truth}[a.cmd](a)


if __name__ == "__main__":
    main()


__all__ = [
    "PID_TERMS", "PID_COLUMNS", "PID_DEFAULTS", "PAIR", "mutual_information", "entropy", "broja_union_information",
    "pid_broja", "joint_from_samples", "plugin_mi", "discretise", "discretise_target", "pid_of_task",
    "gain_captured", "pid_table", "pid_truth_table",
]
