"""The non-linear probe reads an interaction that the linear probe cannot, with the same folds."""

import numpy as np
import pytest
from sklearn.model_selection import KFold

from workflow_scripts.evaluation.nonlinear import nonlinear_probe, nonlinear_probe_fold
from workflow_scripts.evaluation.probes import fit_classifier_fold


def xor_concat(n=400, seed=0):
    rng = np.random.default_rng(seed)
    a, b = rng.choice([-1.0, 1.0], n), rng.choice([-1.0, 1.0], n)
    X = np.column_stack([a + 0.2 * rng.normal(size=n), b + 0.2 * rng.normal(size=n), rng.normal(size=(n, 4))])
    return X, np.where(a * b > 0, "same", "diff"), a * b + 0.05 * rng.normal(size=n)


def test_mlp_ceiling_reads_xor_from_a_concatenation():
    X, y, _ = xor_concat()
    splits = list(KFold(3, shuffle=True, random_state=0).split(X))
    ceiling = nonlinear_probe(X, y, splits, "classification", seed=0)
    linear = [fit_classifier_fold(X[tr], y[tr], X[te], y[te], 2000, 0)["value"] for tr, te in splits]
    assert [r["fold"] for r in ceiling] == [0, 1, 2]
    assert np.mean([r["value"] for r in ceiling]) > 0.9
    assert np.mean(linear) < 0.65
    assert all(r["chosen"] in (1e-4, 1e-2, 1.0) for r in ceiling)


def test_regression_and_determinism():
    X, _, t = xor_concat(300)
    tr, te = np.arange(200), np.arange(200, 300)
    r1 = nonlinear_probe_fold(X[tr], t[tr], X[te], t[te], "regression", seed=1)
    r2 = nonlinear_probe_fold(X[tr], t[tr], X[te], t[te], "regression", seed=1)
    assert r1 == r2 and r1["value"] > 0.7
    multi = np.column_stack([t, -t])
    r3 = nonlinear_probe_fold(X[tr], multi[tr], X[te], multi[te], "regression", seed=1,
                              params={"model": "hgb", "leaves": [7]})
    assert r3["value"] > 0.5


def test_bad_params():
    X, y, _ = xor_concat(60)
    with pytest.raises(ValueError, match="unknown key"):
        nonlinear_probe_fold(X[:40], y[:40], X[40:], y[40:], "classification", 0, {"depth": 3})
    with pytest.raises(ValueError, match="task_type"):
        nonlinear_probe_fold(X[:40], y[:40], X[40:], y[40:], "ranking", 0)
