"""Scores that stay meaningful at chance: the chance level of macro-F1, a chance-corrected macro-F1, and the
absolute gain of a fused embedding over the better single modality.

SIS divides by the best unimodal score, so it is undefined when that score is ≤ 0 (R² of a purely synergistic
regression target) and explodes when it is near chance (macro-F1 of a purely synergistic label). The absolute
gain, and scores measured from chance, keep such tasks visible.

**Chance level of macro-F1.** A stratified random classifier (scikit-learn ``DummyClassifier(strategy=
"stratified")``) predicts class k with probability p_k, the class's share of the training part, independently of
the spot. On a test part with n_k spots of class k (N in all) its true positives of class k are TP_k ~ Bin(n_k, p_k)
and its false positives FP_k ~ Bin(N − n_k, p_k), independent, so with F1_k = 2 TP_k / (n_k + TP_k + FP_k)

    E[macro-F1] = (1/K) Σ_k Σ_{a, b} Bin(a; n_k, p_k) Bin(b; N − n_k, p_k) · 2a / (n_k + a + b)

(:func:`expected_macro_f1`; the sums run over the binomials' supports, truncated where both tails are below
1e-15). For large N each term tends to 2 π_k p_k / (π_k + p_k) with π_k = n_k / N, so with p = π the chance
macro-F1 is the mean class share 1/K whatever the imbalance (e.g. 0.5 for two classes, 0.25 for four).

**Chance-corrected macro-F1** (:func:`chance_corrected`): (F1 − F1_chance) / (1 − F1_chance), 0 at chance, 1 for a
perfect probe, negative below chance — the same normalisation as Cohen's kappa (Cohen 1960, Educ. Psychol. Meas.
20:37, doi:10.1177/001316446002000104). R² needs none: its chance level (predicting the training mean) is 0
already.

**Absolute gain** (:func:`absolute_gain`): score(fused) − max(score(GEX), score(IMG)), the numerator of SIS; defined
at any score level. On fold-paired scores it is a per-fold difference whose interval comes from the paired
bootstrap of :mod:`workflow_scripts.evaluation.sis`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

_TAIL = 1e-15


def _support(n: int, p: float) -> np.ndarray:
    """Integers a in [0, n] where Bin(a; n, p) is not negligible (both tails < 1e-15 cut)."""
    from scipy.stats import binom

    if n == 0:
        return np.zeros(1, dtype=int)
    lo = int(binom.ppf(_TAIL, n, p)) if p > 0 else 0
    hi = int(binom.isf(_TAIL, n, p)) if p < 1 else n
    return np.arange(max(lo - 1, 0), min(hi + 1, n) + 1)


def expected_f1_class(n_k: int, n: int, p_k: float) -> float:
    """E[F1] of one class with ``n_k`` of ``n`` test spots under random predictions of that class with
    probability ``p_k`` (module docstring). Raises ValueError unless 1 <= n_k <= n and 0 <= p_k <= 1."""
    from scipy.stats import binom

    n_k, n, p_k = int(n_k), int(n), float(p_k)
    if not 1 <= n_k <= n:
        raise ValueError(f"need 1 <= n_k <= n, got n_k={n_k}, n={n}")
    if not 0.0 <= p_k <= 1.0:
        raise ValueError(f"p_k must lie in [0, 1], got {p_k}")
    if p_k == 0.0:
        return 0.0
    a = _support(n_k, p_k)
    b = _support(n - n_k, p_k)
    pa = binom.pmf(a, n_k, p_k)
    pb = binom.pmf(b, n - n_k, p_k)
    f1 = 2.0 * a[:, None] / (n_k + a[:, None] + b[None, :])
    return float(pa @ f1 @ pb)


def expected_macro_f1(test_counts: Sequence[int], train_props: Sequence[float]) -> float:
    """Expected macro-F1 of a stratified random classifier (module docstring).

    Parameters
    ----------
    test_counts : (K,) number of test spots per class (every class scored must have >= 1).
    train_props : (K,) prediction probabilities (the classes' shares of the training part); renormalised to sum 1.

    Returns the expectation over the classifier's random predictions, exact up to the truncated binomial tails.
    Raises ValueError for mismatched lengths, a class with no test spot, or negative proportions.
    """
    counts = np.asarray(test_counts, dtype=int)
    props = np.asarray(train_props, dtype=float)
    if counts.shape != props.shape or counts.ndim != 1 or len(counts) == 0:
        raise ValueError(f"test_counts and train_props must be 1-D of equal length, got {counts.shape}, {props.shape}")
    if (counts < 1).any():
        raise ValueError("every scored class needs >= 1 test spot (macro-F1 over the classes of both parts)")
    if (props < 0).any() or props.sum() <= 0:
        raise ValueError(f"train_props must be >= 0 with a positive sum, got {props}")
    props = props / props.sum()
    n = int(counts.sum())
    return float(np.mean([expected_f1_class(c, n, q) for c, q in zip(counts, props)]))


def expected_macro_f1_from_labels(y_train: np.ndarray, y_test: np.ndarray, labels: Sequence | None = None) -> float:
    """:func:`expected_macro_f1` for a split given as label arrays: the classes ``labels`` (default: those present
    in both parts, as the probes score them), p_k from ``y_train`` restricted to those classes, n_k from ``y_test``.
    """
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if labels is None:
        labels = np.intersect1d(np.unique(y_train), np.unique(y_test))
    labels = np.asarray(labels)
    counts = tuple(int((y_test == c).sum()) for c in labels)
    train_counts = tuple(int((y_train == c).sum()) for c in labels)
    return _expected_macro_f1_of_counts(counts, train_counts)


@functools.lru_cache(maxsize=4096)
def _expected_macro_f1_of_counts(test_counts: tuple[int, ...], train_counts: tuple[int, ...]) -> float:
    """:func:`expected_macro_f1` memoised on the class counts (about 1 s per split at lung scale; a probe job scores
    a fused method and its controls on the same splits, so the same counts recur)."""
    return expected_macro_f1(test_counts, train_counts)


def chance_corrected(score, chance):
    """(score − chance) / (1 − chance) elementwise (kappa-style; module docstring). NaN where chance >= 1."""
    score, chance = np.asarray(score, dtype=float), np.asarray(chance, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(chance < 1, (score - chance) / (1 - chance), np.nan)
    return out if out.ndim else float(out)


def absolute_gain(fused, gex, img):
    """score(fused) − max(score(GEX), score(IMG)) elementwise (the numerator of SIS; module docstring).

    Works on means or on fold-paired arrays of equal shape."""
    fused, gex, img = (np.asarray(v, dtype=float) for v in (fused, gex, img))
    out = fused - np.maximum(gex, img)
    return out if out.ndim else float(out)


__all__ = [
    "expected_f1_class", "expected_macro_f1", "expected_macro_f1_from_labels", "chance_corrected", "absolute_gain",
]
