"""Spatial neighbour-ring probes: predict the neighbourhood's label from a spot's own embedding.

The reference's "neighbour-label prediction" (docs/reference.md#spatial-rings), with the fix of
docs/reference.md#flaw-14: rings are fixed distances in µm per dataset (``config: datasets.<d>.spatial.ring_edges_um``),
and neighbours are searched within each slide only: one ``scipy.spatial.cKDTree`` radius query per slide (its sparse
distance matrix up to the outer edge), each pair put in its ring by ``searchsorted``; no all-pairs distance matrix.

For ring b with edges ``e_b < e_{b+1}`` (µm) the neighbours of spot i are the spots j ≠ i of the same
slide with ``e_b < d(i, j) ≤ e_{b+1}``, where d is the Euclidean distance of the spot centres
``obs['x_um'], obs['y_um']``. Targets per ring:

* classification task → the mode of the neighbours' labels (ties → the smallest label in sorted string
  order, like ``scipy.stats.mode``), from one ``bincount`` of the votes per ring; labels are cleaned exactly
  as for the probes (:func:`workflow_scripts.evaluation.probes.clean_labels`: missing, excluded and rare classes
  cast no vote);
* regression task → the mean of the neighbours' usable target rows (reference ``summary_strategy: mean``).

Features = the CENTRE spot's embedding. Centres with no usable neighbour in the ring are dropped; a ring
with fewer than ``min_spots`` centres is skipped.

**Splits** (:func:`ring_splits`), one row of the output per split (column ``repeat``):

* the protocol's folds when given (``folds``: a fold id per spot, e.g. the shared fold file of the dataset,
  seed and protocol): one split per fold, the fold being the test part; centres without a fold are dropped
  (logged);
* else grouped folds when ``probe.cv`` is ``group_<column>`` (``group_slide``: by ``obs['slide']``) or a group
  per spot is given (``groups``: donor, slide or spatial block): ``GroupKFold(min(n_folds, n_groups),
  shuffle=True)``, so no group is on both sides;
* else (``probe.cv: kfold``, the reference): ``n_repeats`` × ``train_test_split(test_size, stratify=y)``
  (unstratified when stratification is impossible, logged).

The random states of the splits come from ``numpy.random.SeedSequence((seed, repeat))``
(:func:`split_random_state`), so the splits of different seeds are independent draws; the reference's
``random_state = seed + repeat`` gave seeds 0 and 1 four of their five splits in common.

**Probes** (as in the reference, docs/reference.md#spatial-rings): ``StandardScaler`` on the training part +
``LogisticRegression(C=1, max_iter)`` on the classes common to both parts → macro-F1; regression: ridge with its alpha chosen by leave-one-out R²
(as ``RidgeCV(ridge_alphas, scoring="r2")``) → R². They are fitted by
:mod:`workflow_scripts.evaluation.linear_fits`: float32 features, each fit warm-started from the previous fit of
the same task (the previous repeat, the previous ring), ridge leave-one-out in the eigenbasis. Against the
previous implementation (float64, every fit from zero, ``RidgeCV``) the ridge results are the same and the
macro-F1 values differ within the solver tolerance (see BENCHMARKS.md: mean |Δ macro-F1| 0.004 per ring and
repeat on HER2ST, the same size as the distance of either implementation from the exact optimum).

Neighbour votes come from every spot of the AnnData with a usable label, also those without an embedding
row; only the centres need an embedding.

Output: ``task, ring, inner_um, outer_um, repeat, metric, value, n_spots, mean_neighbours``
(``n_spots`` = centres with ≥1 usable neighbour in the ring, ``mean_neighbours`` = their mean number of
usable neighbours; ``repeat`` = the split: repeat or fold); the CLI prepends ``dataset, embedding, seed``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from ..io import embedding_task_parser, json_arg, read_embedding, setup_logging, write_result_table
from .linear_fits import WarmStart, fit_classifier_split, fit_regressor_split
from .probes import DEFAULT_ALPHAS, check_task_spec, match_embedding, read_spots, task_targets
from .tasks import check_tasks

log = logging.getLogger(__name__)

SPATIAL_COLUMNS = ["task", "ring", "inner_um", "outer_um", "repeat", "metric", "value", "n_spots", "mean_neighbours"]


def check_ring_edges(edges_um: Sequence[float]) -> np.ndarray:
    """Validate ring edges (µm): ≥ 2 values, first ≥ 0, strictly increasing. Raises ValueError."""
    e = np.asarray(edges_um, dtype=float)
    if e.ndim != 1 or len(e) < 2 or not np.isfinite(e).all() or e[0] < 0 or np.any(np.diff(e) <= 0):
        raise ValueError(
            f"ring_edges_um must be >= 2 finite, strictly increasing distances >= 0 (µm), got {list(edges_um)} "
            "(fix datasets.<d>.spatial.ring_edges_um)"
        )
    return e


def _coords(adata: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
    for c in ("x_um", "y_um", "slide"):
        if c not in adata.obs.columns:
            raise KeyError(f"spots AnnData obs lacks column {c!r} (needed for the spatial rings; see data/model.py)")
    xy = adata.obs[["x_um", "y_um"]].to_numpy(dtype=float)
    if not np.isfinite(xy).all():
        raise ValueError(f"obs x_um/y_um hold {int((~np.isfinite(xy)).any(axis=1).sum())} non-finite rows")
    return xy, adata.obs["slide"].astype(str).to_numpy()


def ring_pairs(
    adata: ad.AnnData, edges_um: Sequence[float], centre_ids: Sequence[str] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Neighbour pairs per distance ring, within slides (docs/reference.md#spatial-rings, with the fix of docs/reference.md#flaw-14).

    Parameters
    ----------
    adata : spots AnnData with ``obs['x_um'], obs['y_um']`` (µm) and ``obs['slide']``.
    edges_um : ring edges ``e_0 < … < e_B`` in µm; ring b holds pairs with ``e_b < d ≤ e_{b+1}``.
    centre_ids : spot ids of the centres (default: all spots), each must be in ``adata``.

    Returns a list of B tuples ``(centre_pos, neighbour_pos)`` of equal-length int arrays: positions in
    ``centre_ids`` and in ``adata.obs_names``. A spot is never its own neighbour; spots of other slides
    never appear. Searched with one ``cKDTree`` per slide (radius ``e_B``).
    Raises KeyError for missing obs columns or unknown centre ids, ValueError for bad edges.
    """
    e = check_ring_edges(edges_um)
    xy, slides = _coords(adata)
    names = pd.Index(adata.obs_names.astype(str))
    if centre_ids is None:
        cpos_in_adata = np.arange(adata.n_obs)
    else:
        cpos_in_adata = names.get_indexer(pd.Index(np.asarray(centre_ids, dtype=str)))
        if (cpos_in_adata < 0).any():
            raise KeyError(f"{int((cpos_in_adata < 0).sum())} centre ids are not in the AnnData")
    c_slides = slides[cpos_in_adata]
    ci_parts: list[list[np.ndarray]] = [[] for _ in range(len(e) - 1)]
    nj_parts: list[list[np.ndarray]] = [[] for _ in range(len(e) - 1)]
    for s in pd.unique(c_slides):
        c_sel = np.flatnonzero(c_slides == s)          # positions in centre list
        n_sel = np.flatnonzero(slides == s)            # positions in adata
        tree_c, tree_n = cKDTree(xy[cpos_in_adata[c_sel]]), cKDTree(xy[n_sel])
        pairs = tree_c.sparse_distance_matrix(tree_n, max_distance=e[-1], output_type="ndarray")
        ci, nj, d = c_sel[pairs["i"]], n_sel[pairs["j"]], pairs["v"]
        not_self = cpos_in_adata[ci] != nj
        ring = np.searchsorted(e, d, side="left") - 1   # e_b < d <= e_{b+1}  ->  b
        ok = not_self & (ring >= 0) & (ring < len(e) - 1)
        ci, nj, ring = ci[ok], nj[ok], ring[ok]
        for b in range(len(e) - 1):
            m = ring == b
            ci_parts[b].append(ci[m])
            nj_parts[b].append(nj[m])
    out = []
    for b in range(len(e) - 1):
        ci = np.concatenate(ci_parts[b]) if ci_parts[b] else np.zeros(0, int)
        nj = np.concatenate(nj_parts[b]) if nj_parts[b] else np.zeros(0, int)
        order = np.lexsort((nj, ci))
        out.append((ci[order].astype(np.int64), nj[order].astype(np.int64)))
    return out


