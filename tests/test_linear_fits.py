"""Fast fits of the ring and consistency probes (workflow_scripts/evaluation/linear_fits.py) against scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, RidgeCV

from workflow_scripts.evaluation import linear_fits as lf
from workflow_scripts.evaluation.probes import fit_classifier_fold, fit_regressor_fold

ALPHAS = np.logspace(-3, 3, 10)


def regression_data(n, d, k, signal, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d)
    Y = X @ rng.normal(size=(d, k)) * signal + rng.normal(size=(n, k)) * 3
    return X, Y


@pytest.mark.parametrize("n,d,k,signal", [(200, 50, 3, 1.0), (500, 120, 9, 0.3), (100, 150, 2, 0.5),
                                          (300, 40, 1, 2.0), (150, 20, 4, 0.01)])
def test_ridge_loo_is_ridgecv(n, d, k, signal):
    X, Y = regression_data(n, d, k, signal)
    if k == 1:
        Y = Y[:, 0]
    ref = RidgeCV(alphas=ALPHAS, scoring="r2").fit(X, Y)
    fit = lf.ridge_loo(X, Y, ALPHAS)
    assert fit.alpha == ref.alpha_
    assert fit.loo_r2 == pytest.approx(ref.best_score_, abs=1e-10)
    np.testing.assert_allclose(fit.coef, ref.coef_.T, atol=1e-9)
    np.testing.assert_allclose(fit.intercept, ref.intercept_, atol=1e-9)
    np.testing.assert_allclose(fit.predict(X[:7]), ref.predict(X[:7]), atol=1e-9)
    X32 = X.astype(np.float32)  # float32 products: same alpha and R² as RidgeCV on the same (rounded) features
    ref32 = RidgeCV(alphas=ALPHAS, scoring="r2").fit(X32.astype(np.float64), Y)
    f32 = lf.ridge_loo(X32, Y, ALPHAS)
    assert f32.alpha == ref32.alpha_ and f32.loo_r2 == pytest.approx(ref32.best_score_, abs=1e-5)


def test_ridge_loo_rejects_bad_input():
    with pytest.raises(ValueError, match="alphas > 0"):
        lf.ridge_loo(np.ones((5, 2)), np.ones(5), [0.0, 1.0])
    with pytest.raises(ValueError, match="equal rows"):
        lf.ridge_loo(np.ones((5, 2)), np.ones(4), [1.0])


def test_regressor_split_equals_the_probe_fold():
    X, Y = regression_data(300, 30, 4, 0.5, seed=2)
    tr, te = np.arange(240), np.arange(240, 300)
    fast = lf.fit_regressor_split(X, Y, tr, te, alphas=ALPHAS)
    ref = fit_regressor_fold(X[tr], Y[tr], X[te], Y[te], ALPHAS)
    assert fast["alpha"] == ref["alpha"]
    assert fast["value"] == pytest.approx(ref["value"], abs=1e-5)  # float32 features


def classification_data(n=600, d=20, k=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(k, d))[y] * 0.8 + rng.normal(size=(n, d))
    return X, np.array([f"c{v}" for v in y])


def test_classifier_split_matches_the_probe_fold_and_warm_start_saves_iterations():
    X, y = classification_data()
    splits = [(np.arange(0, 480), np.arange(480, 600)), (np.arange(120, 600), np.arange(0, 120))]
    warm = lf.WarmStart()
    for k, (tr, te) in enumerate(splits):
        fast = lf.fit_classifier_split(X, y, tr, te, max_iter=2000, warm=warm)
        ref = fit_classifier_fold(X[tr], y[tr], X[te], y[te], 2000, 0)
        assert fast["value"] == pytest.approx(ref["value"], abs=0.01)  # same optimum within the L-BFGS tolerance
        assert fast["n_classes"] == ref["n_classes"] == 4
        cold = lf.fit_classifier_split(X, y, tr, te, max_iter=2000)
        if k == 1:
            assert fast["n_iter"] < cold["n_iter"]  # started from the previous split's optimum


def test_warm_start_maps_coefficients_by_class_label():
    X, y = classification_data(k=3)
    warm = lf.WarmStart()
    m = lf.fit_logreg(X.astype(np.float32), y, warm=warm)
    init = warm.init(["c0", "c2", "c9"], X.shape[1])  # c1 dropped, c9 new
    assert init is not None
    coef, intercept = init
    np.testing.assert_allclose(coef[0], m.coef_[0])
    np.testing.assert_allclose(coef[1], m.coef_[2])
    assert not coef[2].any() and intercept[2] == 0
    assert warm.init(["c0", "c1", "c2"], X.shape[1] + 1) is None  # other feature count: cold start
    assert warm.init(["c0", "c1"], X.shape[1]) is None            # binary problems keep their own row


def test_warm_started_fit_reaches_the_cold_optimum():
    X, y = classification_data(n=400, d=10, k=3, seed=3)
    Z = lf.standardize(X)[0]
    warm = lf.WarmStart()
    lf.fit_logreg(Z[:300], y[:300], warm=warm, tol=1e-10)
    a = lf.fit_logreg(Z[100:], y[100:], warm=warm, tol=1e-10)
    b = LogisticRegression(tol=1e-10, max_iter=10_000).fit(Z[100:], y[100:])
    np.testing.assert_allclose(a.coef_, b.coef_, atol=2e-3)
