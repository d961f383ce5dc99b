"""Spatial consistency: do spots that are close in the tissue look alike in an embedding?

The reference's script for this analysis is missing; only its intent survives
(``examples/example_spatial_consistency.py``, docs/reference.md#spatial-consistency): positives are the k nearest spots of the same
slide, negatives are pairs of the same slide farther apart than a percentile of the within-slide distances,
balanced, a logistic-regression classifier on pair features, CV grouped by slide, and F1 / accuracy /
ROC-AUC (mean ± sd over folds). This module implements that protocol:

1. **Positive pairs** (close): for every spot, its ``k`` nearest spots of the same slide (Euclidean distance of
   ``obs[['x_um', 'y_um']]``, µm; ``sklearn.neighbors.NearestNeighbors``); unordered pairs, duplicates removed.
2. **Negative pairs** (far): pairs of the same slide whose distance exceeds that slide's
   ``far_percentile``-th percentile of all within-slide pair distances (exact from ``scipy.spatial.distance.pdist``
   up to :data:`MAX_EXACT_PAIRS` pairs, else estimated on that many random pairs), drawn uniformly at random
   (rejection sampling, seeded).
3. **Balance within each slide**: a slide contributes min(#positives, #available negatives) of each class
   (the surplus of the larger class is subsampled, counted in the log), so neither the class ratio nor the
   slide identity can be exploited. ``max_pairs_per_slide`` optionally caps the pairs per class and slide.
4. **Pair features** (``pair_features``): the embedding is first standardised per feature over all spots
   (``standardize``); then for a pair (i, j): ``absdiff`` = |e_i − e_j|, ``product`` = e_i ⊙ e_j (both
   symmetric in i, j; the usual features of pair classifiers), ``concat`` = [e_i ‖ e_j] in random order (the
   reference example's feature), ``cosine`` = cos(e_i, e_j), ``sqdist`` = ‖e_i − e_j‖². Default
   ``[absdiff, product]``: a linear classifier on ``concat`` alone is additive in the two spots and cannot
   express "alike", so it measures little more than whether spots lie in typical near/far positions.
5. **Classifier**: ``StandardScaler`` → ``LogisticRegression(max_iter, random_state=seed)`` (reference:
   max_iter 1000, random_state 42), cross-validated with ``GroupKFold(min(n_folds, n_slides))`` grouped by
   slide (all pairs lie within one slide, so no slide is in both training and test folds). With a single
   slide grouping is impossible: ``StratifiedKFold`` is used and logged as a warning (``cv`` column says so).
   The pair features are float32 and each fold's fit starts from the previous fold's coefficients
   (:mod:`workflow_scripts.evaluation.linear_fits`): same scaler and L-BFGS tolerance, fewer iterations; the
   scores differ from float64 fits started at zero only within that tolerance (BENCHMARKS.md).
6. **Metrics** per fold: binary F1 (positive class = close), accuracy, ROC-AUC of the predicted probability.

Output (long, one row per metric × fold): ``metric, fold, value, n_train, n_test, n_pos, n_neg, cv, test_slides``
(comma-separated slides of the test fold); the CLI prepends ``dataset, embedding, seed``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.spatial.distance import pdist
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import GroupKFold, StratifiedKFold
from sklearn.neighbors import NearestNeighbors
from tqdm.auto import tqdm

from ..io import drop_invalid_rows, embedding_task_parser, json_arg, read_embedding, setup_logging, write_result_table
from .linear_fits import WarmStart, fit_logreg, standardize

log = logging.getLogger(__name__)

#: Defaults of ``config: spatial_consistency`` (the reference's values, docs/reference.md#spatial-consistency: k 5,
#: 80th percentile, 5 folds, max_iter 1000).
DEFAULTS = {
    "k": 5,
    "far_percentile": 80.0,
    "n_folds": 5,
    "pair_features": ["absdiff", "product"],
    "standardize": True,
    "max_iter": 1000,
    "max_pairs_per_slide": None,
}
PAIR_FEATURES = ("absdiff", "product", "concat", "cosine", "sqdist")
COLUMNS = ["metric", "fold", "value", "n_train", "n_test", "n_pos", "n_neg", "cv", "test_slides"]
#: Slides with more pairs than this estimate the far-distance percentile on this many random pairs.
MAX_EXACT_PAIRS = 5_000_000


def check_params(params: Mapping | None) -> dict:
    """Merge ``params`` over :data:`DEFAULTS`; ValueError naming an unknown/invalid key of ``config: spatial_consistency``."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"spatial_consistency: unknown parameter(s) {unknown}; allowed {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **params}
    if int(p["k"]) < 1:
        raise ValueError(f"spatial_consistency.k must be >= 1, got {p['k']!r}")
    if not 0 < float(p["far_percentile"]) < 100:
        raise ValueError(f"spatial_consistency.far_percentile must be in (0, 100), got {p['far_percentile']!r}")
    if int(p["n_folds"]) < 2:
        raise ValueError(f"spatial_consistency.n_folds must be >= 2, got {p['n_folds']!r}")
    bad = [f for f in p["pair_features"] if f not in PAIR_FEATURES]
    if bad or not p["pair_features"]:
        raise ValueError(f"spatial_consistency.pair_features: unknown {bad} or empty; choose from {PAIR_FEATURES}")
    if p["max_pairs_per_slide"] is not None and int(p["max_pairs_per_slide"]) < 1:
        raise ValueError("spatial_consistency.max_pairs_per_slide must be null or >= 1")
    return p


