"""Spectral analysis of the cross-covariance between two views.

The paper's "spectral ceiling" argument: a CCA-like objective can only capture what is *linearly*
shared between the two unimodal embeddings, i.e. the directions of the whitened cross-covariance whose
singular values stand out of noise. This module measures that spectrum and how many directions carry
signal. The reference's ``spectral_analysis`` configuration is described in docs/reference.md#figures.

Definitions (for views X (n × p) and Y (n × q) of the same n spots, rows paired)
--------------------------------------------------------------------------------
* Centre each view; covariances Σxx = XᵀX/(n−1), Σyy, cross-covariance Σxy = XᵀY/(n−1).
* Whitening (``use_whitening: true``, reference config): Σxx = V diag(λ) Vᵀ; directions with
  λ_i ≤ ``rank_tol``·λ_max are dropped (rank-deficient views, e.g. L2-normalised or BatchNorm outputs;
  the count is logged); W_x = V diag((λ + ε)^(−1/2)) with the ridge ε = ``regularization``·mean(λ)
  (the reference's ``regularization: 1e-6``, made relative to the view's scale so that the result does not
  depend on units). Same for Y.
* Whitened cross-covariance T = W_xᵀ Σxy W_y (p' × q'); its singular values s_1 ≥ … ≥ s_r
  (r = min(p', q')) are the sample canonical correlations (Hotelling 1936; for ε → 0 they are invariant
  to any invertible linear map applied to either view). Without whitening (``use_whitening: false``) the
  spectrum of Σxy of the per-feature standardised views is used instead (not invariant).
* Permutation null of the spectrum (``n_permutations``, reference config 100): the pairing is destroyed by
  permuting the rows of Y; with the whitened bases computed once, each permutation costs one p'×n·n×q'
  product.
* Slides (``null_permutation``). ``global`` permutes across all spots, as the reference does; a direction that
  merely separates slides in both views (slide identity explains about a fifth of the GEX and a third of the
  IMG variance on the default HER2ST sections) then passes as paired signal, although it rests on as many
  independent units as there are slides. ``within_slide`` (default) treats the slide as a nuisance variable:
  each slide's mean is removed from both views (the regression of both sets on the nuisance in Winkler et al.,
  "Permutation inference for canonical correlation analysis", NeuroImage 2020), and the rows are permuted
  within each slide only (exchangeability blocks, Winkler et al., "Permutation inference for the general
  linear model", NeuroImage 2014; :func:`row_permutations`). The spectrum is then that of the within-slide
  canonical correlations, and the test asks whether spots are paired beyond their slide. Removing the slide
  means matters: with them left in, the between-slide part of the cross-covariance is the same in every
  within-slide permutation, a slide direction that ranks above a spot-level one stops the sequential test early,
  and the deflated residuals of the later ranks no longer follow the null (tests/test_spectral.py). For each rank k the null distribution of s_k gives the median and the α … 1−α quantile band drawn
  in the figure ("shuffled-pairing spectrum").
* Number of signal directions K: a sequential permutation test with deflation (in the spirit of Winkler et al.,
  "Permutation inference for canonical correlation analysis", NeuroImage 2020: test each canonical
  correlation on the residual after removing the earlier ones). For k = 1, 2, …:
  the first k−1 canonical pairs are projected out of both whitened views (X U_{≥k}, Y V_{≥k}), which makes
  s_k the *largest* singular value of the residual cross-covariance; its p-value compares it with the null of
  the largest residual singular value under the same B row permutations of the residual Y:
  p_k = (1 + #{b : s_max^(b) ≥ s_k}) / (1 + B). Testing stops at the first k with p_k ≥ α; K = k − 1.
  (Comparing s_k with the k-th value of the undeflated null, as in parallel analysis, over-counts: after
  k−1 signal directions the residual noise is not the null of the full problem.) Ranks after the first
  non-significant one are not tested (p-value NaN).
* Spectral gap: ``gap_at_k`` = s_K − s_{K+1} (the drop from the last signal direction to the first noise
  direction; NaN when K = 0 or K = r); ``largest_gap`` = max_k (s_k − s_{k+1}) and its rank.
  ``n_excess`` = #{k : s_k − median null_k > ``spectral_gap_threshold``} (reference config 0.01), a
  threshold-based count that does not depend on α.
* ``n_eval_samples`` (reference config 1000): the analysis uses a seeded random subset of that many spots
  (``null``: all spots). Note that the noise floor of sample canonical correlations grows with (p'+q')/n,
  which is why the permutation null, not a fixed threshold, decides significance.

Methods' projected views and held-out spots: a view trained to correlate (CCA, DCCA) exceeds the
shuffled-pairing null through overfitting on the spots it was trained on, when n is not much larger than the
view dimension. The views npz written by the align CLI carries ``fit_mask`` (True = spot used to fit the
interface); :func:`load_views` with ``rows="held_out"`` keeps only the spots with ``fit_mask == False`` and
concatenates them over several files (one per outer fold of the inductive protocol: each spot is held out in
exactly one fold), so the spectrum is measured on spots the interface never saw. ``rows="all"`` (the
transductive protocol of the study) keeps every row.

Outputs: a per-rank table (``rank, singular_value, null_median, null_lo, null_hi, p_value, significant``)
and a one-row summary (``n_significant, gap_at_k, largest_gap, largest_gap_rank, n_excess, sum_sq_significant,
top_singular_value, p_eff, q_eff, n, n_slides, null_permutation, rows``). The CLI writes both as one TSV (summary values repeated on every row).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..io import drop_invalid_rows, intersect_tables, read_embedding, setup_logging, json_arg

log = logging.getLogger(__name__)

#: Defaults of ``config: spectral``: the reference's values (docs/reference.md#figures: spectral_gap_threshold 0.01,
#: regularization 1e-6, n_permutations 100, use_whitening true), except ``n_eval_samples``: the reference uses 1000,
#: here ``None`` = all spots.
DEFAULTS = {
    "n_permutations": 100,
    "regularization": 1.0e-6,
    "rank_tol": 1.0e-8,
    "use_whitening": True,
    "n_eval_samples": None,
    "alpha": 0.05,
    "spectral_gap_threshold": 0.01,
    "null_permutation": "within_slide",
}
#: Permutation nulls (``config: spectral.null_permutation``): within each slide (default) or across all spots (reference).
NULLS = ("within_slide", "global")
#: Which rows of a views npz are analysed: every row, or only those with ``fit_mask == False``.
ROWS = ("all", "held_out")

TABLE_COLUMNS = [
    "rank", "singular_value", "null_median", "null_lo", "null_hi", "p_value", "significant",
]
SUMMARY_COLUMNS = [
    "n_significant", "gap_at_k", "largest_gap", "largest_gap_rank", "n_excess", "sum_sq_significant",
    "top_singular_value", "p_eff", "q_eff", "n", "n_slides", "null_permutation", "rows",
]


def check_params(params: Mapping | None) -> dict:
    """Merge ``params`` over :data:`DEFAULTS`; ValueError naming an unknown or invalid key of ``config: spectral``."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"spectral: unknown parameter(s) {unknown}; allowed {sorted(DEFAULTS)} (fix config `spectral`)")
    p = {**DEFAULTS, **params}
    if int(p["n_permutations"]) < 1:
        raise ValueError(f"spectral.n_permutations must be >= 1, got {p['n_permutations']!r}")
    if not 0 < float(p["alpha"]) < 1:
        raise ValueError(f"spectral.alpha must be in (0, 1), got {p['alpha']!r}")
    if float(p["regularization"]) < 0 or float(p["rank_tol"]) < 0:
        raise ValueError("spectral.regularization and spectral.rank_tol must be >= 0")
    if p["null_permutation"] not in NULLS:
        raise ValueError(f"spectral.null_permutation must be one of {list(NULLS)}, got {p['null_permutation']!r} "
                         "(fix config `spectral.null_permutation`)")
    if p["n_eval_samples"] is not None and int(p["n_eval_samples"]) < 3:
        raise ValueError(f"spectral.n_eval_samples must be null or >= 3, got {p['n_eval_samples']!r}")
    return p


