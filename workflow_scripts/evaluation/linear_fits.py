"""Fast exact fits of the linear probes that run many times on one feature matrix (spatial rings, spatial consistency).

The spatial-ring probes fit one probe per task × ring × repeat on the same embedding (60 fits per job on HER2ST,
80 on the lung), and the spatial-consistency probe one per fold. The probes are the reference's
(docs/reference.md#probes, docs/reference.md#spatial-rings): ``StandardScaler`` fitted on the training part,
then ``LogisticRegression`` (L2, C = 1, L-BFGS) or ``RidgeCV`` with its alpha chosen by efficient
leave-one-out; this module only calls the libraries so that they do less work:

* **float32 features.** scikit-learn's L-BFGS logistic regression keeps float32 input in float32 (the loss and
  gradient are matrix products with the features), which halves the time per iteration. On HER2ST spatial
  rings the float32 fits are as close to the exact optimum as the float64 fits at the same tolerance (see
  BENCHMARKS.md, "spatial rings: accuracy of the fast path").
* **warm starts** (:class:`WarmStart`): a fit starts from the coefficients of the previous fit of the same
  kind (the previous repeat of the ring, the previous fold), mapped class by class; classes not seen before
  start at 0. L-BFGS then stops at the same gradient tolerance (``tol``, scikit-learn's default 1e-4) after
  fewer iterations. The optimum is unique (the L2-penalised loss is strictly convex), so the start changes
  the solution only within that tolerance.
* **ridge leave-one-out in the eigenbasis** (:func:`ridge_loo`): scikit-learn's ``RidgeCV`` (n > d) forms
  ``X (XᵀX + αI)⁻¹ Xᵀ`` row by row for every alpha (n·d² per alpha); rotating the training rows once into the
  eigenvectors of ``XᵀX`` (n·d²) makes every alpha cost n·d. Same criterion and same alpha as ``RidgeCV(alphas,
  scoring="r2")`` (tested).

Pure functions on arrays; no I/O.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

#: L-BFGS gradient tolerance of the probes: scikit-learn's default, as in the reference
LOGREG_TOL = 1e-4


def standardize(X_train: np.ndarray, *others: np.ndarray, dtype=np.float32, copy: bool = True) -> list[np.ndarray]:
    """Standardise with the mean and sd of ``X_train`` (``sklearn.preprocessing.StandardScaler``; sd 0 → 1).

    ``X_train`` (n, d) and every array of ``others`` (m, d) are returned as ``dtype`` arrays, in order.
    ``copy=False`` standardises arrays that already have ``dtype`` in place (for fresh fancy-indexed copies).
    """
    from sklearn.preprocessing import StandardScaler

    arrays = [np.asarray(a, dtype=dtype) for a in (X_train, *others)]
    sc = StandardScaler(copy=copy).fit(arrays[0])
    return [sc.transform(a, copy=copy) for a in arrays]


class WarmStart:
    """Coefficients of the last logistic-regression fit, by class label, to start the next fit from.

    :meth:`init` gives the starting ``(coef (K, d), intercept (K,))`` for a fit on ``classes`` (sorted, as
    scikit-learn orders them): rows of classes fitted before are copied, others are 0; binary problems use
    scikit-learn's single row (the coefficients of the second class). :meth:`update` stores a fitted model.
    """

    def __init__(self) -> None:
        self.coef: dict = {}
        self.intercept: dict = {}
        self.binary: tuple | None = None

    def init(self, classes: Sequence, d: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray] | None:
        """Start for a fit on ``classes`` with ``d`` features, or None when nothing fits (first fit, other d)."""
        classes = list(classes)
        if len(classes) == 2:
            if self.binary is None or self.binary[0] != classes or self.binary[1].shape[1] != d:
                return None
            return self.binary[1].astype(dtype), self.binary[2].astype(dtype)
        known = [c for c in classes if c in self.coef and self.coef[c].shape[0] == d]
        if not known:
            return None
        coef = np.zeros((len(classes), d), dtype=dtype)
        intercept = np.zeros(len(classes), dtype=dtype)
        for k, c in enumerate(classes):
            if c in self.coef and self.coef[c].shape[0] == d:
                coef[k], intercept[k] = self.coef[c], self.intercept[c]
        return coef, intercept

    def update(self, model) -> None:
        """Remember the coefficients of a fitted ``LogisticRegression``."""
        classes = list(model.classes_)
        if len(classes) == 2:
            self.binary = (classes, np.array(model.coef_), np.array(model.intercept_))
            return
        for k, c in enumerate(classes):
            self.coef[c] = np.array(model.coef_[k])
            self.intercept[c] = float(model.intercept_[k])


def fit_logreg(Z_train: np.ndarray, y_train: np.ndarray, *, C: float = 1.0, max_iter: int = 2000,
               tol: float = LOGREG_TOL, random_state: int = 0, warm: WarmStart | None = None):
    """L2 logistic regression (L-BFGS; multinomial for > 2 classes) on standardised features.

    ``Z_train`` (n, d) float32 or float64 (kept), ``y_train`` (n,) labels. With ``warm``, the fit starts from
    :meth:`WarmStart.init` and the fitted coefficients are stored back. Returns the fitted
    ``sklearn.linear_model.LogisticRegression`` (``n_iter_`` = L-BFGS iterations).
    """
    from sklearn.linear_model import LogisticRegression

    classes = np.unique(y_train)
    start = warm.init(classes, Z_train.shape[1], Z_train.dtype) if warm is not None else None
    clf = LogisticRegression(C=float(C), max_iter=int(max_iter), tol=float(tol), random_state=int(random_state),
                             warm_start=start is not None)
    if start is not None:  # warm_start=True starts L-BFGS from coef_/intercept_ (scikit-learn API)
        clf.coef_, clf.intercept_ = start
    clf.fit(Z_train, y_train)
    if warm is not None:
        warm.update(clf)
    return clf


def fit_classifier_split(X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, *, C: float = 1.0,
                         max_iter: int = 2000, tol: float = LOGREG_TOL, random_state: int = 0,
                         warm: WarmStart | None = None, what: str = "split", min_train: int = 10,
                         min_test: int = 5) -> dict | None:
    """Standardised logistic-regression probe on one split; macro-F1 over the classes common to both parts.

    ``X`` (n, d) features, ``y`` (n,) labels, ``train`` / ``test`` row indices. Same protocol as
    :func:`workflow_scripts.evaluation.probes.fit_classifier_fold` (docs/reference.md#probes): rows
    of classes absent from the other part are dropped (logged), None (logged) when fewer than 2 common classes
    or fewer than ``min_train`` / ``min_test`` rows remain; the scaler is fitted on the training part.
    Computed in float32 with an optional warm start (module docstring).
    Returns ``{value, n_train, n_test, n_classes, n_dropped_test, n_iter}``.
    """
    from sklearn.metrics import f1_score

    y_train, y_test = y[train], y[test]
    common = np.intersect1d(np.unique(y_train), np.unique(y_test))
    tr, te = np.isin(y_train, common), np.isin(y_test, common)
    n_drop_tr, n_drop_te = int((~tr).sum()), int((~te).sum())
    if n_drop_tr or n_drop_te:
        log.info("%s: dropped %d train / %d test rows of classes not in both parts", what, n_drop_tr, n_drop_te)
    if len(common) < 2:
        log.warning("%s: %d common class(es) (need 2); skipped", what, len(common))
        return None
    if tr.sum() < min_train or te.sum() < min_test:
        log.warning("%s: %d train / %d test rows (need >= %d / %d); skipped", what, tr.sum(), te.sum(),
                    min_train, min_test)
        return None
    Ztr, Zte = standardize(X[train[tr]].astype(np.float32, copy=False), X[test[te]].astype(np.float32, copy=False),
                           copy=False)  # fresh copies: standardised in place
    clf = fit_logreg(Ztr, y_train[tr], C=C, max_iter=max_iter, tol=tol, random_state=random_state, warm=warm)
    del Ztr
    pred = clf.predict(Zte)
    f1 = f1_score(y_test[te], pred, labels=common, average="macro", zero_division=0)
    return dict(value=float(f1), n_train=int(tr.sum()), n_test=int(te.sum()), n_classes=int(len(common)),
                n_dropped_test=n_drop_te, n_iter=int(np.max(clf.n_iter_)))


@dataclass
class RidgeFit:
    """Result of :func:`ridge_loo`: ``coef`` (d, k), ``intercept`` (k,), chosen ``alpha``, its LOO R² ``loo_r2``."""

    coef: np.ndarray
    intercept: np.ndarray
    alpha: float
    loo_r2: float

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predictions (m, k) for rows ``X`` (m, d) on the scale the model was fitted on."""
        return np.asarray(X, dtype=np.float64) @ self.coef + self.intercept


def ridge_loo(X: np.ndarray, Y: np.ndarray, alphas: Sequence[float], overwrite_x: bool = False) -> RidgeFit:
    """Ridge regression with one alpha for all outputs chosen by leave-one-out R² (as ``RidgeCV(scoring="r2")``).

    Parameters
    ----------
    X : (n, d) features. ``XᵀX`` and the d × d algebra are float64; the n × d products keep X's dtype
        (float32 halves their time) when n > 2d, and are float64 otherwise: with few rows per feature the
        leverages approach 1 and the leave-one-out residuals ``e / (1 − h)`` amplify rounding errors.
    Y : (n,) or (n, k) targets.
    alphas : candidate penalties (> 0).
    overwrite_x : centre ``X`` in place (saves a copy of it; the caller's array is changed).

    With an unpenalised intercept the hat matrix of ridge is ``H = 11ᵀ/n + X̃ (X̃ᵀX̃ + αI)⁻¹ X̃ᵀ`` (X̃ = centred X),
    and the leave-one-out residual of row i is ``(yᵢ − ŷᵢ) / (1 − Hᵢᵢ)`` (the leave-one-out identity of linear
    smoothers; Hastie, Tibshirani & Friedman, *The Elements of Statistical Learning*, 2nd ed., 2009, section
    7.10.1). With ``X̃ᵀX̃ = V Λ Vᵀ`` and ``P = X̃ V``: ``ŷ = ȳ + P diag(1/(λ+α)) Pᵀ ỹ`` and
    ``Hᵢᵢ = 1/n + Σⱼ Pᵢⱼ² / (λⱼ + α)``. The alpha with the highest ``r2_score(Y, Y_loo)`` (uniform average over
    outputs; the first on ties) is kept, exactly as ``sklearn.linear_model.RidgeCV(alphas, scoring="r2")``
    chooses it.

    Returns a :class:`RidgeFit`. Raises ValueError for fewer than 3 rows, mismatched rows or alphas ≤ 0.
    """
    from sklearn.metrics import r2_score

    X = np.asarray(X)
    if X.dtype != np.float64 and X.shape[0] <= 2 * X.shape[1]:
        X = X.astype(np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    one_d = Y.ndim == 1
    Y2 = Y[:, None] if one_d else Y
    a = np.asarray(alphas, dtype=np.float64).ravel()
    n = X.shape[0]
    if n < 3 or Y2.shape[0] != n or a.size == 0 or np.any(a <= 0):
        raise ValueError(f"ridge_loo: need >= 3 rows, equal rows in X {X.shape} and Y {Y.shape}, alphas > 0 "
                         f"(got {list(a)})")
    x_mean = X.mean(axis=0, dtype=np.float64)
    if overwrite_x and X.flags.writeable:
        X -= x_mean.astype(X.dtype)
        Xc = X
    else:
        Xc = X - x_mean.astype(X.dtype)
    del X
    y_mean = Y2.mean(axis=0)
    Yc = Y2 - y_mean
    lam, V = np.linalg.eigh(_gram64(Xc))
    lam = np.clip(lam, 0.0, None)
    P = Xc @ V.astype(Xc.dtype)                            # (n, d): rows in the eigenbasis
    del Xc
    PtY = P.T.astype(np.float64) @ Yc                      # (d, k)
    P2 = np.square(P)                                      # leverages: Σⱼ Pᵢⱼ² / (λⱼ + α)
    best = None
    for alpha in a:
        f = 1.0 / (lam + alpha)
        Yhat = P @ (f[:, None] * PtY).astype(P.dtype) + y_mean
        h = (P2 @ f.astype(P2.dtype)).astype(np.float64) + 1.0 / n
        loo = Y2 - (Y2 - Yhat) / (1.0 - h)[:, None]
        score = r2_score(Y2, loo)
        if best is None or score > best[0]:
            best = (score, alpha, f)
    score, alpha, f = best
    coef = V @ (f[:, None] * PtY)                          # (d, k)
    intercept = y_mean - x_mean @ coef
    if one_d:
        coef, intercept = coef[:, 0], intercept[0]
    return RidgeFit(coef=coef, intercept=np.asarray(intercept), alpha=float(alpha), loo_r2=float(score))


def _gram64(X: np.ndarray, block: int = 8192) -> np.ndarray:
    """``XᵀX`` accumulated in float64 over row blocks (float32 sums of n products lose the small eigenvalues)."""
    if X.dtype == np.float64:
        return X.T @ X
    G = np.zeros((X.shape[1], X.shape[1]))
    for i in range(0, X.shape[0], block):
        b = X[i:i + block].astype(np.float64)
        G += b.T @ b
    return G


def fit_regressor_split(X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, *,
                        alphas: Sequence[float], what: str = "split", min_train: int = 10,
                        min_test: int = 5) -> dict | None:
    """Standardised ridge probe on one split, alpha by leave-one-out R² on the training part (:func:`ridge_loo`);
    R² on the test part, uniform average over outputs (docs/reference.md#probes).

    ``X`` (n, d), ``y`` (n, k), ``train`` / ``test`` row indices. Same protocol and results as
    :func:`workflow_scripts.evaluation.probes.fit_regressor_fold` (``RidgeCV``); features in float32.
    Returns ``{value, n_train, n_test, alpha}`` or None (logged) when fewer than ``min_train`` / ``min_test`` rows.
    """
    from sklearn.metrics import r2_score

    if len(train) < min_train or len(test) < min_test:
        log.warning("%s: %d train / %d test rows (need >= %d / %d); skipped", what, len(train), len(test),
                    min_train, min_test)
        return None
    Z = standardize(X[train].astype(np.float32, copy=False), X[test].astype(np.float32, copy=False), copy=False)
    fit = ridge_loo(Z.pop(0), y[train], alphas, overwrite_x=True)  # the training rows are centred in place, freed
    r2 = r2_score(y[test], fit.predict(Z[0]), multioutput="uniform_average")
    return dict(value=float(r2), n_train=len(train), n_test=len(test), alpha=fit.alpha)