def knn_pairs(coords: np.ndarray, k: int) -> np.ndarray:
    """Unordered pairs (i < j) linking every point to its ``k`` nearest other points.

    ``coords``: (n, 2) positions (µm) of ONE slide. Returns (m, 2) int array, each pair once, sorted.
    When a slide has ≤ k spots every other spot is a neighbour.
    """
    n = len(coords)
    if n < 2:
        return np.empty((0, 2), dtype=int)
    kk = min(k, n - 1)
    nn = NearestNeighbors(n_neighbors=kk + 1).fit(coords)
    _, idx = nn.kneighbors(coords)
    rows = np.repeat(np.arange(n), kk)
    cols = idx[:, 1:].ravel()
    # a duplicate position can put the point itself among the neighbours instead of column 0: drop self-pairs
    ok = rows != cols
    pairs = np.sort(np.stack([rows[ok], cols[ok]], axis=1), axis=1)
    return np.unique(pairs, axis=0)


def far_threshold(coords: np.ndarray, percentile: float, rng: np.random.Generator) -> float:
    """The ``percentile``-th percentile (µm) of the pairwise distances of one slide's spots (module docstring)."""
    n = len(coords)
    if n * (n - 1) // 2 <= MAX_EXACT_PAIRS:
        return float(np.percentile(pdist(coords), percentile))
    i = rng.integers(0, n, MAX_EXACT_PAIRS)
    j = rng.integers(0, n, MAX_EXACT_PAIRS)
    ok = i != j
    return float(np.percentile(np.linalg.norm(coords[i[ok]] - coords[j[ok]], axis=1), percentile))