def whitened_basis(x: np.ndarray, regularization: float = 1e-6, rank_tol: float = 1e-8,
                   whiten: bool = True, what: str = "view") -> np.ndarray:
    """Centred, whitened coordinates of a view: (n, p) → (n, p') with p' ≤ p.

    With ``whiten`` the result is X_c W (module docstring: eigen-decomposition of Σxx, directions with
    λ ≤ rank_tol·λ_max dropped and counted in the log, ridge ε = regularization·mean(λ)); scaled so that its
    covariance is ≈ I. Without ``whiten`` each feature is standardised (zero-variance features dropped, logged).
    Raises ValueError for fewer than 3 rows or when no direction has variance.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"{what}: need a 2-D array with >= 3 rows, got shape {x.shape}")
    n = x.shape[0]
    xc = x - x.mean(axis=0, keepdims=True)
    if not whiten:
        sd = xc.std(axis=0, ddof=1)
        keep = sd > 0
        if (~keep).sum():
            log.info("%s: %d of %d features have zero variance and are dropped", what, int((~keep).sum()), len(sd))
        if not keep.any():
            raise ValueError(f"{what}: no feature has non-zero variance")
        return xc[:, keep] / sd[keep]
    cov = xc.T @ xc / (n - 1)
    lam, vec = np.linalg.eigh(cov)
    lam = np.clip(lam, 0.0, None)
    if lam.max() <= 0:
        raise ValueError(f"{what}: all features are constant; the whitened cross-covariance is undefined")
    keep = lam > rank_tol * lam.max()
    n_drop = int((~keep).sum())
    if n_drop:
        log.info("%s: %d of %d covariance directions below %.1e x the largest eigenvalue dropped (rank %d)",
                 what, n_drop, len(lam), rank_tol, int(keep.sum()))
    lam, vec = lam[keep], vec[:, keep]
    eps = float(regularization) * float(lam.mean())
    return xc @ (vec / np.sqrt(lam + eps))


def _cross_sv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Singular values (descending) of aᵀb/(n−1) for centred, whitened a (n, p'), b (n, q')."""
    n = a.shape[0]
    return np.linalg.svd(a.T @ b / (n - 1), compute_uv=False)


