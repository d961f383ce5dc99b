"""Linear probes on a spot embedding, scored on shared folds (docs/reference.md#probes).

For every task of a dataset (``config: datasets.<d>.tasks``) the embedding of each spot is the feature vector
of a linear probe, fit on the training part of each fold of the task and scored on its test part. The folds, the
task's spots and its class set come from the fold table of the dataset, protocol and seed
(:mod:`workflow_scripts.evaluation.folds`), so every embedding is scored on identical splits.

* **classification** (``type: classification, label: <obs column>, exclude: [...]``): ``StandardScaler`` fit
  on the training part → multinomial L2 logistic regression whose inverse regularisation strength C is
  chosen from ``probe.logreg_Cs`` by an inner stratified ``inner_folds``-fold cross-validation on the training
  part only (``LogisticRegressionCV``, scored by macro-F1, refit on the whole training part with the best C) →
  macro-F1 on the test part over the task's fixed class set (:func:`macro_f1`). The reference fits C = 1
  (docs/reference.md#probes); a fixed C rewards or penalises an embedding for its dimension and scale, whatever
  it encodes (docs/evaluation.md#probes).
* **regression** (``type: regression, obsm: <obsm key>``): ``StandardScaler`` → ridge regression with one alpha
  for all outputs chosen by efficient leave-one-out on the training part, the criterion of ``RidgeCV(alphas,
  scoring="r2")`` (computed by :func:`workflow_scripts.evaluation.linear_fits.ridge_loo`) → R² on the test part,
  uniform average over the outputs (as in the reference, docs/reference.md#probes).

Before the logistic fits the standardised training part is replaced by its coordinates in its own row space
(:func:`reduce_rank`): an L2-penalised linear model's weights lie in that space, so the fitted probe and its
predictions are unchanged, while a D-dimensional embedding of rank r < D is fitted at the cost of r dimensions.
A fold needs ≥ 10 training and ≥ 5 test spots and two classes in its training part (reference,
docs/reference.md#probes); a fold that has not is skipped with a log line.

Output (long format, one row per task × fold; :data:`PROBE_COLUMNS`): ``protocol, task, task_type, metric, fold,
value, n_train, n_test, n_buffer, n_classes, n_classes_test, n_classes_unseen, C, alpha, dim, rank, outer,
scheme, unit, split_hash, chance``; the CLI prepends ``dataset, embedding, seed``. ``n_classes`` is the size of the
task's fixed class set, ``n_classes_test`` the classes present in the test part, ``n_classes_unseen`` those
absent from the training part (their test spots cannot be predicted right); ``C`` / ``alpha`` the chosen
regularisation; ``dim`` / ``rank`` the embedding's dimension and the rank the logistic probe was fit in;
``outer`` the interface that embedded the fold (-1: transductive); ``unit`` the bootstrap unit of the fold
(:mod:`workflow_scripts.evaluation.bootstrap`); ``split_hash`` a checksum of the fold's training and test spot
ids, equal for every embedding that was scored on the same split; ``chance`` the fold's chance level: the
expected macro-F1 of a stratified random classifier over the classes present in both parts
(:func:`workflow_scripts.evaluation.scores.expected_macro_f1_from_labels`), 0 for R² (predicting the training
mean).
"""

from __future__ import annotations

import argparse
import logging
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import f1_score, r2_score
from sklearn.model_selection import GroupKFold, KFold, StratifiedKFold, StratifiedShuffleSplit
from sklearn.preprocessing import StandardScaler

from ..io import drop_invalid_rows, json_arg, read_embedding, setup_logging
from .scores import expected_macro_f1_from_labels
from .tasks import check_tasks

log = logging.getLogger(__name__)

PROBE_COLUMNS = [
    "protocol", "task", "task_type", "metric", "fold", "value", "n_train", "n_test", "n_buffer",
    "n_classes", "n_classes_test", "n_classes_unseen", "C", "alpha", "dim", "rank", "outer", "scheme", "unit",
    "split_hash", "chance",
]
MIN_TRAIN = 10  # ≥10 training rows per fold, as in the reference (docs/reference.md#probes)
MIN_TEST = 5    # ≥5 test rows per fold, as in the reference (docs/reference.md#probes)
TASK_TYPES = ("classification", "regression")
DEFAULT_ALPHAS = list(np.logspace(-3, 3, 10))  # the reference's RidgeCV alphas (docs/reference.md#probes)
DEFAULT_CS = list(np.logspace(-4, 2, 7))
DEFAULT_INNER_FOLDS = 3
NEWTON_MAX_HESSIAN = 800  # Newton–Cholesky up to an 800 × 800 Hessian (see logreg_solver)
RANK_RTOL = 1e-6  # singular values below this fraction of the largest: float32 rounding of the stored embedding


