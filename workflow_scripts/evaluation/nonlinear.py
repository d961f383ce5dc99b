"""A non-linear probe: how much of a task an embedding holds when the read-out may be non-linear (its ceiling).

The linear probes of :mod:`workflow_scripts.evaluation.probes` score what a *linear* read-out extracts. A fused
embedding can hold a cross-modal interaction (e.g. the XOR of a GEX and an IMG factor) that no linear read-out
reaches — and so can the plain concatenation, which loses nothing. This probe reports the ceiling: per fold, a
small non-linear model with its regularisation chosen by inner cross-validation on the training part only.

* ``mlp`` (default): ``StandardScaler`` → ``MLPClassifier`` / ``MLPRegressor`` (scikit-learn; one hidden layer of
  ``hidden`` ReLU units, full-batch L-BFGS for at most ``max_iter`` iterations — scikit-learn's advice for small
  data sets), L2 penalty ``alpha`` chosen from ``alphas`` by ``GridSearchCV`` with ``inner_folds`` folds (scoring
  macro-F1 / R²).
* ``hgb``: ``HistGradientBoostingClassifier`` / ``Regressor`` (Ke et al. 2017 LightGBM-style histogram gradient
  boosting; early stopping), ``max_leaf_nodes`` chosen from ``leaves`` by the same inner CV; multi-output
  regression through ``MultiOutputRegressor``.

Scores: macro-F1 over the classes present in both parts (as the linear probe), R² uniform-averaged over outputs.
Threads (OpenMP, BLAS) are limited to ``threads`` (1) while fitting. Deterministic for a given ``seed`` (the inner folds, the network initialisation, the boosting's early-stopping
split). An L-BFGS run that stops at ``max_iter`` before converging is reported by scikit-learn's warning in the
log.

Plugging it into the workflow: a ``probe.nonlinear`` config switch (default false) that makes the probe job also
write rows with ``metric`` = ``macro_f1_nonlinear`` / ``r2_nonlinear`` on the *same* fold files as the linear
probe, so ceilings are paired fold by fold with the linear scores.
"""

from __future__ import annotations

import logging
from typing import Literal, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

NONLINEAR_DEFAULTS = {
    "model": "mlp",
    "hidden": 64,
    "alphas": [1.0e-4, 1.0e-2, 1.0],
    "leaves": [7, 31],
    "inner_folds": 3,
    "max_iter": 300,
    "threads": 1,
}


def _params(params: Mapping | None) -> dict:
    p = {**NONLINEAR_DEFAULTS, **dict(params or {})}
    unknown = sorted(set(p) - set(NONLINEAR_DEFAULTS))
    if unknown:
        raise ValueError(f"probe.nonlinear: unknown key(s) {unknown}; allowed: {sorted(NONLINEAR_DEFAULTS)}")
    if p["model"] not in ("mlp", "hgb"):
        raise ValueError(f"probe.nonlinear.model must be 'mlp' or 'hgb', got {p['model']!r}")
    if int(p["inner_folds"]) < 2:
        raise ValueError(f"probe.nonlinear.inner_folds must be >= 2, got {p['inner_folds']!r}")
    return p