@dataclass
class Spectrum:
    """Result of :func:`cross_spectrum`. ``singular_values`` (r,), ``null`` (B, r) permutation draws."""

    singular_values: np.ndarray
    null: np.ndarray
    p_values: np.ndarray
    n_significant: int
    alpha: float
    gap_threshold: float
    p_eff: int
    q_eff: int
    n: int
    summary: dict = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """Per-rank table (:data:`TABLE_COLUMNS`): ``null_lo`` / ``null_hi`` are the α and 1−α quantiles of the
        permutation null of each rank, ``significant`` marks the leading K ranks."""
        s = self.singular_values
        r = len(s)
        return pd.DataFrame({
            "rank": np.arange(1, r + 1),
            "singular_value": s,
            "null_median": np.median(self.null, axis=0),
            "null_lo": np.quantile(self.null, self.alpha, axis=0),
            "null_hi": np.quantile(self.null, 1 - self.alpha, axis=0),
            "p_value": self.p_values,
            "significant": np.arange(r) < self.n_significant,
        }, columns=TABLE_COLUMNS)


def count_significant(p_values: np.ndarray, alpha: float) -> int:
    """K = number of leading ranks with p < alpha, stopping at the first rank that is not significant
    (or not tested, NaN)."""
    sig = np.asarray(p_values, dtype=float) < alpha  # NaN compares False
    return int(len(sig) if sig.all() else np.argmin(sig))


def top_singular_value(m: np.ndarray) -> float:
    """Largest singular value of a dense matrix (ARPACK Lanczos for larger matrices, LAPACK otherwise)."""
    if min(m.shape) <= 32:
        return float(np.linalg.svd(m, compute_uv=False)[0])
    from scipy.sparse.linalg import svds

    return float(svds(m, k=1, return_singular_vectors=False, v0=np.ones(min(m.shape)), solver="arpack")[0])


#: Above this size (bytes) the B permuted cross-covariances are recomputed when needed instead of cached.
CACHE_BYTES = 512 * 2**20