def aggregate_ring(
    pairs: tuple[np.ndarray, np.ndarray],
    centre_ids: Sequence[str],
    targets: pd.Series | pd.DataFrame,
    neighbour_ids: Sequence[str],
) -> tuple[pd.Series | pd.DataFrame, pd.Series]:
    """Summarise the neighbours' targets of one ring per centre.

    ``pairs`` = ``(centre_pos, neighbour_pos)`` from :func:`ring_pairs`; ``neighbour_ids`` = the ids that
    ``neighbour_pos`` indexes (``adata.obs_names``); ``targets`` = cleaned labels (Series, str) or target
    rows (DataFrame, spots × k), indexed by spot id — neighbours absent from it cast no vote.
    Classification → Series of the mode label per centre (ties → smallest label in sorted order);
    regression → DataFrame of the mean target rows. Also returns the number of usable neighbours per
    centre. Only centres with ≥ 1 usable neighbour are returned (index = centre id).
    """
    ci, nj = pairs
    centre_ids = pd.Index(np.asarray(centre_ids, dtype=str))
    nb_ids = pd.Index(np.asarray(neighbour_ids, dtype=str))
    tpos = targets.index.get_indexer(nb_ids[nj]) if len(nj) else np.zeros(0, int)
    ok = tpos >= 0
    ci, tpos = ci[ok], tpos[ok]
    n_c = len(centre_ids)
    n_nb = np.bincount(ci, minlength=n_c)
    has = n_nb > 0
    if isinstance(targets, pd.Series):
        classes, codes = np.unique(targets.to_numpy(dtype=str), return_inverse=True)  # sorted labels
        K = len(classes)
        votes = np.bincount(ci * K + codes[tpos], minlength=n_c * K).reshape(n_c, K)
        mode = classes[np.argmax(votes, axis=1)]                # first maximum = smallest label
        tgt = pd.Series(mode[has], index=centre_ids[has], name="target")
    else:
        Y = targets.to_numpy(dtype=float)
        A = sp.csr_matrix((np.ones(len(ci)), (ci, tpos)), shape=(n_c, len(Y)))
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.asarray(A @ Y) / n_nb[:, None]
        tgt = pd.DataFrame(mean[has], index=centre_ids[has], columns=targets.columns)
    return tgt, pd.Series(n_nb[has], index=centre_ids[has], name="n_neighbours")