def _estimator(task_type: str, p: dict, seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.multioutput import MultiOutputRegressor
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if p["model"] == "mlp":
        cls = MLPClassifier if task_type == "classification" else MLPRegressor
        net = cls(hidden_layer_sizes=(int(p["hidden"]),), solver="lbfgs", max_iter=int(p["max_iter"]),
                  random_state=int(seed))
        return Pipeline([("scale", StandardScaler()), ("net", net)]), {"net__alpha": list(p["alphas"])}
    if task_type == "classification":
        est = HistGradientBoostingClassifier(early_stopping=True, random_state=int(seed))
        return est, {"max_leaf_nodes": list(p["leaves"])}
    est = MultiOutputRegressor(HistGradientBoostingRegressor(early_stopping=True, random_state=int(seed)))
    return est, {"estimator__max_leaf_nodes": list(p["leaves"])}


def nonlinear_probe_fold(
    X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
    task_type: Literal["classification", "regression"], seed: int, params: Mapping | None = None,
) -> dict:
    """Fit the non-linear probe (module docstring) on one split and score it on the test part.

    Parameters
    ----------
    X_train, X_test : (n_train, d), (n_test, d) features.
    y_train, y_test : (n,) labels (classification) or (n,) / (n, k) targets (regression).
    task_type : ``classification`` (macro-F1) or ``regression`` (R², uniform average).
    seed : seed of the inner folds, the model and its early-stopping split.
    params : :data:`NONLINEAR_DEFAULTS` overrides (config ``probe.nonlinear``).

    Returns ``{value, n_train, n_test, chosen}`` (``chosen`` = the hyperparameter picked by the inner CV). Rows of
    classes absent from either part are dropped first (as the linear probe). Raises ValueError for an unknown
    ``task_type`` or parameter, or fewer than 2 common classes.
    """
    from sklearn.metrics import f1_score, r2_score
    from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold

    p = _params(params)
    X_train, X_test = np.asarray(X_train, dtype=np.float64), np.asarray(X_test, dtype=np.float64)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if task_type == "classification":
        common = np.intersect1d(np.unique(y_train), np.unique(y_test))
        if len(common) < 2:
            raise ValueError(f"non-linear probe: {len(common)} class(es) common to both parts (need 2)")
        tr, te = np.isin(y_train, common), np.isin(y_test, common)
        X_train, y_train, X_test, y_test = X_train[tr], y_train[tr], X_test[te], y_test[te]
        # inner folds need every class in each training part: at most the smallest class count
        n_inner = int(min(int(p["inner_folds"]), np.unique(y_train, return_counts=True)[1].min()))
        cv = StratifiedKFold(max(n_inner, 2), shuffle=True, random_state=int(seed))
        scoring = "f1_macro"
    elif task_type == "regression":
        if y_train.ndim == 2 and y_train.shape[1] == 1 and p["model"] == "mlp":
            y_train, y_test = y_train.ravel(), y_test.ravel()
        cv = KFold(int(p["inner_folds"]), shuffle=True, random_state=int(seed))
        scoring = "r2"
    else:
        raise ValueError(f"task_type must be 'classification' or 'regression', got {task_type!r}")
    from threadpoolctl import threadpool_limits

    est, grid = _estimator(task_type, p, seed)
    search = GridSearchCV(est, grid, cv=cv, scoring=scoring, refit=True, n_jobs=1)
    # the boosting's OpenMP and BLAS would otherwise take every core of a shared machine (oversubscription)
    with threadpool_limits(limits=int(p["threads"])):
        search.fit(X_train, y_train)
        pred = search.predict(X_test)
    if task_type == "classification":
        value = f1_score(y_test, pred, labels=np.unique(y_train), average="macro", zero_division=0)
    else:
        value = r2_score(y_test, pred, multioutput="uniform_average")
    (name, chosen), = search.best_params_.items()
    return dict(value=float(value), n_train=len(X_train), n_test=len(X_test), chosen=float(chosen))


def nonlinear_probe(
    X: np.ndarray, y: np.ndarray, splits: Sequence[tuple[np.ndarray, np.ndarray]],
    task_type: Literal["classification", "regression"], seed: int, params: Mapping | None = None,
) -> list[dict]:
    """:func:`nonlinear_probe_fold` on every (train_idx, test_idx) of ``splits`` (the linear probe's folds);
    returns one dict per fold with ``fold`` added (fold f uses seed ``seed + f``, as the linear probe)."""
    X, y = np.asarray(X), np.asarray(y)
    out = []
    for fold, (tr, te) in enumerate(splits):
        r = nonlinear_probe_fold(X[tr], y[tr], X[te], y[te], task_type, seed + fold, params)
        log.info("non-linear probe fold %d: %.4f (chosen %g)", fold, r["value"], r["chosen"])
        out.append(dict(fold=fold, **r))
    return out


__all__ = ["NONLINEAR_DEFAULTS", "nonlinear_probe_fold", "nonlinear_probe"]