def sequential_pvalues(a: np.ndarray, b: np.ndarray, alpha: float, perms: Sequence[np.ndarray],
                       null_top: np.ndarray | None = None, cross: Sequence[np.ndarray] | None = None,
                       progress: bool = True, what: str = "views") -> np.ndarray:
    """Permutation p-values of the ranks of the whitened cross-covariance, tested sequentially with deflation.

    ``a`` (n, p') and ``b`` (n, q') are whitened, centred views (:func:`whitened_basis`); ``perms`` are B row
    permutations of range(n). For rank k the first k−1 canonical pairs are projected out and s_k is compared
    with the permutation null of the largest singular value of the residual cross-covariance (module
    docstring; Winkler et al. 2020). In the rotated bases A U and B V (full SVD of AᵀB/(n−1)) the residual
    of permutation π at rank k is the block [k:, k:] of D_π = (AU)ᵀ(BV)[π]/(n−1).

    Exact shortcut: the largest singular value of a block [k:, k:] is ≤ that of [k−1:, k−1:] (interlacing),
    so a permutation whose last computed value is already below s_k cannot reach s_k; only the others are
    recomputed. ``null_top`` (B,), the largest singular value of each undeflated D_π, seeds these bounds.
    ``cross`` (optional): the B unrotated matrices C_π = AᵀB[π]/(n−1) already computed for the null spectrum;
    then D_π = Uᵀ C_π V costs p'²q' + p'q'² instead of n·p'q'.
    Returns (r,) p-values, r = min(p', q'); ranks after the first with p ≥ ``alpha`` are NaN (not tested).
    """
    n = a.shape[0]
    u, s, vt = np.linalg.svd(a.T @ b / (n - 1), full_matrices=True)
    ar, br = a @ u, b @ vt.T
    r = len(s)
    B = len(perms)
    cache = {}
    use_cache = B * ar.shape[1] * br.shape[1] * 8 <= CACHE_BYTES

    def d_block(i: int, k: int) -> np.ndarray:
        if i in cache:
            return cache[i][k:, k:]
        if cross is not None:
            d = u.T @ cross[i] @ vt.T
        elif use_cache:
            d = ar.T @ br[perms[i]] / (n - 1)
        else:
            return ar[:, k:].T @ br[perms[i], k:] / (n - 1)
        cache[i] = d
        return d[k:, k:]

    bound = np.full(B, np.inf) if null_top is None else np.asarray(null_top, dtype=float).copy()
    pv = np.full(r, np.nan)
    n_eval = 0
    for k in tqdm(range(r), desc=f"rank tests {what}", leave=False, mininterval=1.0, disable=not progress):
        for i in np.flatnonzero(bound >= s[k]):
            bound[i] = top_singular_value(d_block(i, k))
            n_eval += 1
        pv[k] = (1.0 + (bound >= s[k]).sum()) / (1.0 + B)
        if pv[k] >= alpha:
            break
    log.info("%s: sequential rank tests: %d residual spectra computed for %d rank(s)", what, n_eval,
             int(np.isfinite(pv).sum()))
    return pv


