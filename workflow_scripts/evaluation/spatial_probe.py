"""Spatial neighbour-ring probes: predict the neighbourhood's label from a spot's own embedding.

The reference's "neighbour-label prediction" (docs/reference.md#spatial-rings), with the fix of
docs/reference.md#flaw-14: rings are fixed distances in µm per dataset (``config: datasets.<d>.spatial.ring_edges_um``),
and neighbours are searched within each slide only (a KD-tree per slide, ``scipy.spatial.cKDTree``; no all-pairs
distance matrix).

For ring b with edges ``e_b < e_{b+1}`` (µm) the neighbours of spot i are the spots j ≠ i of the same
slide with ``e_b < d(i, j) ≤ e_{b+1}``, where d is the Euclidean distance of the spot centres
``obs['x_um'], obs['y_um']``. Targets per ring:

* classification task → the mode of the neighbours' labels (ties → the smallest label in sorted string
  order, like ``scipy.stats.mode``); labels are cleaned exactly as for the probes
  (:func:`workflow_scripts.evaluation.probes.clean_labels`: missing, excluded and rare classes cast no vote);
* regression task → the mean of the neighbours' usable target rows (reference ``summary_strategy: mean``).

Features = the CENTRE spot's embedding. Centres with no usable neighbour in the ring are dropped; a ring
with fewer than ``min_spots`` centres is skipped. Probe per ring: ``n_repeats`` ×
``train_test_split(test_size, random_state=seed+r, stratify=y)`` (unstratified when stratification is
impossible, logged), ``StandardScaler`` + ``LogisticRegression(max_iter, random_state=seed)`` on the classes
common to both parts → macro-F1 (regression: ``RidgeCV`` → R²).

Neighbour votes come from every spot of the AnnData with a usable label, also those without an embedding
row; only the centres need an embedding.

Output: ``task, ring, inner_um, outer_um, repeat, metric, value, n_spots, mean_neighbours``
(``n_spots`` = centres with ≥1 usable neighbour in the ring, ``mean_neighbours`` = their mean number of
usable neighbours); the CLI prepends ``dataset, embedding, seed``.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from ..io import embedding_task_parser, json_arg, read_embedding, setup_logging, write_result_table
from .probes import (
    DEFAULT_ALPHAS,
    check_task_spec,
    fit_classifier_fold,
    fit_regressor_fold,
    match_embedding,
    read_spots,
    task_targets,
)
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


def _split(n: int, y: np.ndarray | None, test_size: float, random_state: int, what: str):
    idx = np.arange(n)
    if y is not None:
        try:
            return train_test_split(idx, test_size=test_size, random_state=random_state, stratify=y)
        except ValueError as e:
            log.info("%s: stratified split impossible (%s); unstratified split used", what, e)
    return train_test_split(idx, test_size=test_size, random_state=random_state)


def run_spatial_probe(
    emb: pd.DataFrame,
    adata: ad.AnnData,
    tasks: Mapping[str, Mapping],
    ring_edges_um: Sequence[float],
    probe_params: Mapping,
    spatial_params: Mapping,
    seed: int,
    min_class_size: int = 10,
) -> pd.DataFrame:
    """Neighbour-ring probes for every task (docs/reference.md#spatial-rings; fixed µm rings per slide, docs/reference.md#flaw-14).

    Parameters
    ----------
    emb : (n_spots, d) embedding indexed by spot id; its spots are the centres.
    adata : spots AnnData (labels, ``obsm`` targets, ``x_um``/``y_um`` in µm, ``slide``).
    tasks : the tasks to run, ``{task: spec}`` as in ``config: datasets.<d>.tasks`` (the caller selects
        ``spatial.tasks``); classification and regression specs are accepted.
    ring_edges_um : ring edges in µm (``config: datasets.<d>.spatial.ring_edges_um``).
    probe_params : ``{logreg_max_iter, ridge_alphas}`` (``config: probe``).
    spatial_params : ``{n_repeats, test_size, min_spots}`` (``config: spatial_probe``).
    seed : split seed base (``seed + repeat``) and logistic-regression seed.
    min_class_size : classes with fewer labelled spots (whole AnnData) cast no vote.

    Returns a DataFrame with columns :data:`SPATIAL_COLUMNS` (metric ``macro_f1`` or ``r2``).
    Raises ValueError for bad edges or task specs, KeyError for missing coordinate columns.
    """
    e = check_ring_edges(ring_edges_um)
    for t, spec in tasks.items():
        check_task_spec(t, spec)
    n_repeats = int(spatial_params.get("n_repeats", 5))
    test_size = float(spatial_params.get("test_size", 0.2))
    min_spots = int(spatial_params.get("min_spots", 20))
    max_iter = int(probe_params.get("logreg_max_iter", 2000))
    alphas = probe_params.get("ridge_alphas") or DEFAULT_ALPHAS

    emb = match_embedding(emb, adata)
    centre_ids = list(emb.index)
    X_all = emb.to_numpy(dtype=np.float64)
    names = adata.obs_names.astype(str)
    pairs = ring_pairs(adata, e, centre_ids)
    rows = []
    for task, spec in tasks.items():
        targets = task_targets(adata, task, spec, min_class_size)  # votes from every labelled spot
        if targets is None:
            continue
        clf = spec["type"] == "classification"
        for b, pr in enumerate(tqdm(pairs, desc=f"rings {task}", leave=False)):
            what = f"task {task} ring {b} ({e[b]:g}, {e[b + 1]:g}] µm"
            tgt, n_nb = aggregate_ring(pr, centre_ids, targets, names)
            n_drop = len(centre_ids) - len(tgt)
            if n_drop:
                log.info("%s: %d of %d centres have no usable neighbour, dropped", what, n_drop, len(centre_ids))
            if len(tgt) < min_spots:
                log.warning("%s: %d centres with neighbours < min_spots %d; ring skipped", what, len(tgt), min_spots)
                continue
            log.info("%s: %d centres, %.2f usable neighbours on average", what, len(tgt), n_nb.mean())
            X = X_all[emb.index.get_indexer(tgt.index)]
            y = tgt.to_numpy()
            vals = []
            for r in range(n_repeats):
                w = f"{what} repeat {r}"
                tr, te = _split(len(y), y if clf else None, test_size, seed + r, w)
                if clf:
                    res = fit_classifier_fold(X[tr], y[tr], X[te], y[te], max_iter, seed, w, min_train=1, min_test=1)
                else:
                    res = fit_regressor_fold(X[tr], y[tr], X[te], y[te], alphas, w, min_train=2, min_test=1)
                if res is None:
                    continue
                vals.append(res["value"])
                rows.append(dict(task=task, ring=b, inner_um=float(e[b]), outer_um=float(e[b + 1]), repeat=r,
                                 metric="macro_f1" if clf else "r2", value=res["value"],
                                 n_spots=len(tgt), mean_neighbours=float(n_nb.mean())))
            if vals:
                log.info("%s: %s mean %.4f sd %.4f over %d repeats", what, "macro_f1" if clf else "r2",
                         np.mean(vals), np.std(vals), len(vals))
    return pd.DataFrame(rows, columns=SPATIAL_COLUMNS)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m workflow_scripts.evaluation.spatial_probe --embedding E.parquet --spots spots.h5ad --dataset D
    --name NAME --seed S --tasks JSON --ring-edges-um JSON --params JSON --spatial-params JSON
    [--min-class-size N] --out OUT.tsv --log LOG``.

    Writes the table of :func:`run_spatial_probe` with leading columns ``dataset, embedding, seed`` (TSV).
    """
    p = embedding_task_parser("python -m workflow_scripts.evaluation.spatial_probe", __doc__.split("\n")[0])
    p.add_argument("--tasks", required=True, help="JSON dict {task: spec} of the tasks to run")
    p.add_argument("--ring-edges-um", required=True, help="JSON list of ring edges in µm")
    p.add_argument("--params", required=True, help="JSON dict (config probe)")
    p.add_argument("--spatial-params", required=True, help="JSON dict (config spatial_probe)")
    p.add_argument("--min-class-size", type=int, default=10)
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
    df = run_spatial_probe(emb, adata, tasks, edges, params, sparams, args.seed, args.min_class_size)
    write_result_table(df, args.out, args.dataset, args.name, args.seed)


if __name__ == "__main__":
    main()