def ring_targets(
    adata: ad.AnnData,
    targets: pd.Series | pd.DataFrame,
    edges_um: Sequence[float],
    centre_ids: Sequence[str] | None = None,
) -> list[tuple[pd.Series | pd.DataFrame, pd.Series]]:
    """Per-ring neighbourhood targets for the centres (see :func:`ring_pairs`, :func:`aggregate_ring`).

    Returns a list with one ``(target, n_neighbours)`` tuple per ring.
    """
    centre_ids = list(adata.obs_names.astype(str)) if centre_ids is None else [str(c) for c in centre_ids]
    names = adata.obs_names.astype(str)
    return [aggregate_ring(p, centre_ids, targets, names) for p in ring_pairs(adata, edges_um, centre_ids)]


def split_random_state(seed: int, repeat: int) -> int:
    """Random state of split ``repeat`` under seed ``seed``: ``SeedSequence((seed, repeat))``'s first word.

    Distinct (seed, repeat) pairs give independent states (the reference's ``seed + repeat`` reused them).
    """
    return int(np.random.SeedSequence((int(seed), int(repeat))).generate_state(1)[0])


def ring_splits(
    n: int,
    y: np.ndarray | None = None,
    *,
    folds: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    n_repeats: int = 5,
    test_size: float = 0.2,
    n_folds: int = 5,
    seed: int = 0,
    what: str = "ring",
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Train/test index pairs over the ``n`` centres of one ring (module docstring, "Splits").

    Parameters
    ----------
    n : number of centres.
    y : (n,) class labels to stratify the repeated hold-out splits (None: unstratified; regression).
    folds : (n,) fold id per centre (NaN = none; those centres are in no split) → one split per fold.
    groups : (n,) group per centre → ``GroupKFold(min(n_folds, n_groups), shuffle=True)``.
    n_repeats, test_size : the repeated stratified hold-out (when neither ``folds`` nor ``groups``).
    n_folds : folds of the grouped splits.
    seed : base of :func:`split_random_state`.

    Returns a list of ``(train_idx, test_idx)``; empty (logged) when fewer than 2 folds or groups exist.
    """
    from sklearn.model_selection import GroupKFold, train_test_split

    if folds is not None:
        f = pd.Series(np.asarray(folds, dtype=float))
        ids = np.sort(f.dropna().unique())
        if len(ids) < 2:
            log.warning("%s: %d fold(s) among the centres; no split", what, len(ids))
            return []
        n_none = int(f.isna().sum())
        if n_none:
            log.info("%s: %d centres have no fold and are left out", what, n_none)
        fv = f.to_numpy()
        return [(np.flatnonzero((fv != k) & ~np.isnan(fv)), np.flatnonzero(fv == k)) for k in ids]
    if groups is not None:
        g = np.asarray(groups).astype(str)
        n_groups = len(np.unique(g))
        if n_groups < 2:
            log.warning("%s: the centres lie in %d group(s); grouped splits impossible, ring skipped", what, n_groups)
            return []
        k = min(int(n_folds), n_groups)
        if k < n_folds:
            log.info("%s: only %d groups; %d grouped folds instead of %d", what, n_groups, k, n_folds)
        cv = GroupKFold(k, shuffle=True, random_state=split_random_state(seed, 0))
        return list(cv.split(np.zeros(len(g)), groups=g))
    idx = np.arange(int(n))
    out = []
    for r in range(int(n_repeats)):
        rs = split_random_state(seed, r)
        if y is not None:
            try:
                out.append(tuple(train_test_split(idx, test_size=test_size, random_state=rs, stratify=y)))
                continue
            except ValueError as e:
                log.info("%s repeat %d: stratified split impossible (%s); unstratified split used", what, r, e)
        out.append(tuple(train_test_split(idx, test_size=test_size, random_state=rs)))
    return out


def run_spatial_probe(
    emb: pd.DataFrame,
    adata: ad.AnnData,
    tasks: Mapping[str, Mapping],
    ring_edges_um: Sequence[float],
    probe_params: Mapping,
    spatial_params: Mapping,
    seed: int,
    min_class_size: int = 10,
    folds: Mapping[str, pd.Series] | pd.Series | None = None,
    groups: pd.Series | None = None,
) -> pd.DataFrame:
    """Neighbour-ring probes for every task (docs/reference.md#spatial-rings; fixed µm rings per slide,
    docs/reference.md#flaw-14; splits and fits as in the module docstring).

    Parameters
    ----------
    emb : (n_spots, d) embedding indexed by spot id; its spots are the centres.
    adata : spots AnnData (labels, ``obsm`` targets, ``x_um``/``y_um`` in µm, ``slide``).
    tasks : the tasks to run, ``{task: spec}`` as in ``config: datasets.<d>.tasks`` (the caller selects
        ``spatial.tasks``); classification and regression specs are accepted.
    ring_edges_um : ring edges in µm (``config: datasets.<d>.spatial.ring_edges_um``).
    probe_params : ``{cv, n_folds, logreg_max_iter, ridge_alphas}`` (``config: probe``); ``cv`` ``kfold`` →
        repeated hold-out splits, ``group_<obs column>`` → folds grouped by that column.
    spatial_params : ``{n_repeats, test_size, min_spots}`` (``config: spatial_probe``).
    seed : split seed (:func:`split_random_state`) and logistic-regression seed.
    min_class_size : classes with fewer labelled spots (whole AnnData) cast no vote.
    folds : fold id per spot id (a Series for every task, or ``{task: Series}``), e.g. the protocol's shared
        fold file; overrides ``cv``.
    groups : group (donor, slide, spatial block) per spot id; overrides ``cv`` (``folds`` wins over it).

    Returns a DataFrame with columns :data:`SPATIAL_COLUMNS` (metric ``macro_f1`` or ``r2``).
    Raises ValueError for bad edges, task specs or ``probe.cv``, KeyError for missing coordinate or group
    columns and for a task absent from ``folds``.
    """
    e = check_ring_edges(ring_edges_um)
    for t, spec in tasks.items():
        check_task_spec(t, spec)
    max_iter = int(probe_params.get("logreg_max_iter", 2000))
    alphas = probe_params.get("ridge_alphas") or DEFAULT_ALPHAS
    n_folds = int(probe_params.get("n_folds", 5))
    cv = str(probe_params.get("cv", "kfold"))
    if folds is None and groups is None:
        groups = cv_groups(adata, cv)

    rows = []
    warm: dict[str, WarmStart] = {}  # one warm-start chain per task: repeat after repeat, ring after ring
    for prob in ring_problems(emb, adata, tasks, e, spatial_params, seed, min_class_size, folds=folds,
                              groups=groups, n_folds=n_folds):
        vals, iters = [], []
        for r, (tr, te) in enumerate(prob.splits):
            w = f"{prob.what} split {r}"
            if prob.classification:
                res = fit_classifier_split(prob.X, prob.y, tr, te, max_iter=max_iter, random_state=seed,
                                           warm=warm.setdefault(prob.task, WarmStart()), what=w, min_train=1,
                                           min_test=1)
            else:
                res = fit_regressor_split(prob.X, prob.y, tr, te, alphas=alphas, what=w, min_train=2, min_test=1)
            if res is None:
                continue
            vals.append(res["value"])
            iters.append(res.get("n_iter", 0))
            rows.append(dict(task=prob.task, ring=prob.ring, inner_um=prob.inner_um, outer_um=prob.outer_um,
                             repeat=r, metric=prob.metric, value=res["value"], n_spots=prob.n_spots,
                             mean_neighbours=prob.mean_neighbours))
        if vals:
            log.info("%s: %s mean %.4f sd %.4f over %d splits%s", prob.what, prob.metric, np.mean(vals),
                     np.std(vals), len(vals), f" ({sum(iters)} L-BFGS iterations)" if prob.classification else "")
    return pd.DataFrame(rows, columns=SPATIAL_COLUMNS)


def cv_groups(adata: ad.AnnData, cv: str) -> pd.Series | None:
    """The groups ``probe.cv`` asks for: None for ``kfold``, ``obs[<column>]`` (by spot id) for ``group_<column>``.

    Raises ValueError for another ``cv`` and KeyError when the column is absent.
    """
    if cv == "kfold":
        return None
    col = cv[len("group_"):] if cv.startswith("group_") else None
    if col is None:
        raise ValueError(f"probe.cv {cv!r}: the spatial probe knows 'kfold' and 'group_<obs column>' (e.g. "
                         "group_slide); pass the protocol's folds instead (--folds)")
    if col not in adata.obs.columns:
        raise KeyError(f"probe.cv {cv!r} groups by obs[{col!r}], which the spots AnnData lacks")
    return pd.Series(adata.obs[col].astype(str).to_numpy(), index=adata.obs_names.astype(str))


@dataclass
class RingProblem:
    """One ring of one task: the probe's features, targets and splits (from :func:`ring_problems`)."""

    task: str
    ring: int
    inner_um: float
    outer_um: float
    classification: bool
    X: np.ndarray                 # (n, d) float32 embedding rows of the centres with usable neighbours
    y: np.ndarray                 # (n,) majority labels or (n, k) mean targets
    splits: list                  # [(train_idx, test_idx)] (ring_splits)
    n_spots: int
    mean_neighbours: float
    what: str

    @property
    def metric(self) -> str:
        return "macro_f1" if self.classification else "r2"


def ring_problems(
    emb: pd.DataFrame,
    adata: ad.AnnData,
    tasks: Mapping[str, Mapping],
    ring_edges_um: Sequence[float],
    spatial_params: Mapping,
    seed: int,
    min_class_size: int = 10,
    folds: Mapping[str, pd.Series] | pd.Series | None = None,
    groups: pd.Series | None = None,
    n_folds: int = 5,
) -> Iterator[RingProblem]:
    """The probe problems of :func:`run_spatial_probe`, ring by ring and task by task (rings skipped there are
    not yielded). ``groups`` / ``folds`` as there (``cv`` already resolved into ``groups``)."""
    e = check_ring_edges(ring_edges_um)
    n_repeats = int(spatial_params.get("n_repeats", 5))
    test_size = float(spatial_params.get("test_size", 0.2))
    min_spots = int(spatial_params.get("min_spots", 20))
    emb = match_embedding(emb, adata)
    centre_ids = pd.Index(emb.index)
    X_all = emb.to_numpy(dtype=np.float32)
    del emb
    names = pd.Index(adata.obs_names.astype(str))
    pairs = ring_pairs(adata, e, list(centre_ids))
    g_all = None if groups is None else _align(groups, centre_ids, "groups")
    for task, spec in tasks.items():
        targets = task_targets(adata, task, spec, min_class_size)  # votes from every labelled spot
        if targets is None:
            continue
        clf = spec["type"] == "classification"
        f_all = None
        if folds is not None:
            f_task = folds.get(task) if isinstance(folds, Mapping) else folds
            if f_task is None:
                raise KeyError(f"folds: no fold assignment for task {task!r} (tasks with folds: {list(folds)})")
            f_all = _align(f_task, centre_ids, f"folds of task {task}", numeric=True)
        tpos = targets.index.get_indexer(names)        # row in targets of every AnnData spot, -1 = none
        for b, pr in enumerate(tqdm(pairs, desc=f"rings {task}", leave=False)):
            what = f"task {task} ring {b} ({e[b]:g}, {e[b + 1]:g}] µm"
            tgt, n_nb = _aggregate(pr, len(centre_ids), targets, tpos)
            n_drop = len(centre_ids) - len(n_nb)
            if n_drop:
                log.info("%s: %d of %d centres have no usable neighbour, dropped", what, n_drop, len(centre_ids))
            if len(n_nb) < min_spots:
                log.warning("%s: %d centres with neighbours < min_spots %d; ring skipped", what, len(n_nb), min_spots)
                continue
            log.info("%s: %d centres, %.2f usable neighbours on average", what, len(n_nb), n_nb.mean())
            keep = n_nb.index.to_numpy()               # positions of the kept centres
            X = X_all if len(keep) == len(X_all) else X_all[keep]  # no copy when every centre is kept
            splits = ring_splits(len(keep), tgt if clf else None, folds=None if f_all is None else f_all[keep],
                                 groups=None if g_all is None else g_all[keep], n_repeats=n_repeats,
                                 test_size=test_size, n_folds=n_folds, seed=seed, what=what)
            yield RingProblem(task=task, ring=b, inner_um=float(e[b]), outer_um=float(e[b + 1]), classification=clf,
                              X=X, y=tgt, splits=splits, n_spots=len(n_nb), mean_neighbours=float(n_nb.mean()),
                              what=what)


def _align(values: pd.Series, ids: pd.Index, what: str, numeric: bool = False) -> np.ndarray:
    """``values`` (indexed by spot id) in the order of ``ids``; missing ids → NaN (numeric) or KeyError."""
    s = pd.Series(values)
    s.index = s.index.astype(str)
    if s.index.has_duplicates:
        raise ValueError(f"{what}: duplicated spot ids, e.g. {list(s.index[s.index.duplicated()][:3])}")
    pos = s.index.get_indexer(ids)
    if numeric:
        out = np.full(len(ids), np.nan)
        ok = pos >= 0
        out[ok] = pd.to_numeric(s.iloc[pos[ok]], errors="coerce").to_numpy(dtype=float)
        return out
    if (pos < 0).any():
        raise KeyError(f"{what}: {int((pos < 0).sum())} centre spots have no value, e.g. {list(ids[pos < 0][:3])}")
    return s.iloc[pos].to_numpy()


def _aggregate(pairs: tuple[np.ndarray, np.ndarray], n_centres: int, targets: pd.Series | pd.DataFrame,
               tpos: np.ndarray) -> tuple[np.ndarray, pd.Series]:
    """Ring targets of the centres with ≥ 1 usable neighbour (vectorised :func:`aggregate_ring`).

    ``tpos`` = row in ``targets`` of every AnnData spot (-1: none). Returns ``(target array, n_neighbours)``,
    ``n_neighbours`` indexed by centre position.
    """
    ci, nj = pairs
    t = tpos[nj] if len(nj) else np.zeros(0, int)
    ok = t >= 0
    ci, t = ci[ok], t[ok]
    n_nb = np.bincount(ci, minlength=n_centres)
    has = np.flatnonzero(n_nb > 0)
    if isinstance(targets, pd.Series):
        classes, codes = np.unique(targets.to_numpy(dtype=str), return_inverse=True)  # sorted labels
        K = len(classes)
        votes = np.bincount(ci * K + codes[t], minlength=n_centres * K).reshape(n_centres, K)
        tgt = classes[np.argmax(votes[has], axis=1)]       # first maximum = smallest label
    else:
        Y = targets.to_numpy(dtype=float)
        A = sp.csr_matrix((np.ones(len(ci)), (ci, t)), shape=(n_centres, len(Y)))
        tgt = np.asarray(A[has] @ Y) / n_nb[has, None]
    return tgt, pd.Series(n_nb[has], index=has, name="n_neighbours")


def read_folds(path: str | Path) -> dict[str, pd.Series]:
    """Fold assignment per task from a fold table (TSV with columns ``spot_id, task, fold``; more are ignored).

    Returns ``{task: Series(fold, index=spot_id)}``. Raises FileNotFoundError / ValueError naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"fold table not found: {path} (run the rule that writes the protocol's folds)")
    df = pd.read_csv(path, sep="\t", dtype={"spot_id": str, "task": str})
    missing = [c for c in ("spot_id", "task", "fold") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: fold table lacks columns {missing} (has {list(df.columns)})")
    return {t: g.set_index("spot_id")["fold"] for t, g in df.groupby("task", sort=False)}


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m workflow_scripts.evaluation.spatial_probe --embedding E.parquet --spots spots.h5ad --dataset D
    --name NAME --seed S --tasks JSON --ring-edges-um JSON --params JSON --spatial-params JSON
    [--min-class-size N] [--folds FOLDS.tsv | --group-by COLUMN] --out OUT.tsv --log LOG``.

    ``--folds``: the protocol's fold table (``spot_id, task, fold``; :func:`read_folds`); ``--group-by``: an obs
    column (``donor``, ``slide``) to group the splits by. Without either, ``probe.cv`` of ``--params`` decides.
    Writes the table of :func:`run_spatial_probe` with leading columns ``dataset, embedding, seed`` (TSV).
    """
    p = embedding_task_parser("python -m workflow_scripts.evaluation.spatial_probe", __doc__.split("\n")[0])
    p.add_argument("--tasks", required=True, help="JSON dict {task: spec} of the tasks to run")
    p.add_argument("--ring-edges-um", required=True, help="JSON list of ring edges in µm")
    p.add_argument("--params", required=True, help="JSON dict (config probe)")
    p.add_argument("--spatial-params", required=True, help="JSON dict (config spatial_probe)")
    p.add_argument("--min-class-size", type=int, default=10)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--folds", default=None, help="fold table TSV (spot_id, task, fold): one split per fold")
    src.add_argument("--group-by", default=None, help="obs column whose groups never straddle a split")
    args = p.parse_args(argv)
    setup_logging(args.log)
    tasks = json_arg(args.tasks, "--tasks")
    edges = json_arg(args.ring_edges_um, "--ring-edges-um")
    params = json_arg(args.params, "--params")
    sparams = json_arg(args.spatial_params, "--spatial-params")
    log.info("spatial probe: dataset %s, embedding %s, seed %d, tasks %s, rings %s µm",
             args.dataset, args.name, args.seed, list(tasks), edges)
    emb = read_embedding(args.embedding)
    adata = read_spots(args.spots)
    check_tasks(adata, tasks, source=args.spots)  # a task whose label/obsm is absent fails the job
    folds = read_folds(args.folds) if args.folds else None
    groups = None
    if args.group_by:
        if args.group_by not in adata.obs.columns:
            raise KeyError(f"--group-by {args.group_by!r}: {args.spots} has no such obs column "
                           f"(columns: {list(adata.obs.columns)})")
        groups = pd.Series(adata.obs[args.group_by].astype(str).to_numpy(), index=adata.obs_names.astype(str))
    df = run_spatial_probe(emb, adata, tasks, edges, params, sparams, args.seed, args.min_class_size,
                           folds=folds, groups=groups)
    write_result_table(df, args.out, args.dataset, args.name, args.seed)


if __name__ == "__main__":
    main()