def remove_group_means(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``x`` (n, p) minus the mean of its group in every row (e.g. each slide's mean): the residual of the
    regression of every column on group indicators. Returns (n, p) float64."""
    x = np.asarray(x, dtype=np.float64)
    return x - pd.DataFrame(x).groupby(np.asarray(groups)).transform("mean").to_numpy()


def row_permutations(n: int, n_permutations: int, rng: np.random.Generator,
                     groups: np.ndarray | None = None) -> list[np.ndarray]:
    """``n_permutations`` random permutations of range(n), each mapping every row to a row of its own group.

    ``groups`` (n,) labels (e.g. the slide of each spot; exchangeability blocks, Winkler et al. 2014); None
    permutes across all rows. A permutation π is applied as ``y[π]``: row i is paired with row π[i], and
    ``groups[π] == groups`` holds exactly. Raises ValueError when ``groups`` has the wrong length.
    """
    if groups is None:
        return [rng.permutation(n) for _ in range(n_permutations)]
    codes = pd.factorize(np.asarray(groups))[0]
    if codes.shape != (n,):
        raise ValueError(f"groups must have one label per row ({n}), got shape {np.shape(groups)}")
    base = np.argsort(codes, kind="stable")  # rows listed group by group
    perms = []
    for _ in range(n_permutations):
        order = np.lexsort((rng.random(n), codes))  # the same group blocks, rows shuffled inside each block
        perm = np.empty(n, dtype=np.int64)
        perm[base] = order
        perms.append(perm)
    return perms


def spectral_gaps(s: np.ndarray, k: int) -> dict:
    """Gap statistics of a descending spectrum ``s`` (r,) given K = ``k`` signal directions.

    Returns ``gap_at_k`` = s_K − s_{K+1} (NaN if K = 0 or K = r), ``largest_gap`` = max_k(s_k − s_{k+1}) and
    ``largest_gap_rank`` (1-based k of that maximum; NaN when r < 2).
    """
    s = np.asarray(s, dtype=float)
    d = s[:-1] - s[1:]
    out = {"gap_at_k": float(s[k - 1] - s[k]) if 0 < k < len(s) else float("nan")}
    if len(d):
        i = int(np.argmax(d))
        out.update(largest_gap=float(d[i]), largest_gap_rank=i + 1)
    else:
        out.update(largest_gap=float("nan"), largest_gap_rank=float("nan"))
    return out


def cross_spectrum(x: np.ndarray, y: np.ndarray, params: Mapping | None = None, seed: int = 0,
                   progress: bool = True, what: str = "views", slides: np.ndarray | None = None) -> Spectrum:
    """Spectrum of the whitened cross-covariance of paired views with a permutation null (module docstring).

    Parameters
    ----------
    x : (n, p) first view (e.g. the GEX embedding), rows paired with ``y``.
    y : (n, q) second view (e.g. the IMG embedding).
    params : ``config: spectral`` (see :data:`DEFAULTS`); ``null_permutation`` chooses within-slide or global permutations.
    seed : seeds the spot subsample (``n_eval_samples``) and the permutations.
    slides : (n,) slide of each row; required by ``null_permutation: within_slide`` (slide means are removed from
        both views and rows permuted within slides), ignored by ``global``.

    Returns a :class:`Spectrum`. Raises ValueError for unpaired or non-finite inputs, fewer than 3 rows, or
    ``null_permutation: within_slide`` without ``slides`` (or with a ``slides`` of the wrong length).
    """
    p = check_params(params)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: views must be 2-D with the same number of rows, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"{what}: views contain NaN/inf; drop those rows first (io.drop_invalid_rows)")
    n_all = x.shape[0]
    if p["null_permutation"] == "within_slide":
        if slides is None:
            raise ValueError(f"{what}: spectral.null_permutation is 'within_slide' but no slide labels were given; pass the "
                             "slide of each spot (CLI: --spots results/{dataset}/spots.h5ad) or set spectral.null_permutation: global")
        slides = np.asarray(slides)
        if slides.shape != (n_all,):
            raise ValueError(f"{what}: {len(slides)} slide labels for {n_all} rows")
    else:
        slides = None
    rng = np.random.default_rng(seed)
    if p["n_eval_samples"] is not None and int(p["n_eval_samples"]) < n_all:
        idx = np.sort(rng.choice(n_all, int(p["n_eval_samples"]), replace=False))
        log.info("%s: %d of %d spots drawn for the analysis (n_eval_samples)", what, len(idx), n_all)
        x, y = x[idx], y[idx]
        slides = None if slides is None else slides[idx]
    n = x.shape[0]
    n_slides = 0 if slides is None else int(pd.unique(slides).size)
    if slides is not None:
        sizes = pd.Series(slides).value_counts()
        log.info("%s: slide means removed from both views; permutation null within %d slides (spots per slide "
                 "%d to %d)", what, n_slides, int(sizes.min()), int(sizes.max()))
        if (sizes < 2).any():
            log.warning("%s: %d slide(s) have a single spot, which no within-slide permutation can move (its "
                        "centred values are 0)", what, int((sizes < 2).sum()))
        x, y = remove_group_means(x, slides), remove_group_means(y, slides)
    else:
        log.info("%s: permutation null across all %d spots (global)", what, n)
    a = whitened_basis(x, p["regularization"], p["rank_tol"], p["use_whitening"], f"{what} X")
    b = whitened_basis(y, p["regularization"], p["rank_tol"], p["use_whitening"], f"{what} Y")
    s = _cross_sv(a, b)
    B = int(p["n_permutations"])
    perms = row_permutations(n, B, rng, slides)
    null = np.empty((B, len(s)))
    keep = B * a.shape[1] * b.shape[1] * 8 <= CACHE_BYTES
    cross = []
    for i in tqdm(range(B), desc=f"permutations {what}", leave=False, mininterval=1.0, disable=not progress):
        c = a.T @ b[perms[i]] / (n - 1)
        null[i] = np.linalg.svd(c, compute_uv=False)
        if keep:
            cross.append(c)
    pv = sequential_pvalues(a, b, float(p["alpha"]), perms, null[:, 0], cross if keep else None, progress, what)
    alpha = float(p["alpha"])
    k = count_significant(pv, alpha)
    excess = s - np.median(null, axis=0)
    summary = {
        "n_significant": k,
        **spectral_gaps(s, k),
        "n_excess": int((excess > float(p["spectral_gap_threshold"])).sum()),
        "sum_sq_significant": float((s[:k] ** 2).sum()),
        "top_singular_value": float(s[0]),
        "p_eff": a.shape[1],
        "q_eff": b.shape[1],
        "n": n,
        "n_slides": n_slides,
        "null_permutation": p["null_permutation"],
        "rows": "all",
    }
    log.info("%s: n=%d, p'=%d, q'=%d; s1=%.4f; %d significant direction(s) at alpha=%.3g (%d %s permutations); "
             "gap at K %.4f", what, n, a.shape[1], b.shape[1], s[0], k, alpha, B, p["null_permutation"], summary["gap_at_k"])
    return Spectrum(s, null, pv, k, alpha, float(p["spectral_gap_threshold"]), a.shape[1], b.shape[1], n, summary)


def spectrum_frame(spec: Spectrum, meta: Mapping) -> pd.DataFrame:
    """The per-rank table with the summary columns and ``meta`` (e.g. dataset, source, seed) prepended."""
    t = spec.table()
    for c in SUMMARY_COLUMNS:
        t[c] = spec.summary[c]
    for i, (k, v) in enumerate(meta.items()):
        t.insert(i, k, v)
    return t


#: Accepted array names of the views file: the brief's contract (img, gex) and the align CLI's (view_img, view_gex).
VIEW_KEYS = (("img", "gex"), ("view_img", "view_gex"))


def load_views_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read one views file (``results/{dataset}/aligned/{method}/seed{seed}.views.npz``, written by the align CLI).

    Arrays: ``spot_id`` (n,), the two projected views (n × P each) named ``img``/``gex`` or
    ``view_img``/``view_gex`` (:data:`VIEW_KEYS`) and ``fit_mask`` (n,) bool, True where the spot was used to
    fit the interface (files without it, written before it existed, count as all True; logged).
    Returns (spot_id, img, gex, fit_mask), all rows. Raises FileNotFoundError naming the file, KeyError when the
    view arrays are absent (concat and random have none), ValueError when the arrays differ in rows.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"views file not found: {path} (the align rule writes it next to the Z3 table)")
    with np.load(path, allow_pickle=False) as z:
        keys = next((k for k in VIEW_KEYS if all(x in z.files for x in k)), None)
        if "spot_id" not in z.files or keys is None:
            raise KeyError(f"{path}: expected arrays spot_id and img/gex (or view_img/view_gex); found {z.files} "
                           "(methods without projected views, concat and random, cannot be analysed)")
        ids, img, gex = z["spot_id"].astype(str), z[keys[0]], z[keys[1]]
        if "fit_mask" in z.files:
            fit = z["fit_mask"].astype(bool)
        else:
            log.warning("%s: no fit_mask array (written by an older align); every spot counts as a fitting spot", path)
            fit = np.ones(len(ids), dtype=bool)
    if not (len(ids) == img.shape[0] == gex.shape[0] == len(fit)):
        raise ValueError(f"{path}: spot_id ({len(ids)}), img {img.shape}, gex {gex.shape} and fit_mask "
                         f"({len(fit)}) differ in rows")
    return ids, img, gex, fit


def load_views(paths: Sequence[str | Path], rows: str = "all") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of one method's views from one or several npz files (:func:`load_views_npz`), concatenated.

    ``rows="all"``: every row of every file (transductive protocol: one file, every spot fitted).
    ``rows="held_out"``: only rows with ``fit_mask == False``, i.e. spots the interface was not fitted on; with
    one file per outer fold of the inductive protocol each spot is held out in exactly one fold, so the union is
    every spot once. The rows kept from each file are counted in the log; rows with a non-finite value in either
    view are then dropped (counted in the log).
    A spot kept from two files (a buffer spot of spatial blocks is fitted by neither of two interfaces) is kept
    once, from the first file, with a log warning.
    Returns (spot_id (m,), img (m, P), gex (m, P)). Raises ValueError for an unknown ``rows``, files with
    different view dimensions, or when no row is left (e.g. ``held_out`` on
    transductive views, where every spot was fitted).
    """
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {list(ROWS)}, got {rows!r}")
    if not paths:
        raise ValueError("no views file given")
    parts = []
    for path in paths:
        ids, img, gex, fit = load_views_npz(path)
        keep = ~fit if rows == "held_out" else np.ones(len(ids), dtype=bool)
        log.info("%s: %d of %d rows used (%s; %d fitted, %d held out)", path, int(keep.sum()), len(ids), rows,
                 int(fit.sum()), int((~fit).sum()))
        if parts and (img.shape[1], gex.shape[1]) != (parts[0][1].shape[1], parts[0][2].shape[1]):
            raise ValueError(f"{path}: views of dimension {img.shape[1]}/{gex.shape[1]}, but {paths[0]} has "
                             f"{parts[0][1].shape[1]}/{parts[0][2].shape[1]}; all files must come from one method")
        parts.append((ids[keep], img[keep], gex[keep]))
    ids = np.concatenate([q[0] for q in parts])
    img = np.concatenate([q[1] for q in parts])
    gex = np.concatenate([q[2] for q in parts])
    if len(ids) == 0:
        what = "held-out (fit_mask == False)" if rows == "held_out" else ""
        raise ValueError(f"no {what} rows in {[str(p) for p in paths]}: "
                         + ("every spot was used to fit the interface (transductive views); give the views of the "
                            "inductive protocol's outer folds, or analyse all rows (--rows all)"
                            if rows == "held_out" else "the files are empty"))
    dup = pd.Index(ids).duplicated()
    if dup.any():
        # spatial-block folds leave buffer spots out of an interface's fit without testing them there: such a spot
        # is unseen by two interfaces. Either row is leakage-free; the first file's is kept.
        log.warning("%d spot(s) are held out in more than one of the files (e.g. %r: buffer spots of spatial "
                    "blocks); the row of the first file is kept", int(dup.sum()), ids[dup][0])
        ids, img, gex = ids[~dup], img[~dup], gex[~dup]
    ok = np.isfinite(img).all(axis=1) & np.isfinite(gex).all(axis=1)
    if (~ok).sum():
        log.warning("%d of %d spots have non-finite views and are dropped", int((~ok).sum()), len(ok))
    log.info("views: %d rows from %d file(s)", int(ok.sum()), len(paths))
    return ids[ok], img[ok], gex[ok]


def read_slides(spots: str | Path, spot_ids: Sequence[str]) -> np.ndarray:
    """Slide of each spot: ``obs['slide']`` of the spot table ``results/{dataset}/spots.h5ad``, in the order of
    ``spot_ids``. Raises FileNotFoundError naming the file, KeyError when it has no ``slide`` column, ValueError
    naming the first spot ids that it lacks."""
    import anndata as ad

    spots = Path(spots)
    if not spots.exists():
        raise FileNotFoundError(f"spot table not found: {spots} (written by the prepare rule)")
    obs = ad.read_h5ad(spots, backed="r").obs
    if "slide" not in obs.columns:
        raise KeyError(f"{spots}: obs has no 'slide' column (columns: {list(obs.columns)})")
    slide = obs["slide"].astype(str)
    missing = pd.Index(spot_ids).difference(slide.index)
    if len(missing):
        raise ValueError(f"{len(missing)} spot(s) of the embeddings are not in {spots} (e.g. {list(missing[:3])}); "
                         "the embeddings and the spot table come from different runs")
    return slide.reindex(pd.Index(spot_ids)).to_numpy()


def collect(paths: Sequence[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Concatenate spectral TSVs (``main`` output) → (all ranks, one summary row per dataset × source × seed).

    Raises ValueError when no path is given or a file lacks the expected columns.
    """
    if not paths:
        raise ValueError("collect: no spectral tables given")
    frames = []
    for p in paths:
        d = pd.read_csv(p, sep="\t")
        missing = [c for c in ["dataset", "source", "seed", *TABLE_COLUMNS, *SUMMARY_COLUMNS] if c not in d.columns]
        if missing:
            raise ValueError(f"{p}: not a spectral table (missing {missing})")
        frames.append(d)
    table = pd.concat(frames, ignore_index=True)
    summary = table.groupby(["dataset", "source", "seed"], sort=False)[SUMMARY_COLUMNS].first().reset_index()
    return table, summary


def main(argv: Sequence[str] | None = None) -> None:
    """CLI.

    ``python -m workflow_scripts.analysis.spectral unimodal --gex GEX.parquet --img IMG.parquet --dataset D --params JSON
    --seed S [--spots SPOTS.h5ad] --out OUT.tsv --log LOG``: spectrum between the two unimodal embeddings (source
    ``unimodal``).

    ``python -m workflow_scripts.analysis.spectral views --views V.npz [V2.npz ...] [--rows all|held_out] --dataset D
    --method M --seed S --params JSON [--spots SPOTS.h5ad] --out OUT.tsv --log LOG``: spectrum between a method's two
    projected views (source = method), on the rows chosen by ``--rows`` (:func:`load_views`; several files = one
    per outer fold of the inductive protocol).

    ``--spots`` (``results/{dataset}/spots.h5ad``) gives the slide of each spot; required when the params'
    ``null_permutation`` is ``within_slide`` (the default). Output of both: :func:`spectrum_frame` with leading columns
    ``dataset, source, seed``.

    ``python -m workflow_scripts.analysis.spectral collect --inputs A.tsv ... --out ALL.tsv --summary SUMMARY.tsv --log LOG``:
    :func:`collect`.
    """
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.analysis.spectral", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("unimodal", help="spectrum between the GEX and IMG embeddings")
    u.add_argument("--gex", required=True)
    u.add_argument("--img", required=True)
    v = sub.add_parser("views", help="spectrum between a method's two projected views")
    v.add_argument("--views", required=True, nargs="+",
                   help="views npz (spot_id, view_img, view_gex, fit_mask); several = one per outer fold")
    v.add_argument("--rows", choices=ROWS, default="all",
                   help="all rows, or only the spots not used to fit the interface (fit_mask == False)")
    v.add_argument("--method", required=True)
    for s in (u, v):
        s.add_argument("--dataset", required=True)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--params", default="{}", help="JSON dict, config `spectral`")
        s.add_argument("--spots", default=None, help="spot table with obs['slide'] (needed by null_permutation: within_slide)")
    c = sub.add_parser("collect", help="concatenate spectral tables and write their summary rows")
    c.add_argument("--inputs", nargs="+", required=True)
    c.add_argument("--summary", required=True)
    for s in (u, v, c):
        s.add_argument("--out", required=True)
        s.add_argument("--log", default=None)
    args = ap.parse_args(argv)
    setup_logging(args.log)
    if args.cmd == "collect":
        table, summary = collect(args.inputs)
        for df, out in ((table, args.out), (summary, args.summary)):
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            df.to_csv(out, sep="\t", index=False)
        log.info("collected %d spectra (%d ranks) into %s and %s", len(summary), len(table), args.out, args.summary)
        return
    params = check_params(json_arg(args.params, "--params"))
    if params["null_permutation"] == "within_slide" and not args.spots:
        raise ValueError("spectral.null_permutation is 'within_slide': pass --spots results/{dataset}/spots.h5ad (the slide of "
                         "each spot), or set spectral.null_permutation: global")
    if args.cmd == "unimodal":
        t = intersect_tables({
            "GEX": drop_invalid_rows(read_embedding(args.gex), f"GEX embedding {args.gex}"),
            "IMG": drop_invalid_rows(read_embedding(args.img), f"IMG embedding {args.img}"),
        })
        ids, x, y = t["GEX"].index, t["GEX"].to_numpy(), t["IMG"].to_numpy()
        what, source, rows = "GEX vs IMG", "unimodal", "all"
    else:
        ids, y, x = load_views(args.views, args.rows)
        what, source, rows = f"{args.method} views", args.method, args.rows
    slides = read_slides(args.spots, ids) if params["null_permutation"] == "within_slide" else None
    spec = cross_spectrum(x, y, params, args.seed, what=what, slides=slides)
    spec.summary["rows"] = rows
    df = spectrum_frame(spec, {"dataset": args.dataset, "source": source, "seed": args.seed})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, sep="\t", index=False)
    log.info("wrote %d ranks to %s", len(df), args.out)


if __name__ == "__main__":
    main()