def far_pairs(coords: np.ndarray, threshold: float, n_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n_pairs`` distinct unordered pairs (i < j) of one slide with distance > ``threshold`` (µm).

    Exhaustive (then a random subset) when the slide has ≤ :data:`MAX_EXACT_PAIRS` pairs, otherwise rejection
    sampling of random pairs. Returns (m, 2) with m ≤ n_pairs (fewer when not enough far pairs exist).
    """
    n = len(coords)
    if n < 2 or n_pairs <= 0:
        return np.empty((0, 2), dtype=int)
    if n * (n - 1) // 2 <= MAX_EXACT_PAIRS:
        d = pdist(coords)
        iu = np.triu_indices(n, k=1)  # same order as pdist
        cand = np.flatnonzero(d > threshold)
        take = rng.choice(cand, size=min(n_pairs, len(cand)), replace=False) if len(cand) else cand
        return np.stack([iu[0][take], iu[1][take]], axis=1)  # triu order: i < j
    found: set = set()
    for _ in range(100):
        m = 4 * (n_pairs - len(found)) + 16
        i, j = rng.integers(0, n, m), rng.integers(0, n, m)
        ok = (i != j) & (np.linalg.norm(coords[i] - coords[j], axis=1) > threshold)
        for a, b in zip(np.minimum(i[ok], j[ok]), np.maximum(i[ok], j[ok])):
            found.add((int(a), int(b)))
            if len(found) >= n_pairs:
                break
        if len(found) >= n_pairs:
            break
    return np.array(sorted(found), dtype=int).reshape(-1, 2)


def sample_pairs(coords: np.ndarray, slides: np.ndarray, params: Mapping, seed: int):
    """Balanced close/far pairs within slides (module docstring, steps 1–3).

    ``coords`` (n, 2) µm, ``slides`` (n,) slide ids. Returns ``(pairs (m, 2) int, label (m,) 1 = close / 0 = far,
    slide (m,))`` with equal numbers of each class per slide. Raises ValueError when no slide yields a pair.
    """
    p = check_params(params)
    rng = np.random.default_rng(seed)
    coords = np.asarray(coords, dtype=float)
    slides = np.asarray(slides).astype(str)
    out_pairs, out_y, out_s = [], [], []
    cap = p["max_pairs_per_slide"]
    for s in sorted(set(slides)):
        idx = np.flatnonzero(slides == s)
        c = coords[idx]
        pos = knn_pairs(c, int(p["k"]))
        if len(pos) == 0:
            log.warning("slide %s: %d spot(s), no pair; slide skipped", s, len(idx))
            continue
        thr = far_threshold(c, float(p["far_percentile"]), rng)
        neg = far_pairs(c, thr, len(pos), rng)
        m = min(len(pos), len(neg))
        if cap is not None:
            m = min(m, int(cap))
        if m == 0:
            log.warning("slide %s: no pair farther than %.1f um; slide skipped", s, thr)
            continue
        if len(pos) > m or len(neg) > m:
            log.info("slide %s: %d close and %d far pairs, %d of each kept (balanced; far > %.1f um = %g-th pct)",
                     s, len(pos), len(neg), m, thr, p["far_percentile"])
        else:
            log.info("slide %s: %d close and %d far pairs (far > %.1f um)", s, m, m, thr)
        pos = pos[rng.choice(len(pos), m, replace=False)] if len(pos) > m else pos
        neg = neg[rng.choice(len(neg), m, replace=False)] if len(neg) > m else neg
        out_pairs += [idx[pos], idx[neg]]
        out_y += [np.ones(m, dtype=int), np.zeros(m, dtype=int)]
        out_s += [np.full(2 * m, s)]
    if not out_pairs:
        raise ValueError("spatial consistency: no slide has both close and far pairs (too few spots per slide?)")
    return np.concatenate(out_pairs), np.concatenate(out_y), np.concatenate(out_s)


def pair_features(emb: np.ndarray, pairs: np.ndarray, kinds: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """Features of pairs (module docstring, step 4): ``emb`` (n, d), ``pairs`` (m, 2) → (m, F)."""
    a, b = emb[pairs[:, 0]], emb[pairs[:, 1]]
    feats = []
    for k in kinds:
        if k == "absdiff":
            feats.append(np.abs(a - b))
        elif k == "product":
            feats.append(a * b)
        elif k == "concat":
            swap = rng.random(len(pairs)) < 0.5
            first = np.where(swap[:, None], b, a)
            second = np.where(swap[:, None], a, b)
            feats.append(np.hstack([first, second]))
        elif k == "cosine":
            na = np.linalg.norm(a, axis=1)
            nb = np.linalg.norm(b, axis=1)
            feats.append(((a * b).sum(axis=1) / np.maximum(na * nb, 1e-12))[:, None])
        elif k == "sqdist":
            feats.append(((a - b) ** 2).sum(axis=1)[:, None])
        else:
            raise ValueError(f"unknown pair feature {k!r}; choose from {PAIR_FEATURES}")
    return np.hstack(feats)


def spatial_consistency(emb: np.ndarray, coords: np.ndarray, slides: np.ndarray, params: Mapping | None = None,
                        seed: int = 0) -> pd.DataFrame:
    """Close-vs-far pair classification scores of an embedding (module docstring).

    Parameters
    ----------
    emb : (n, d) embedding, finite, rows aligned with ``coords`` and ``slides``.
    coords : (n, 2) spot centres in µm (``obs[['x_um', 'y_um']]``).
    slides : (n,) slide id of every spot.
    params : ``config: spatial_consistency`` (:data:`DEFAULTS`).
    seed : pair sampling, ``concat`` order and the classifier's random_state.

    Returns the long table with columns :data:`COLUMNS` (metrics ``f1``, ``accuracy``, ``roc_auc``).
    Raises ValueError for mismatched shapes, non-finite embeddings or when no pair can be formed.
    """
    p = check_params(params)
    emb = np.asarray(emb, dtype=np.float64)
    coords = np.asarray(coords, dtype=np.float64)
    slides = np.asarray(slides).astype(str)
    if emb.ndim != 2 or not (len(emb) == len(coords) == len(slides)):
        raise ValueError(f"embedding {emb.shape}, coords {coords.shape} and slides {slides.shape} must have equal rows")
    if not np.isfinite(emb).all():
        raise ValueError("embedding has NaN/inf values; drop those rows first (io.drop_invalid_rows)")
    if p["standardize"]:
        sd = emb.std(axis=0)
        emb = (emb - emb.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    pairs, y, pslide = sample_pairs(coords, slides, p, seed)
    rng = np.random.default_rng(seed + 1)
    X = pair_features(emb.astype(np.float32), pairs, p["pair_features"], rng)
    n_slides = len(set(pslide))
    if n_slides >= 2:
        n_splits = min(int(p["n_folds"]), n_slides)
        if n_splits < int(p["n_folds"]):
            log.warning("only %d slides with pairs: %d folds instead of %d", n_slides, n_splits, p["n_folds"])
        splits = list(GroupKFold(n_splits=n_splits).split(X, y, groups=pslide))
        cv = "group_slide"
    else:
        log.warning("only one slide: folds cannot be grouped by slide; StratifiedKFold(%d) over pairs "
                    "(close and far pairs of the same spots may fall in different folds)", p["n_folds"])
        splits = list(StratifiedKFold(int(p["n_folds"]), shuffle=True, random_state=seed).split(X, y))
        cv = "stratified_pairs"
    rows = []
    warm = WarmStart()
    for fold, (tr, te) in enumerate(tqdm(splits, desc="spatial consistency folds", leave=False)):
        if len(set(y[tr])) < 2 or len(set(y[te])) < 2:
            log.warning("fold %d: a class is missing in training or test pairs; skipped", fold)
            continue
        Ztr, Zte = standardize(X[tr], X[te])
        clf = fit_logreg(Ztr, y[tr], max_iter=int(p["max_iter"]), random_state=seed, warm=warm)
        prob = clf.predict_proba(Zte)[:, 1]
        pred = (prob >= 0.5).astype(int)
        n_pos, n_neg = int(y[te].sum()), int((1 - y[te]).sum())
        test_slides = ",".join(sorted(set(pslide[te])))
        for metric, value in (("f1", f1_score(y[te], pred)), ("accuracy", accuracy_score(y[te], pred)),
                              ("roc_auc", roc_auc_score(y[te], prob))):
            rows.append(dict(metric=metric, fold=fold, value=float(value), n_train=len(tr), n_test=len(te),
                             n_pos=n_pos, n_neg=n_neg, cv=cv, test_slides=test_slides))
        log.info("fold %d: test slides %s, ROC-AUC %.4f (%d L-BFGS iterations)", fold, test_slides, rows[-1]["value"],
                 int(np.max(clf.n_iter_)))
    df = pd.DataFrame(rows, columns=COLUMNS)
    for m, g in df.groupby("metric"):
        log.info("%s: mean %.4f sd %.4f over %d folds", m, g["value"].mean(), g["value"].std(ddof=0), len(g))
    return df


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m workflow_scripts.evaluation.spatial_consistency --embedding E.parquet --spots spots.h5ad --dataset D
    --name NAME --seed S --params JSON --out OUT.tsv --log LOG``.

    Spots without a finite embedding row or absent from the spots table are dropped (counted in the log).
    Writes :func:`spatial_consistency`'s table with leading columns ``dataset, embedding, seed``.
    """
    import anndata as ad

    ap = embedding_task_parser("python -m workflow_scripts.evaluation.spatial_consistency", __doc__.split("\n")[0])
    ap.add_argument("--params", default="{}", help="JSON dict, config `spatial_consistency`")
    args = ap.parse_args(argv)
    setup_logging(args.log)
    params = json_arg(args.params, "--params")
    emb = drop_invalid_rows(read_embedding(args.embedding), f"embedding {args.name}")
    if not Path(args.spots).exists():
        raise FileNotFoundError(f"spots AnnData not found: {args.spots} (run the prepare rule first)")
    obs = ad.read_h5ad(args.spots, backed="r").obs
    missing = [c for c in ("x_um", "y_um", "slide") if c not in obs.columns]
    if missing:
        raise KeyError(f"{args.spots}: obs lacks {missing} (see workflow_scripts/data/model.py)")
    obs.index = obs.index.astype(str)
    common = emb.index.intersection(obs.index, sort=False)
    if len(common) < len(emb) or len(common) < len(obs):
        log.warning("%d embedding rows without a spot and %d spots without an embedding row dropped",
                    len(emb) - len(common), len(obs) - len(common))
    emb, obs = emb.loc[common], obs.loc[common]
    df = spatial_consistency(emb.to_numpy(), obs[["x_um", "y_um"]].to_numpy(dtype=float),
                             obs["slide"].astype(str).to_numpy(), params, args.seed)
    write_result_table(df, args.out, args.dataset, args.name, args.seed)


if __name__ == "__main__":
    main()
