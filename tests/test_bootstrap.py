"""Tests for workflow_scripts.evaluation.bootstrap (paired cluster bootstrap over (seed, fold) cells)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from workflow_scripts.evaluation import bootstrap as B


def test_unit_sums_hand_computation():
    v = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    labels, sums, counts = B.unit_sums(v, ["b", "a", "b"])
    assert labels.tolist() == ["a", "b"]
    np.testing.assert_array_equal(sums, [[3, 4], [6, 8]])
    np.testing.assert_array_equal(counts, [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        B.unit_sums(np.array([[np.nan]]), ["a"])
    with pytest.raises(ValueError, match="do not match"):
        B.unit_sums(v, ["a"])


def test_resampling_keeps_the_cells_of_a_unit_together():
    # unit "d1" has 3 cells of value 1, unit "d2" one cell of value 0: a resample holds d1 0, 1 or 2 times,
    # so its mean is 0, 3/4 (one of each: 3 / (3 + 1)) or 1 — never the 1/2 of cell-level resampling
    v = np.array([1.0, 1.0, 1.0, 0.0])[:, None]
    m = B.bootstrap_means(v, ["d1", "d1", "d1", "d2"], 500, seed=0)[:, 0]
    assert set(np.round(m, 12)) == {0.0, 0.75, 1.0}
    # deterministic for a seed
    np.testing.assert_array_equal(m, B.bootstrap_means(v, ["d1", "d1", "d1", "d2"], 500, seed=0)[:, 0])
    # one unit: every resample is the full mean
    assert np.allclose(B.bootstrap_means(np.arange(5.0)[:, None], ["u"] * 5, 50, 1), 2.0)


def test_percentile_interval_and_excludes_zero():
    s = np.arange(101, dtype=float)  # quantiles 2.5 % and 97.5 % of 0..100 (linear interpolation)
    assert B.percentile_interval(s, 0.95) == pytest.approx((2.5, 97.5))
    half = np.r_[np.full(60, np.nan), np.arange(40.0)]
    assert np.isnan(B.percentile_interval(half)[0])  # mostly undefined → no interval
    assert B.excludes_zero(0.1, 0.4) is True and B.excludes_zero(-0.4, -0.1) is True
    assert B.excludes_zero(-0.1, 0.4) is False and B.excludes_zero(np.nan, 1.0) is None
    with pytest.raises(ValueError):
        B.percentile_interval(s, 1.5)


def test_gain_and_sis_hand_computation():
    m = np.array([[0.82, 0.72, 0.68], [0.5, 0.6, 0.4], [0.3, -0.1, 0.0]])
    np.testing.assert_allclose(B.gain(m, 0, [1, 2]), [0.10, -0.10, 0.30])
    s = B.sis_ratio(m, 0, [1, 2])
    assert s[0] == pytest.approx(0.10 / 0.72) and s[1] == pytest.approx(-1 / 6) and np.isnan(s[2])
    with pytest.raises(ValueError):
        B.gain(m, 0, [])


def test_bootstrap_statistic_estimate_is_the_statistic_of_the_means():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(15, 3)) + [0.8, 0.7, 0.6]
    units = [f"s{i // 5}:f{i % 5}" for i in range(15)]
    r = B.bootstrap_statistic(v, units, partial(B.gain, fused=0, refs=[1, 2]), n_boot=400, seed=1)
    assert r["estimate"] == pytest.approx(v[:, 0].mean() - max(v[:, 1].mean(), v[:, 2].mean()))
    assert r["lo"] < r["estimate"] < r["hi"] and r["n_units"] == 15 and r["n_cells"] == 15


def test_interval_covers_a_known_paired_difference_at_about_the_nominal_rate():
    """Simulated paired folds: the fused score = reference + 0.02 + noise, shared fold effects; the 95 % interval
    of the mean difference covers 0.02 in about 95 % of 300 replicates (the percentile bootstrap with 15 units
    under-covers a little)."""
    rng = np.random.default_rng(42)
    delta, n_units, reps = 0.02, 15, 300
    hits = 0
    for _ in range(reps):
        fold_effect = rng.normal(0, 0.05, n_units)          # shared by both embeddings: pairing removes it
        ref = 0.6 + fold_effect + rng.normal(0, 0.01, n_units)
        fused = 0.6 + delta + fold_effect + rng.normal(0, 0.01, n_units)
        r = B.bootstrap_statistic(np.c_[fused, ref], np.arange(n_units), partial(B.gain, fused=0, refs=[1]),
                                  n_boot=500, seed=int(rng.integers(1 << 31)))
        hits += r["lo"] <= delta <= r["hi"]
    assert 0.88 <= hits / reps <= 0.99