# ----------------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------------
def check_task_spec(task: str, spec: Mapping) -> str:
    """Validate one task entry of ``config: datasets.<d>.tasks`` and return its type.

    Raises ValueError naming the task and the missing/invalid key.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"task {task!r}: spec must be a mapping, got {spec!r}")
    ttype = spec.get("type")
    if ttype not in TASK_TYPES:
        raise ValueError(f"task {task!r}: 'type' must be one of {TASK_TYPES}, got {ttype!r} (fix datasets.<d>.tasks)")
    key = "label" if ttype == "classification" else "obsm"
    if not spec.get(key):
        raise ValueError(f"task {task!r}: a {ttype} task needs the key {key!r} (fix datasets.<d>.tasks)")
    return ttype


def clean_labels(
    labels: pd.Series,
    exclude: Sequence[str] | None = None,
    min_class_size: int = 10,
    what: str = "labels",
) -> pd.Series:
    """Clean a classification label column; return the kept labels as strings (index preserved).

    Steps, each counted in the log: (1) drop missing (NaN/None) labels; (2) drop classes listed in
    ``exclude`` (compared as strings); (3) drop classes with fewer than ``min_class_size`` spots (each
    dropped class named with its count). Labels are returned as ``str`` so that classes compare the same
    across files. ``what`` names the task in log messages.
    """
    s = labels.astype(object)
    s = s[s.notna()]
    n_nan = len(labels) - len(s)
    if n_nan:
        log.info("%s: dropped %d of %d spots with no label", what, n_nan, len(labels))
    s = s.astype(str)
    excl = {str(e) for e in (exclude or [])}
    if excl:
        mask = s.isin(excl)
        for cls, cnt in s[mask].value_counts().sort_index().items():
            log.info("%s: dropped excluded class %r (%d spots)", what, cls, int(cnt))
        for cls in sorted(excl - set(s.unique())):
            log.info("%s: excluded class %r not present", what, cls)
        s = s[~mask]
    counts = s.value_counts()
    rare = counts[counts < int(min_class_size)].sort_index()
    for cls, cnt in rare.items():
        log.warning("%s: dropped rare class %r (%d spots < min_class_size %d)", what, cls, int(cnt), min_class_size)
    if len(rare):
        s = s[~s.isin(rare.index)]
    log.info("%s: %d spots in %d classes kept", what, len(s), s.nunique())
    return s


def clean_regression_targets(values: np.ndarray, ids: Sequence[str], what: str = "targets") -> pd.DataFrame:
    """Keep the rows of an ``(n_spots, n_outputs)`` target matrix that are finite and not all zero.

    Returns a DataFrame indexed by spot id; dropped rows are counted in the log.
    Raises ValueError when ``values`` is not 2-D or its row count differs from ``ids``.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] != len(ids):
        raise ValueError(f"{what}: expected a 2-D matrix with {len(ids)} rows, got shape {values.shape}")
    finite = np.isfinite(values).all(axis=1)
    zero = finite & (np.abs(values).sum(axis=1) == 0)
    if (~finite).any():
        log.warning("%s: dropped %d of %d rows with non-finite targets", what, int((~finite).sum()), len(ids))
    if zero.any():
        log.warning("%s: dropped %d of %d all-zero target rows", what, int(zero.sum()), len(ids))
    keep = finite & ~zero
    return pd.DataFrame(values[keep], index=pd.Index(np.asarray(ids, dtype=str)[keep], name="spot_id"))


def task_targets(
    adata: ad.AnnData, task: str, spec: Mapping, min_class_size: int = 10
) -> pd.Series | pd.DataFrame | None:
    """Targets of one task for the spots of ``adata`` (docs/reference.md#probes, docs/reference.md#flaw-13).

    Classification → ``pd.Series`` of string labels (``obs[spec['label']]`` cleaned by
    :func:`clean_labels`); regression → ``DataFrame`` (spots × outputs) from ``obsm[spec['obsm']]`` cleaned by
    :func:`clean_regression_targets`. Both are indexed by spot id and contain only the usable spots
    (e.g. a label present on one section only applies to that section's labelled spots).
    Returns None (with a logged warning) when the label column / obsm key is absent or fewer than
    2 classes remain. Raises ValueError for an invalid ``spec``.
    """
    ttype = check_task_spec(task, spec)
    if ttype == "classification":
        col = spec["label"]
        if col not in adata.obs.columns:
            log.warning("task %s: obs has no column %r; task skipped", task, col)
            return None
        y = clean_labels(adata.obs[col], spec.get("exclude"), min_class_size, what=f"task {task}")
        if y.nunique() < 2:
            log.warning("task %s: %d class(es) left after cleaning (need 2); task skipped", task, y.nunique())
            return None
        return y
    key = spec["obsm"]
    if key not in adata.obsm:
        log.warning("task %s: obsm has no key %r; task skipped", task, key)
        return None
    y = clean_regression_targets(np.asarray(adata.obsm[key]), adata.obs_names, what=f"task {task}")
    if len(y) == 0:
        log.warning("task %s: no usable target rows; task skipped", task)
        return None
    return y


