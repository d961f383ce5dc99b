"""Paired cluster bootstrap of probe-score statistics over (seed, fold) cells.

Every embedding of one dataset, protocol and seed is probed on the same folds (:mod:`.folds`), so its score in a
(seed, fold) *cell* pairs with every other embedding's score in that cell. A statistic of several embeddings'
mean scores (a gain, an SIS) is bootstrapped by resampling *units* of cells with replacement, keeping each cell's
scores together (paired) and recomputing the statistic from the resampled means:

* under random folds (``kfold``, spatial blocks) every (seed, fold) cell is its own unit;
* under grouped folds (donors, slides) all cells that hold out the same donors or slides form one unit, so a
  donor and all its seeds are drawn or left out together (cluster bootstrap: Davison & Hinkley 1997, *Bootstrap
  Methods and their Application*, Cambridge University Press, on hierarchical data; Field & Welsh 2007, JRSS B 69:369).

The interval is the percentile interval (Efron & Tibshirani 1993, *An Introduction to the Bootstrap*, chapter 13)
of the resampled statistic. With few units (three donors) it is coarse and tends to be too narrow; the SIS table
reports the number of units next to every interval (docs/evaluation.md#confidence-intervals).

Functions take arrays and return arrays or numbers; no I/O.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def unit_sums(values: np.ndarray, units: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-unit sums of the cells' values.

    Parameters
    ----------
    values : (n_cells, k) scores, one column per embedding (no NaN).
    units : (n_cells,) unit label of every cell.

    Returns
    -------
    labels : (n_units,) the sorted unit labels; sums : (n_units, k) column sums per unit; counts : (n_units,)
    cells per unit. Raises ValueError for mismatched lengths, NaN values or no cell.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    u = np.asarray(units)
    if v.ndim != 2 or len(u) != v.shape[0]:
        raise ValueError(f"values {v.shape} and units ({len(u)},) do not match")
    if v.shape[0] == 0:
        raise ValueError("no cell to bootstrap")
    if not np.isfinite(v).all():
        raise ValueError("values contain NaN/inf; keep only the cells where every embedding has a score")
    labels, inv = np.unique(u.astype(str), return_inverse=True)
    sums = np.zeros((len(labels), v.shape[1]))
    np.add.at(sums, inv, v)
    counts = np.bincount(inv, minlength=len(labels)).astype(np.float64)
    return labels, sums, counts


def bootstrap_means(values: np.ndarray, units: Sequence, n_boot: int, seed: int) -> np.ndarray:
    """Column means of ``values`` in ``n_boot`` cluster-bootstrap resamples.

    Each resample draws n_units units with replacement (uniformly) and averages all cells of the drawn units
    (cells of a unit drawn twice count twice): mean*_j = Σ_u w_u S_uj / Σ_u w_u c_u with multinomial weights w.

    Parameters
    ----------
    values : (n_cells, k) scores (see :func:`unit_sums`).
    units : (n_cells,) unit labels.
    n_boot : number of resamples B (≥ 1).
    seed : seed of ``numpy.random.default_rng``.

    Returns
    -------
    (n_boot, k) resampled means. Raises ValueError for ``n_boot`` < 1 (and the errors of :func:`unit_sums`).
    """
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    _, sums, counts = unit_sums(values, units)
    n_units = len(counts)
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=int(n_boot)).astype(np.float64)
    return (w @ sums) / (w @ counts)[:, None]


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Equal-tailed percentile interval of the finite ``samples`` (1-D).

    Returns ``(lo, hi)`` = the (1 − level)/2 and (1 + level)/2 quantiles (numpy's linear interpolation), or
    ``(nan, nan)`` when fewer than half of the samples are finite (the statistic is undefined too often, e.g. an
    SIS whose denominator is ≤ 0 in many resamples). Raises ValueError for ``level`` outside (0, 1).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    s = np.asarray(samples, dtype=np.float64).ravel()
    fin = s[np.isfinite(s)]
    if len(fin) == 0 or len(fin) < 0.5 * len(s):
        return float("nan"), float("nan")
    lo, hi = np.quantile(fin, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def excludes_zero(lo: float, hi: float) -> bool | None:
    """True when the interval [lo, hi] lies entirely above or entirely below 0; None when it is undefined."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    return bool(lo > 0 or hi < 0)


def gain(means: np.ndarray, fused: int, refs: Sequence[int]) -> np.ndarray:
    """Gain of the fused embedding over its best reference: ``m[fused] − max_j m[refs_j]``.

    ``means``: (..., k) mean scores (one row per resample, or a single row); ``fused`` and ``refs`` index its last
    axis. Returns an array of shape ``means.shape[:-1]``. The best reference is chosen within each row, so a
    bootstrap interval accounts for the choice. Raises ValueError when ``refs`` is empty.
    """
    if len(refs) == 0:
        raise ValueError("gain needs at least one reference column")
    m = np.asarray(means, dtype=np.float64)
    return m[..., fused] - m[..., list(refs)].max(axis=-1)


def sis_ratio(means: np.ndarray, fused: int, refs: Sequence[int]) -> np.ndarray:
    """SIS of the fused embedding against its best reference, ``(m[fused] − best) / best`` with
    ``best = max_j m[refs_j]`` (paper's SIS with the probe score as the information proxy; Richter et al. 2026,
    doi:10.64898/2026.02.23.707420; docs/reference.md#sis). NaN where ``best ≤ 0`` (undefined ratio).

    ``means``: (..., k); returns shape ``means.shape[:-1]``. Raises ValueError when ``refs`` is empty.
    """
    if len(refs) == 0:
        raise ValueError("sis_ratio needs at least one reference column")
    m = np.asarray(means, dtype=np.float64)
    best = m[..., list(refs)].max(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (m[..., fused] - best) / best
    return np.where(best > 0, out, np.nan)


def bootstrap_statistic(
    values: np.ndarray,
    units: Sequence,
    statistic: Callable[[np.ndarray], np.ndarray],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Point estimate and percentile interval of ``statistic`` of the column means.

    Parameters
    ----------
    values : (n_cells, k) paired scores, one column per embedding (NaN-free).
    units : (n_cells,) unit labels (module docstring).
    statistic : function of a (..., k) array of means returning shape (...) (e.g. a partial of :func:`gain`).
    n_boot, seed, level : resamples, RNG seed, interval level.

    Returns
    -------
    ``{"estimate", "lo", "hi", "excludes_0", "n_units", "n_cells"}``; ``estimate`` is the statistic of the
    full-sample means.
    """
    labels, sums, counts = unit_sums(values, units)
    full = sums.sum(axis=0) / counts.sum()
    est = float(np.asarray(statistic(full[None, :]))[0])
    boot = statistic(bootstrap_means(values, units, n_boot, seed))
    lo, hi = percentile_interval(boot, level)
    return dict(estimate=est, lo=lo, hi=hi, excludes_0=excludes_zero(lo, hi), n_units=int(len(labels)),
                n_cells=int(counts.sum()))
