"""Linear probes with cross-validation on a spot embedding (docs/reference.md#probes).

For every task of a dataset (``config: datasets.<d>.tasks``) the embedding of each spot is used as the
feature vector of a linear probe:

* **classification** (``type: classification, label: <obs column>, exclude: [...]``):
  per fold ``StandardScaler`` (fit on the training fold) → ``LogisticRegression(max_iter,
  random_state=seed+fold)`` (lbfgs, L2, C=1, multinomial) → macro-F1 on the test fold, computed over the
  classes present in BOTH the training and the test fold (rows of other classes are dropped from both
  folds and counted; docs/reference.md#probes and docs/reference.md#flaw-13).
* **regression** (``type: regression, obsm: <obsm key>``): ``StandardScaler`` → ``RidgeCV(alphas,
  scoring="r2")`` (efficient leave-one-out choice of a single alpha for all outputs) → R² on the test
  fold, uniform average over the outputs (``sklearn.metrics.r2_score(multioutput="uniform_average")``).

Cross-validation (``config: probe.cv``): ``kfold`` = ``KFold(n_folds, shuffle=True, random_state=seed)``
over the task's spots (as in the reference, docs/reference.md#probes), or ``group_slide`` = ``GroupKFold`` over slides so that
no slide is split between training and test (a fix for the spatial leakage noted in docs/reference.md#flaw-6).
A fold needs ≥10 training and ≥5 test rows (as in the reference, docs/reference.md#probes), otherwise it is skipped with a log line.

Output (long format, one row per task × fold): ``task, task_type, metric, fold, value, n_train, n_test,
n_classes, n_dropped_test, alpha``; the CLI prepends ``dataset, embedding, seed``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import f1_score, r2_score
from sklearn.model_selection import GroupKFold, KFold
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from ..io import drop_invalid_rows, embedding_task_parser, json_arg, read_embedding, setup_logging, write_result_table
from .tasks import check_tasks

log = logging.getLogger(__name__)

PROBE_COLUMNS = [
    "task", "task_type", "metric", "fold", "value",
    "n_train", "n_test", "n_classes", "n_dropped_test", "alpha",
]
MIN_TRAIN = 10  # ≥10 training rows per fold, as in the reference (docs/reference.md#probes)
MIN_TEST = 5    # ≥5 test rows per fold, as in the reference (docs/reference.md#probes)
TASK_TYPES = ("classification", "regression")
DEFAULT_ALPHAS = list(np.logspace(-3, 3, 10))  # the reference's RidgeCV alphas (docs/reference.md#probes)


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
    """Fold index pairs ``(train_idx, test_idx)`` over ``n`` rows.

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
    """Scaled logistic-regression probe on one split; macro-F1 over the classes common to both parts.

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
    """Scaled RidgeCV probe on one split; R² on the test part, uniform average over outputs.

    ``X_*``: (n, d); ``y_*``: (n, k). Alpha chosen by efficient leave-one-out on the training part
    (``RidgeCV(alphas, scoring="r2")``, one alpha for all outputs; docs/reference.md#probes).
    Returns ``{value, n_train, n_test, alpha}`` or None (logged) with < ``min_train`` (10) train or
    < ``min_test`` (5) test rows.
    """
    if len(X_train) < min_train or len(X_test) < min_test:
        log.warning("%s: %d train / %d test rows (need >= %d / %d); skipped",
                    what, len(X_train), len(X_test), min_train, min_test)
        return None
    scaler = StandardScaler().fit(X_train)
    reg = RidgeCV(alphas=np.asarray(alphas, dtype=float), scoring="r2")
    reg.fit(scaler.transform(X_train), y_train)
    pred = reg.predict(scaler.transform(X_test))
    r2 = r2_score(y_test, pred, multioutput="uniform_average")
    return dict(value=float(r2), n_train=len(X_train), n_test=len(X_test), alpha=float(reg.alpha_))


# ----------------------------------------------------------------------------------------------------
# driver
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


def run_probes(
    emb: pd.DataFrame,
    adata: ad.AnnData,
    tasks: Mapping[str, Mapping],
    probe_params: Mapping,
    seed: int,
    min_class_size: int = 10,
) -> pd.DataFrame:
    """Run every task's linear probe with cross-validation (docs/reference.md#probes).

    Parameters
    ----------
    emb : (n_spots, d) embedding indexed by spot id (see :mod:`workflow_scripts.io`).
    adata : spots AnnData (:mod:`workflow_scripts.data.model`); labels in ``obs``, regression targets in
        ``obsm``, slide in ``obs['slide']`` (for ``group_slide``).
    tasks : ``{task: {type, label|obsm, exclude}}`` (``config: datasets.<d>.tasks``).
    probe_params : ``{n_folds, cv, logreg_max_iter, ridge_alphas}`` (``config: probe``).
    seed : fold shuffling seed (``KFold``) and base of the logistic-regression seed (seed + fold).
    min_class_size : classes with fewer spots (after matching the embedding) are dropped.

    Returns the long table with columns :data:`PROBE_COLUMNS`: ``metric`` is ``macro_f1`` or ``r2``;
    ``n_classes``/``n_dropped_test`` are NaN/0 for regression, ``alpha`` is NaN for classification.
    Raises ValueError for invalid task specs or probe parameters.
    """
    for t, spec in tasks.items():
        check_task_spec(t, spec)
    emb = match_embedding(emb, adata)
    sub = adata[emb.index]
    X_all = emb.to_numpy(dtype=np.float64)
    row_of = pd.Series(np.arange(len(emb)), index=emb.index)
    slides = sub.obs["slide"].astype(str).to_numpy() if "slide" in sub.obs else None
    max_iter = int(probe_params.get("logreg_max_iter", 2000))
    alphas = probe_params.get("ridge_alphas") or DEFAULT_ALPHAS
    rows = []
    for task, spec in tasks.items():
        y = task_targets(sub, task, spec, min_class_size)
        if y is None:
            continue
        ttype = spec["type"]
        idx = row_of.loc[y.index].to_numpy()
        X = X_all[idx]
        yv = y.to_numpy()
        groups = slides[idx] if slides is not None else None
        splits = cv_splits(len(idx), groups, probe_params, seed, what=f"task {task}")
        n_done = 0
        for fold, (tr, te) in enumerate(tqdm(splits, desc=f"probe {task}", leave=False)):
            what = f"task {task} fold {fold}"
            if ttype == "classification":
                res = fit_classifier_fold(X[tr], yv[tr], X[te], yv[te], max_iter, seed + fold, what)
                if res is None:
                    continue
                rows.append(dict(task=task, task_type=ttype, metric="macro_f1", fold=fold, alpha=np.nan, **res))
            else:
                res = fit_regressor_fold(X[tr], yv[tr], X[te], yv[te], alphas, what)
                if res is None:
                    continue
                rows.append(dict(task=task, task_type=ttype, metric="r2", fold=fold,
                                 n_classes=np.nan, n_dropped_test=0, **res))
            n_done += 1
            log.info("%s: %s = %.4f", what, rows[-1]["metric"], rows[-1]["value"])
        if n_done == 0:
            log.warning("task %s: no fold could be evaluated", task)
        else:
            vals = [r["value"] for r in rows if r["task"] == task]
            log.info("task %s: %d folds, mean %.4f sd %.4f", task, n_done, np.mean(vals), np.std(vals))
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)


def read_spots(path: str | Path) -> ad.AnnData:
    """Read the spots AnnData; FileNotFoundError naming the path (and the rule that builds it) if absent."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"spots AnnData not found: {path} (run the rule that builds results/<dataset>/spots.h5ad)"
        )
    return ad.read_h5ad(path)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m workflow_scripts.evaluation.probes --embedding E.parquet --spots spots.h5ad --dataset D
    --name NAME --seed S --tasks JSON --params JSON [--min-class-size N] --out OUT.tsv --log LOG``.

    Writes the table of :func:`run_probes` with leading columns ``dataset, embedding, seed`` (TSV).
    """
    p = embedding_task_parser("python -m workflow_scripts.evaluation.probes", __doc__.split("\n")[0])
    p.add_argument("--tasks", required=True, help="JSON dict {task: {type, label|obsm, exclude}}")
    p.add_argument("--params", required=True, help="JSON dict {n_folds, cv, logreg_max_iter, ridge_alphas}")
    p.add_argument("--min-class-size", type=int, default=10)
    args = p.parse_args(argv)
    setup_logging(args.log)
    tasks = json_arg(args.tasks, "--tasks")
    params = json_arg(args.params, "--params")
    log.info("probes: dataset %s, embedding %s, seed %d, tasks %s, params %s",
             args.dataset, args.name, args.seed, list(tasks), params)
    emb = read_embedding(args.embedding)
    adata = read_spots(args.spots)
    check_tasks(adata, tasks, source=args.spots)  # a task whose label/obsm is absent fails the job
    df = run_probes(emb, adata, tasks, params, args.seed, args.min_class_size)
    write_result_table(df, args.out, args.dataset, args.name, args.seed)


if __name__ == "__main__":
    main()