# ----------------------------------------------------------------------------------------------------
# cross-validation
# ----------------------------------------------------------------------------------------------------
def cv_splits(
    n: int, groups: np.ndarray | None, probe_params: Mapping, seed: int, what: str = "probe"
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fold index pairs ``(train_idx, test_idx)`` over ``n`` rows, for callers that split one table themselves
    (the probes of this module read shared fold tables instead, :mod:`workflow_scripts.evaluation.folds`).

    ``probe_params['cv']``: ``kfold`` → ``KFold(n_folds, shuffle=True, random_state=seed)`` (docs/reference.md#probes);
    ``group_slide`` → ``GroupKFold`` over ``groups`` (slide per row); with fewer slides than folds
    ``n_folds`` becomes the number of slides (logged); with one slide no split is possible (warning, []).
    Raises ValueError for an unknown ``cv`` or ``n_folds`` < 2.
    """
    cv = probe_params.get("cv", "kfold")
    n_folds = int(probe_params.get("n_folds", 5))
    if n_folds < 2:
        raise ValueError(f"probe.n_folds must be >= 2, got {n_folds}")
    if cv == "kfold":
        if n < n_folds:
            log.warning("%s: %d rows < n_folds %d; no folds", what, n, n_folds)
            return []
        return list(KFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(n)))
    if cv == "group_slide":
        if groups is None:
            raise ValueError("probe.cv = group_slide needs the slide of every row")
        n_groups = len(pd.unique(np.asarray(groups)))
        if n_groups < 2:
            log.warning("%s: group_slide CV needs >= 2 slides, the task's spots lie on %d; no folds", what, n_groups)
            return []
        if n_groups < n_folds:
            log.info("%s: only %d slides; group_slide uses %d folds instead of %d", what, n_groups, n_groups, n_folds)
            n_folds = n_groups
        return list(GroupKFold(n_folds).split(np.zeros(n), groups=np.asarray(groups)))
    raise ValueError(f"probe.cv must be 'kfold' or 'group_slide', got {cv!r} (fix config probe.cv)")


# ----------------------------------------------------------------------------------------------------
# probes on one split
# ----------------------------------------------------------------------------------------------------
def fit_classifier_fold(
    X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
    max_iter: int, random_state: int, what: str = "fold",
    min_train: int = MIN_TRAIN, min_test: int = MIN_TEST,
) -> dict | None:
    """Scaled logistic-regression probe at C = 1 on one split; macro-F1 over the classes common to both parts.

    The reference's probe (used by the neighbour-ring probes); the per-task probes use :func:`fit_logreg_cv_fold`.

    ``X_*``: (n, d) features; ``y_*``: (n,) labels. Rows whose class is absent from the other part are
    dropped (counted in the log). Returns ``{value, n_train, n_test, n_classes, n_dropped_test}`` or None
    (logged) when < 2 common classes, < ``min_train`` (10) training or < ``min_test`` (5) test rows remain.
    Source: the reference's ``evaluate_simple`` (docs/reference.md#probes).
    """
    common = np.intersect1d(np.unique(y_train), np.unique(y_test))
    tr = np.isin(y_train, common)
    te = np.isin(y_test, common)
    n_drop_tr, n_drop_te = int((~tr).sum()), int((~te).sum())
    if n_drop_tr or n_drop_te:
        log.info("%s: dropped %d train / %d test rows of classes not in both parts", what, n_drop_tr, n_drop_te)
    if len(common) < 2:
        log.warning("%s: %d common class(es) (need 2); skipped", what, len(common))
        return None
    if tr.sum() < min_train or te.sum() < min_test:
        log.warning("%s: %d train / %d test rows (need >= %d / %d); skipped",
                    what, tr.sum(), te.sum(), min_train, min_test)
        return None
    scaler = StandardScaler().fit(X_train[tr])
    clf = LogisticRegression(max_iter=int(max_iter), random_state=int(random_state))
    clf.fit(scaler.transform(X_train[tr]), y_train[tr])
    pred = clf.predict(scaler.transform(X_test[te]))
    f1 = f1_score(y_test[te], pred, labels=common, average="macro", zero_division=0)
    return dict(value=float(f1), n_train=int(tr.sum()), n_test=int(te.sum()),
                n_classes=int(len(common)), n_dropped_test=n_drop_te)


def fit_regressor_fold(
    X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
    alphas: Sequence[float], what: str = "fold", min_train: int = MIN_TRAIN, min_test: int = MIN_TEST,
) -> dict | None:
    """Scaled ridge probe on one split; R² on the test part, uniform average over outputs.

    ``X_*``: (n, d); ``y_*``: (n, k). Alpha chosen by efficient leave-one-out on the training part, one alpha for
    all outputs, exactly as ``RidgeCV(alphas, scoring="r2")`` chooses it (docs/reference.md#probes), computed by
    :func:`workflow_scripts.evaluation.linear_fits.ridge_loo` in float64: one eigendecomposition of ``XᵀX`` for
    all alphas instead of n·d² work per alpha (same alpha, coefficients equal to rounding; tested).
    Returns ``{value, n_train, n_test, alpha}`` or None (logged) with < ``min_train`` (10) train or
    < ``min_test`` (5) test rows.
    """
    if len(X_train) < min_train or len(X_test) < min_test:
        log.warning("%s: %d train / %d test rows (need >= %d / %d); skipped",
                    what, len(X_train), len(X_test), min_train, min_test)
        return None
    from .linear_fits import ridge_loo

    scaler = StandardScaler().fit(X_train)
    fit = ridge_loo(scaler.transform(X_train), np.asarray(y_train, dtype=np.float64), alphas, overwrite_x=True)
    pred = fit.predict(scaler.transform(X_test))
    r2 = r2_score(y_test, pred, multioutput="uniform_average")
    return dict(value=float(r2), n_train=len(X_train), n_test=len(X_test), alpha=float(fit.alpha))


# ----------------------------------------------------------------------------------------------------
# tuned probes on shared folds
# ----------------------------------------------------------------------------------------------------
def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> float:
    """Macro-F1 over a task's fixed class set.

    The mean of the per-class F1 = 2 TP / (2 TP + FP + FN) over the classes of ``classes`` that occur in
    ``y_true`` or ``y_pred``; a class that is neither present nor predicted has no F1 and is left out
    (``sklearn.metrics.f1_score(labels=classes, average="macro", zero_division=nan)``). A class present in the
    test part but never predicted (e.g. absent from the training part) scores 0. ``y_true``, ``y_pred``: (n,).
    Returns NaN when no class of ``classes`` occurs.
    """
    with np.errstate(invalid="ignore"):
        return float(f1_score(y_true, y_pred, labels=list(classes), average="macro", zero_division=np.nan))


def reduce_rank(X_train: np.ndarray, X_test: np.ndarray, rtol: float = RANK_RTOL, keep_full_rank: bool = False
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """Coordinates of the training and test rows in the row space of ``X_train``.

    ``X_train = U S Vᵀ`` (thin SVD); with r the number of singular values > ``rtol`` · the largest, returns
    ``(X_train V_r, X_test V_r, r)`` of shapes (n_train, r), (n_test, r). An L2-penalised linear model with an
    unpenalised intercept has its weight vector w in the row space of its training data (a component orthogonal
    to every training row changes no training prediction and only adds penalty), so fitting on ``X V_r`` with
    weights β and predicting ``X_test V_r β`` is the same model and the same predictions (representer theorem:
    Schölkopf, Herbrich & Smola 2001, COLT, doi:10.1007/3-540-44581-1_27). Directions below ``rtol`` carry only
    the rounding noise of the float32 embedding tables.

    ``keep_full_rank=True`` (the large-data path of the single-C probe): with more rows than columns the singular
    values and ``V`` come from the d × d factor R of ``X_train = QR`` (``scipy.linalg.qr``), which has the same
    singular values and right singular vectors, so no n × d factor U is formed; and when r = d the row space is
    the whole feature space, ``V`` is a mere rotation, and the inputs are returned unrotated (float64), the same
    model in the original coordinates.
    """
    X = np.asarray(X_train, dtype=np.float64)
    n, d = X.shape
    if keep_full_rank and n > d:
        from scipy.linalg import qr

        _, s, vt = np.linalg.svd(qr(X, mode="r", check_finite=False)[0][:d], full_matrices=False)
    else:
        _, s, vt = np.linalg.svd(X, full_matrices=False)
    if len(s) == 0 or s[0] == 0:
        return np.zeros((len(X_train), 0)), np.zeros((len(X_test), 0)), 0
    r = int((s > rtol * s[0]).sum())
    if keep_full_rank and r == d:
        return X, np.asarray(X_test, dtype=np.float64), r
    v = vt[:r].T
    return X_train @ v, np.asarray(X_test, dtype=np.float64) @ v, r


def fit_logreg_cv_fold(
    X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
    classes: Sequence[str], Cs: Sequence[float] = DEFAULT_CS, inner_folds: int = DEFAULT_INNER_FOLDS,
    max_iter: int = 2000, random_state: int = 0, what: str = "fold",
    min_train: int = MIN_TRAIN, min_test: int = MIN_TEST,
) -> dict | None:
    """Logistic-regression probe on one split with C chosen by inner cross-validation on the training part.

    Parameters
    ----------
    X_train, X_test : (n_train, d), (n_test, d) features. y_train, y_test : (n_train,), (n_test,) labels.
    classes : the task's fixed class set (macro-F1 is taken over it, :func:`macro_f1`).
    Cs : grid of inverse regularisation strengths (``config: probe.logreg_Cs``).
    inner_folds : folds of the inner ``StratifiedKFold(shuffle=True, random_state)`` on the training part (at most
        the size of the largest class); 1 = a single stratified 75/25 split (``StratifiedShuffleSplit``).
    max_iter : solver iterations; random_state : seed of the inner split.

    Steps: ``StandardScaler`` fit on the training part; :func:`reduce_rank`; ``LogisticRegressionCV(Cs, cv=inner,
    scoring=macro-F1, refit=True)`` (L2, multinomial; the C path is warm-started within each inner fold); predict
    the test part. With a single C (e.g. ``logreg_Cs: [1.0]``, the reference's probe) there is nothing to choose:
    one ``LogisticRegression(C)`` fit on the training part, no inner split (the cheap setting for lung-scale data);
    a full-rank fold is then fit in its own coordinates (``reduce_rank(keep_full_rank=True)``) and, with lbfgs, on
    float32 features, which scikit-learn keeps in float32 (half the time per iteration; the optimum moves within
    the solver tolerance, BENCHMARKS.md).
    The test part is never seen before the final prediction. Solver (:func:`logreg_solver`): Newton–Cholesky
    while the multinomial Hessian is small, else lbfgs; both minimise the same objective, the Newton steps converge
    in a few iterations where lbfgs stalls on ill-conditioned features.

    Returns
    -------
    ``{value, C, n_train, n_test, n_classes, n_classes_test, n_classes_unseen, dim, rank}`` or None (logged) when
    fewer than ``min_train`` training / ``min_test`` test rows or fewer than 2 classes in the training part.
    """
    classes = [str(c) for c in classes]
    y_train, y_test = np.asarray(y_train).astype(str), np.asarray(y_test).astype(str)
    if len(y_train) < min_train or len(y_test) < min_test:
        log.warning("%s: %d train / %d test rows (need >= %d / %d); skipped", what, len(y_train), len(y_test),
                    min_train, min_test)
        return None
    seen = np.unique(y_train)
    if len(seen) < 2:
        log.warning("%s: %d class(es) in the training part (need 2); skipped", what, len(seen))
        return None
    unseen = sorted(set(classes) - set(seen))
    in_test = sorted(set(np.unique(y_test)) & set(classes))
    if unseen:
        log.info("%s: classes absent from the training part (their test spots score as errors): %s", what, unseen)
    scaler = StandardScaler().fit(X_train)
    single = len(Cs) == 1
    Xtr, Xte, r = reduce_rank(scaler.transform(X_train), scaler.transform(X_test), keep_full_rank=single)
    solver = logreg_solver(r, len(seen))
    if single:  # nothing to choose: one fit on the training part, no inner split
        clf = LogisticRegression(C=float(Cs[0]), solver=solver, max_iter=int(max_iter))
        if solver == "lbfgs" and r == X_train.shape[1]:  # large data: float32 products (docstring above)
            Xtr, Xte = Xtr.astype(np.float32), Xte.astype(np.float32)
    else:
        if int(inner_folds) == 1:
            inner = StratifiedShuffleSplit(1, test_size=0.25, random_state=int(random_state))
        else:
            k = int(min(inner_folds, np.bincount(np.unique(y_train, return_inverse=True)[1]).max()))
            inner = StratifiedKFold(max(k, 2), shuffle=True, random_state=int(random_state))
        clf = LogisticRegressionCV(
            Cs=[float(c) for c in Cs], l1_ratios=(0.0,), cv=inner, solver=solver,
            scoring=_inner_macro_f1, max_iter=int(max_iter), refit=True,
            use_legacy_attributes=False,
        )
    clf.fit(Xtr, y_train)
    value = macro_f1(y_test, clf.predict(Xte), classes)
    return dict(value=value, C=float(Cs[0]) if single else float(clf.C_), n_train=int(len(y_train)),
                n_test=int(len(y_test)), n_classes=len(classes), n_classes_test=len(in_test),
                n_classes_unseen=len(unseen), dim=int(X_train.shape[1]), rank=int(r))


def _inner_macro_f1(estimator, X: np.ndarray, y: np.ndarray) -> float:
    """Scorer of the inner split: macro-F1 over the classes present in it (0 for an empty class)."""
    return float(f1_score(y, estimator.predict(X), average="macro", zero_division=0.0))


def logreg_solver(rank: int, n_classes: int, max_hessian: int = NEWTON_MAX_HESSIAN) -> str:
    """``newton-cholesky`` when the multinomial Hessian, of side (rank + 1) · n_classes, is at most
    ``max_hessian``, else ``lbfgs`` (sklearn solvers of the same L2 logistic objective)."""
    return "newton-cholesky" if (rank + 1) * max(n_classes, 1) <= max_hessian else "lbfgs"


def split_hash(train_ids: Sequence[str], test_ids: Sequence[str]) -> str:
    """8-hex-digit CRC32 of the sorted training and test spot ids: equal for two probes iff (barring collisions)
    they were fit and scored on the same spots."""
    key = ",".join(sorted(map(str, train_ids))) + "|" + ",".join(sorted(map(str, test_ids)))
    return f"{zlib.crc32(key.encode()):08x}"


def _targets_for(adata: ad.AnnData, spec: Mapping, ids: pd.Index):
    pos = pd.Index(adata.obs_names.astype(str)).get_indexer(ids)
    if (pos < 0).any():
        raise ValueError(f"{int((pos < 0).sum())} spots of the fold table are not in the spots AnnData "
                         f"(e.g. {list(ids[pos < 0][:3])}); were the folds built from this dataset?")
    if spec["type"] == "classification":
        return adata.obs[spec["label"]].astype(str).to_numpy()[pos]
    y = np.asarray(adata.obsm[spec["obsm"]], dtype=np.float64)[pos]
    return y[:, None] if y.ndim == 1 else y


def _nonlinear_row(common: dict, metric: str, chance: float, Xtr, ytr, Xte, yte, ttype: str, seed: int,
                   params: Mapping, what: str) -> dict:
    """One fold of the non-linear ceiling probe (:mod:`.nonlinear`), as a probe-table row with metric
    ``<metric>_nonlinear``; the chosen hyperparameter goes to ``C`` (MLP alpha or boosting leaves)."""
    from .nonlinear import nonlinear_probe_fold

    res = nonlinear_probe_fold(Xtr, ytr, Xte, yte, ttype, seed, params)
    log.info("%s: %s_nonlinear = %.4f (hyperparameter %g)", what, metric, res["value"], res["chosen"])
    return dict(common, metric=f"{metric}_nonlinear", value=res["value"], n_train=res["n_train"],
                n_test=res["n_test"], n_classes=np.nan, n_classes_test=np.nan, n_classes_unseen=np.nan,
                C=res["chosen"], alpha=np.nan, dim=Xtr.shape[1], rank=np.nan, chance=chance)


def run_probes(
    emb: pd.DataFrame | Mapping[int, pd.DataFrame],
    adata: ad.AnnData,
    tasks: Mapping[str, Mapping],
    probe_params: Mapping,
    seed: int,
    min_class_size: int = 10,
    folds: pd.DataFrame | None = None,
    meta: Mapping | None = None,
    what: str = "embedding",
) -> pd.DataFrame:
    """Probe every task of ``tasks`` on its folds (module docstring).

    Parameters
    ----------
    emb : (n_spots, d) embedding indexed by spot id, or ``{outer fold: embedding}`` under the inductive protocol
        (each fold is scored with the embedding of its ``outer`` interface).
    adata : spots AnnData; labels in ``obs``, regression targets in ``obsm``.
    tasks : ``{task: {type, label|obsm, exclude}}`` (``config: datasets.<d>.tasks``).
    probe_params : ``config: probe`` (``n_folds``, ``cv``, ``logreg_Cs``, ``inner_folds``, ``logreg_max_iter``,
        ``ridge_alphas``, ``nonlinear``: false, true or the settings of :mod:`.nonlinear`; when set, every fold
        also gets a row with metric ``macro_f1_nonlinear`` / ``r2_nonlinear``, the embedding's non-linear ceiling
        on the same split).
    seed : run seed; the inner split of fold f uses ``random_state = seed + f``.
    min_class_size : used only when ``folds`` is None.
    folds, meta : the fold table and its side dict (:func:`workflow_scripts.evaluation.folds.read_folds`). When
        None, transductive folds are built here from ``adata`` (:func:`workflow_scripts.evaluation.folds.make_folds`).

    Returns
    -------
    The long table (:data:`PROBE_COLUMNS`). Spots of a fold that the embedding lacks (absent or non-finite rows)
    are left out of that fold and counted in the log. Raises ValueError for invalid task specs, or an outer fold
    with no embedding.
    """
    from .folds import make_folds, split_ids

    for t, spec in tasks.items():
        check_task_spec(t, spec)
    if folds is None:
        obs = adata.obs[[c for c in ("slide", "donor", "x_um", "y_um") if c in adata.obs.columns]]
        spots = {}
        for t, spec in tasks.items():
            y = task_targets(adata, t, spec, min_class_size)
            if y is not None:
                spots[t] = y.index
        folds, meta = make_folds(obs, spots, "transductive", int(probe_params.get("n_folds", 5)), seed,
                                 probe_params.get("cv", "kfold"))
    protocol = meta.get("protocol", "transductive")
    embs = dict(emb) if isinstance(emb, Mapping) else {None: emb}
    mats = {}
    for k, e in embs.items():
        e = e.copy()
        e.index = e.index.astype(str)
        e = drop_invalid_rows(e, f"{what}" + ("" if k is None else f" (outer {k})"), log)
        mats[k] = (pd.Index(e.index), e.to_numpy(dtype=np.float64))
    fold_spots = pd.Index(folds["spot_id"].astype(str).unique())
    for k, (index, _) in mats.items():
        n_out = int((~index.isin(fold_spots)).sum())
        if n_out:
            log.info("%s%s: %d of %d embedding rows are not among the fold table's spots (unlabelled or not in the "
                     "dataset) and are not probed", what, "" if k is None else f" (outer {k})", n_out, len(index))
    Cs = probe_params.get("logreg_Cs") or DEFAULT_CS
    inner = int(probe_params.get("inner_folds", DEFAULT_INNER_FOLDS))
    max_iter = int(probe_params.get("logreg_max_iter", 2000))
    alphas = probe_params.get("ridge_alphas") or DEFAULT_ALPHAS
    nl = probe_params.get("nonlinear", False)
    nonlinear = None if nl is False or nl is None else ({} if nl is True else dict(nl))
    rows = []
    for task, spec in tasks.items():
        tm = (meta.get("tasks") or {}).get(task)
        tf = folds[folds["task"] == task]
        if tm is None or tf.empty:
            log.warning("task %s: no folds in the fold table (no usable spots); task skipped", task)
            continue
        ttype = spec["type"]
        ids_all = pd.Index(tf["spot_id"].astype(str))
        y_all = pd.Series(list(_targets_for(adata, spec, ids_all)), index=ids_all) if ttype == "classification" \
            else pd.DataFrame(_targets_for(adata, spec, ids_all), index=ids_all)
        classes = None
        if ttype == "classification":
            classes = tm.get("classes") or sorted(set(y_all))
        n_done = 0
        for fold in sorted(set(tf["fold"].astype(int))):
            fm = tm["folds"][str(fold)]
            outer = int(fm["outer"])
            key = None if None in mats else outer
            if key not in mats:
                raise ValueError(f"task {task} fold {fold} is embedded by outer fold {outer}, but no embedding was "
                                 f"given for it (got outer folds {sorted(k for k in mats if k is not None)})")
            index, X = mats[key]
            tr, te, buf = split_ids(tf, fold)
            w = f"task {task} fold {fold}"
            pos_tr, pos_te = index.get_indexer(tr), index.get_indexer(te)
            miss = int((pos_tr < 0).sum() + (pos_te < 0).sum())
            if miss:
                log.warning("%s: %d of %d spots have no (finite) embedding row and are left out", w, miss,
                            len(tr) + len(te))
            tr, te = tr[pos_tr >= 0], te[pos_te >= 0]
            Xtr, Xte = X[pos_tr[pos_tr >= 0]], X[pos_te[pos_te >= 0]]
            common = dict(protocol=protocol, task=task, task_type=ttype, fold=fold, n_buffer=len(buf), outer=outer,
                          scheme=tm["scheme"], unit=fm["unit"], split_hash=split_hash(tr, te))
            if ttype == "classification":
                ytr, yte = y_all.loc[tr].to_numpy(), y_all.loc[te].to_numpy()
                res = fit_logreg_cv_fold(Xtr, ytr, Xte, yte, classes, Cs, inner, max_iter, seed + fold, w)
                if res is None:
                    continue
                rows.append(dict(common, metric="macro_f1", alpha=np.nan,
                                 chance=expected_macro_f1_from_labels(ytr, yte), **res))
                if nonlinear is not None:
                    rows.append(_nonlinear_row(common, "macro_f1", rows[-1]["chance"], Xtr, ytr, Xte, yte, ttype,
                                               seed + fold, nonlinear, w))
            else:
                res = fit_regressor_fold(Xtr, y_all.loc[tr].to_numpy(), Xte, y_all.loc[te].to_numpy(), alphas, w)
                if res is None:
                    continue
                rows.append(dict(common, metric="r2", C=np.nan, n_classes=np.nan, n_classes_test=np.nan,
                                 n_classes_unseen=np.nan, dim=Xtr.shape[1], rank=np.nan, chance=0.0, **res))
                if nonlinear is not None:
                    rows.append(_nonlinear_row(common, "r2", 0.0, Xtr, y_all.loc[tr].to_numpy(), Xte,
                                               y_all.loc[te].to_numpy(), ttype, seed + fold, nonlinear, w))
            n_done += 1
            r = next(q for q in reversed(rows) if not q["metric"].endswith("_nonlinear"))
            log.info("%s: %s = %.4f (n_train %d, n_test %d, n_buffer %d, %s)", w, r["metric"], r["value"],
                     r["n_train"], r["n_test"], r["n_buffer"],
                     f"C {r['C']:.3g}, rank {r['rank']}" if ttype == "classification" else f"alpha {r['alpha']:.3g}")
        if n_done == 0:
            log.warning("task %s: no fold could be evaluated", task)
        else:
            vals = [r["value"] for r in rows if r["task"] == task and not r["metric"].endswith("_nonlinear")]
            log.info("task %s: %d folds, mean %.4f sd %.4f", task, n_done, np.nanmean(vals), np.nanstd(vals))
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)


def control_embeddings(
    gex: pd.DataFrame, img: pd.DataFrame, d_out: int, seed: int, kinds: Sequence[str],
    fit_ids: Mapping[int | None, Sequence[str] | None],
) -> dict[str, dict]:
    """Dimension-matched controls (:mod:`workflow_scripts.evaluation.controls`) of every kind in ``kinds``.

    ``gex`` (n, d_gex), ``img`` (n, d_img): unimodal embedding tables (restricted here to their shared, finite
    spots, logged); ``fit_ids``: ``{outer fold (None: transductive): spot ids whose statistics standardise the
    inputs (None: all)}``. Returns ``{kind: {outer: (n, d_out) embedding table}}``.
    """
    from ..io import intersect_tables
    from .controls import random_reencoding

    g = drop_invalid_rows(gex, "GEX embedding (controls)", log)
    i = drop_invalid_rows(img, "IMG embedding (controls)", log)
    g, i = intersect_tables({"GEX embedding (controls)": g, "IMG embedding (controls)": i}, log).values()
    ids = pd.Index(g.index.astype(str))
    inputs = {"gex": [g.to_numpy(np.float64)], "img": [i.to_numpy(np.float64)],
              "concat": [i.to_numpy(np.float64), g.to_numpy(np.float64)]}
    out: dict[str, dict] = {}
    for kind in kinds:
        out[kind] = {}
        for outer, fit in fit_ids.items():
            rows = None if fit is None else ids.isin(pd.Index(np.asarray(fit, dtype=str)))
            z = random_reencoding(inputs[kind], int(d_out), int(seed), kind, rows)
            out[kind][outer] = pd.DataFrame(z, index=ids)
    return out


# ----------------------------------------------------------------------------------------------------
# embedding tables and spots
# ----------------------------------------------------------------------------------------------------
def match_embedding(emb: pd.DataFrame, adata: ad.AnnData, what: str = "embedding") -> pd.DataFrame:
    """Rows of ``emb`` (spot_id-indexed, (n, d)) that are finite and whose spot is in ``adata``.

    Both the NaN/inf rows and the spots missing from either side are counted in the log.
    Raises ValueError when no spot is shared.
    """
    emb = emb.copy()
    emb.index = emb.index.astype(str)
    emb = drop_invalid_rows(emb, what, log)
    obs_ids = pd.Index(adata.obs_names.astype(str))
    common = emb.index.intersection(obs_ids, sort=False)
    if len(common) == 0:
        raise ValueError(f"{what}: no spot id shared with the spots AnnData (e.g. {list(emb.index[:3])} vs "
                         f"{list(obs_ids[:3])}); was the embedding built from this dataset?")
    n_emb_only, n_obs_only = len(emb) - len(common), len(obs_ids) - len(common)
    if n_emb_only or n_obs_only:
        log.warning("%s: %d spots shared; %d embedding rows not in the AnnData, %d AnnData spots without "
                    "embedding, both dropped", what, len(common), n_emb_only, n_obs_only)
    else:
        log.info("%s: all %d spots matched", what, len(common))
    return emb.loc[common]


def read_spots(path: str | Path, backed: bool = False) -> ad.AnnData:
    """Read the spots AnnData (``backed``: obs and obsm only, the count matrix stays on disk); FileNotFoundError
    naming the path (and the rule that builds it) if absent."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"spots AnnData not found: {path} (run the rule that builds results/<dataset>/spots.h5ad)"
        )
    return ad.read_h5ad(path, backed="r") if backed else ad.read_h5ad(path)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m workflow_scripts.evaluation.probes --embedding E.parquet [E1.parquet ...] --spots spots.h5ad
    --dataset D --name NAME --seed S --tasks JSON --params JSON [--folds FOLDS.tsv] [--controls gex img concat
    --controls-gex GEX.parquet --controls-img IMG.parquet] [--min-class-size N] --out OUT.tsv --log LOG``.

    ``--embedding``: one table, or one per outer fold of the inductive protocol (in outer-fold order 0, 1, ...).
    ``--folds``: the fold table (:mod:`workflow_scripts.evaluation.folds`; its ``.json`` side file next to it);
    without it, transductive folds are built from the spots (``--min-class-size`` cleans the labels then).
    ``--controls``: also probe the dimension-matched random re-encodings of GEX / IMG / [IMG ‖ GEX], named
    ``control_<kind>@NAME`` (:mod:`workflow_scripts.evaluation.controls`). Writes one TSV with the columns
    ``dataset, embedding, seed`` followed by :data:`PROBE_COLUMNS`.
    """
    from .controls import CONTROL_KINDS, control_name
    from .folds import fit_spot_ids, read_folds

    p = argparse.ArgumentParser(prog="python -m workflow_scripts.evaluation.probes", description=__doc__.split("\n")[0])
    p.add_argument("--embedding", required=True, nargs="+",
                   help="embedding parquet, or one per outer fold (inductive protocol), in outer-fold order")
    p.add_argument("--spots", required=True, help="spots AnnData (results/<dataset>/spots.h5ad)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--name", required=True, help="embedding name written in the 'embedding' column")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--tasks", required=True, help="JSON dict {task: {type, label|obsm, exclude}}")
    p.add_argument("--params", required=True,
                   help="JSON dict {n_folds, cv, logreg_Cs, inner_folds, logreg_max_iter, ridge_alphas}")
    p.add_argument("--folds", default=None, help="fold table TSV of this dataset, protocol and seed")
    p.add_argument("--controls", nargs="*", default=[], choices=CONTROL_KINDS,
                   help="dimension-matched random re-encodings to probe with the same folds")
    p.add_argument("--controls-gex", default=None, help="GEX embedding parquet (for --controls)")
    p.add_argument("--controls-img", default=None, help="IMG embedding parquet (for --controls)")
    p.add_argument("--min-class-size", type=int, default=10, help="label cleaning when no --folds is given")
    p.add_argument("--out", required=True, help="output TSV")
    p.add_argument("--log", default=None)
    args = p.parse_args(argv)
    setup_logging(args.log)
    tasks = json_arg(args.tasks, "--tasks")
    params = json_arg(args.params, "--params")
    if args.controls and not (args.controls_gex and args.controls_img):
        raise SystemExit("--controls needs --controls-gex and --controls-img (the unimodal embedding tables)")
    folds, meta = read_folds(args.folds) if args.folds else (None, None)
    protocol = meta["protocol"] if meta else "transductive"
    log.info("probes: dataset %s, embedding %s, seed %d, protocol %s, tasks %s, params %s", args.dataset, args.name,
             args.seed, protocol, list(tasks), params)
    if len(args.embedding) > 1 and (meta is None or meta.get("n_outer") != len(args.embedding)):
        raise SystemExit(f"{len(args.embedding)} embeddings given; several are allowed only with an inductive "
                         f"--folds table of as many outer folds (its n_outer: {meta and meta.get('n_outer')})")
    tables = [read_embedding(e) for e in args.embedding]
    emb = tables[0] if len(tables) == 1 else dict(enumerate(tables))
    adata = read_spots(args.spots, backed=True)
    check_tasks(adata, tasks, source=args.spots)  # a task whose label/obsm is absent fails the job
    parts = [(args.name, run_probes(emb, adata, tasks, params, args.seed, args.min_class_size, folds, meta,
                                    what=args.name))]
    if args.controls:
        d_out = tables[0].shape[1]
        if protocol == "inductive":
            fit = {k: fit_spot_ids(folds, k) for k in range(int(meta["n_outer"]))}
        else:
            fit = {None: None}
        ctrl = control_embeddings(read_embedding(args.controls_gex), read_embedding(args.controls_img), d_out,
                                  args.seed, args.controls, fit)
        for kind in args.controls:
            name = control_name(kind, args.name)
            e = ctrl[kind]
            log.info("control %s: random re-encoding to %d dimensions", name, d_out)
            parts.append((name, run_probes(e if None not in e else e[None], adata, tasks, params, args.seed,
                                           args.min_class_size, folds, meta, what=name)))
    out = []
    for name, df in parts:
        df = df.copy()
        df.insert(0, "seed", args.seed)
        df.insert(0, "embedding", name)
        df.insert(0, "dataset", args.dataset)
        out.append(df)
    res = pd.concat(out, ignore_index=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    res.to_csv(args.out, sep="\t", index=False)
    log.info("wrote %d rows (%d embeddings) to %s", len(res), len(parts), args.out)


if __name__ == "__main__":
    main()
