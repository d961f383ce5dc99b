"""Fold assignments, computed once per dataset, protocol and seed and shared by every probe.

Every probe of a dataset, protocol and seed (each fused method, its controls, the unimodal and random baselines)
reads the same fold file, so every comparison between embeddings is paired fold by fold, and each task's spots
and class set are fixed here, before any probe runs (docs/evaluation.md#shared-folds).

Protocols (docs/evaluation.md#two-protocols)
--------------------------------------------
``transductive`` (the paper's; docs/reference.md#probes): the interface is trained on all spots; the probe folds
are ``KFold(n_folds, shuffle=True, random_state=seed)`` over each task's spots (``probe.cv: kfold``), or
``GroupKFold(n_folds)`` over slides (``probe.cv: group_slide``).

``inductive``: the interface and the probes are fit on training donors only and scored on held-out donors.
The *outer folds* group the donors: with n_donors ≤ n_folds one donor per fold (sorted names), else
``GroupKFold(n_folds, shuffle=True, random_state=seed)`` over donors. One interface is trained per outer fold on
the spots of the other folds (pseudo-task :data:`INTERFACE_TASK`). A task whose labels span two or more donors
uses the outer folds as its probe folds. A task whose labels come from one donor only (HER2ST ``pathology``:
section A1) is cross-validated on spatial blocks within that donor, scored with the interface trained without
that donor. A dataset with a single donor uses spatial blocks for the interface and every task.

Spatial blocks: a square grid of side ``block_um`` (µm) per slide, anchored at the slide's smallest x and y;
blocks go to folds in a seeded random order, each to the fold with the fewest spots so far. Around the test part
of a fold, a spot whose patch lies closer than ``buffer_um`` to a test patch is left out of that fold's training
part: for square patches of side p, a Chebyshev distance between centres below p + buffer_um (same slide).
With the default ``buffer_um`` = p, no training patch shares pixels or cells with a test patch and at least one
patch width separates them (overlapping Xenium tiles: 108.8 µm patches on a 54.4 µm stride).

Fold table (TSV, one row per spot × task; :data:`FOLD_COLUMNS`)
----------------------------------------------------------------
``spot_id``; ``task`` (a task of the config, or ``_interface``); ``fold`` (the fold whose test part holds the
spot); ``group`` (the group the split used: the donor, the slide or the spatial block ``<slide>:<bx>,<by>``;
empty for ``kfold``); ``scheme`` (``kfold``, ``group_slide``, ``donor``, ``spatial_block``); ``outer`` (the outer
fold whose interface embeds this task-fold; -1 under ``transductive``); ``buffer_folds`` (folds, ``;``-separated,
whose training part excludes the spot as a buffer spot; empty if none). A side file (same name, ``.json``)
records per task the class set, the scheme, a note, and per fold the test size, buffer size, outer fold and
bootstrap unit.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

PROTOCOLS = ("transductive", "inductive")
SCHEMES = ("kfold", "group_slide", "donor", "spatial_block")
INTERFACE_TASK = "_interface"
FOLD_COLUMNS = ["spot_id", "task", "fold", "group", "scheme", "outer", "buffer_folds"]
BLOCKS_PER_FOLD = 3  # automatic block size: about this many blocks per fold


# ----------------------------------------------------------------------------------------------------
# donors known from the config (planning time: no data read beyond a small table)
# ----------------------------------------------------------------------------------------------------
def config_donors(params: Mapping) -> list[str]:
    """Donors of a dataset as its config implies them, before the spots are prepared (sorted).

    ``reader: her2st``: the ``patient`` of each configured section in ``<resource_dir>/sections.tsv`` (patients
    A–H; the first letter of the section id when the table is absent). ``synthetic``: ``D1 … D<n_donors>``
    (``generator.n_donors``). ``precomputed``: the distinct values of the spots file's donor column (else its slide
    column), as the reader sets them. Xenium / Visium: the dataset's samples (``samples``, or ``splits`` of
    ``build_splits``) mapped through ``donors`` ({sample: donor}; default: each sample is its own donor).
    Raises ValueError when the precomputed spots file is missing or lacks the column.
    """
    reader = params.get("reader")
    if reader == "her2st":
        table = Path(params.get("resource_dir") or "resources/her2st") / "sections.tsv"
        patient: dict[str, str] = {}
        if table.exists():
            t = pd.read_csv(table, sep="\t", dtype=str)
            patient = dict(zip(t["section"], t["patient"]))
        sections = params.get("sections") or list(patient)
        return sorted({patient.get(str(s), str(s)[:1]) for s in sections})
    if reader == "synthetic":
        from ..data.synthetic import GENERATOR_DEFAULTS

        n = int({**GENERATOR_DEFAULTS, **(params.get("generator") or {})}["n_donors"])
        return [f"D{k + 1}" for k in range(n)]
    if reader == "precomputed":
        return _precomputed_donors(params)
    from ..data.download import dataset_samples

    donors = params.get("donors") or {}
    return sorted({str(donors.get(s, s)) for s in dataset_samples(params)})


def _precomputed_donors(params: Mapping) -> list[str]:
    path = Path(str(params.get("spots_file", "")))
    if not path.is_file():
        raise ValueError(f"the inductive protocol needs the donors of datasets.<d>.spots_file when the workflow is "
                         f"planned, but {path} does not exist (or set protocols: [transductive])")
    cols = {**{"donor": "donor", "slide": "slide"}, **(params.get("columns") or {})}
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        import anndata as ad

        obs = ad.read_h5ad(path, backed="r").obs
    elif suffix == ".parquet":
        obs = pd.read_parquet(path)
    else:
        obs = pd.read_csv(path, sep="," if suffix == ".csv" else "\t")
    for key in ("donor", "slide"):
        if cols[key] in obs.columns:
            return sorted(obs[cols[key]].astype(str).unique())
    raise ValueError(f"{path}: neither a donor column {cols['donor']!r} nor a slide column {cols['slide']!r}")


def n_outer_folds(n_donors: int, n_folds: int) -> int:
    """Number of outer folds of the inductive protocol: min(n_folds, n_donors), or n_folds spatial-block folds
    when there is a single donor. Raises ValueError for n_donors < 1 or n_folds < 2."""
    if n_donors < 1 or n_folds < 2:
        raise ValueError(f"need >= 1 donor and n_folds >= 2, got {n_donors} donors, n_folds {n_folds}")
    return n_folds if n_donors == 1 else min(n_folds, n_donors)


# ----------------------------------------------------------------------------------------------------
# assignments (pure)
# ----------------------------------------------------------------------------------------------------
def kfold_assignment(n: int, n_folds: int, seed: int) -> np.ndarray:
    """Fold of each of ``n`` rows under ``KFold(n_folds, shuffle=True, random_state=seed)`` (the reference's
    probe folds, docs/reference.md#probes). Returns int (n,). Raises ValueError when n < n_folds."""
    from sklearn.model_selection import KFold

    if n < n_folds:
        raise ValueError(f"{n} rows < n_folds {n_folds}")
    fold = np.empty(n, dtype=int)
    for k, (_, te) in enumerate(KFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(n))):
        fold[te] = k
    return fold


def group_assignment(groups: Sequence, n_folds: int, seed: int | None = None) -> np.ndarray:
    """Fold of each row so that no group is split between folds.

    With at most ``n_folds`` groups every group is its own fold, numbered in sorted group order; with more,
    ``GroupKFold(n_folds)`` (shuffled with ``seed`` when it is not None, sklearn ≥ 1.6). Returns int (n,).
    Raises ValueError with fewer than 2 groups.
    """
    from sklearn.model_selection import GroupKFold

    g = np.asarray(groups).astype(str)
    labels = np.unique(g)
    if len(labels) < 2:
        raise ValueError(f"a grouped split needs >= 2 groups, got {list(labels)}")
    if len(labels) <= n_folds:
        return np.searchsorted(labels, g)
    cv = GroupKFold(n_folds) if seed is None else GroupKFold(n_folds, shuffle=True, random_state=seed)
    fold = np.empty(len(g), dtype=int)
    for k, (_, te) in enumerate(cv.split(np.zeros(len(g)), groups=g)):
        fold[te] = k
    return fold


def spatial_blocks(x_um: np.ndarray, y_um: np.ndarray, slides: Sequence, block_um: float) -> np.ndarray:
    """Square spatial block of each spot: ``"<slide>:<bx>,<by>"`` with ``bx = floor((x − min_slide x) / block_um)``
    (likewise y), i.e. a grid of side ``block_um`` µm anchored at each slide's smallest coordinates.

    ``x_um``, ``y_um``: (n,) spot centres (µm); ``slides``: (n,). Returns object (n,). Raises ValueError for
    ``block_um`` ≤ 0.
    """
    if not block_um > 0:
        raise ValueError(f"block_um must be > 0, got {block_um}")
    x, y = np.asarray(x_um, float), np.asarray(y_um, float)
    s = pd.Series(np.asarray(slides).astype(str))
    x0 = pd.Series(x).groupby(s).transform("min").to_numpy()
    y0 = pd.Series(y).groupby(s).transform("min").to_numpy()
    bx = np.floor((x - x0) / block_um).astype(int)
    by = np.floor((y - y0) / block_um).astype(int)
    return np.array([f"{a}:{b},{c}" for a, b, c in zip(s, bx, by)], dtype=object)


def block_assignment(blocks: Sequence, n_folds: int, seed: int) -> np.ndarray:
    """Fold of each row, keeping each block in one fold: blocks are visited in the order of a
    ``numpy.random.default_rng(seed)`` permutation (of the sorted block labels) and each goes to the fold with
    the fewest rows so far (ties: the lowest fold). Returns int (n,); with fewer blocks than ``n_folds``, one fold
    per block. Raises ValueError with fewer than 2 blocks."""
    b = np.asarray(blocks).astype(str)
    labels, inv, sizes = np.unique(b, return_inverse=True, return_counts=True)
    if len(labels) < 2:
        raise ValueError(f"spatial blocks: {len(labels)} block(s); need >= 2 (use a smaller block_um)")
    k = min(n_folds, len(labels))
    load = np.zeros(k, dtype=int)
    fold_of_block = np.empty(len(labels), dtype=int)
    for j in np.random.default_rng(seed).permutation(len(labels)):
        f = int(np.argmin(load))
        fold_of_block[j] = f
        load[f] += sizes[j]
    return fold_of_block[inv]


def auto_block_um(x_um: np.ndarray, y_um: np.ndarray, slides: Sequence, n_folds: int, patch_um: float,
                  buffer_um: float, blocks_per_fold: int = BLOCKS_PER_FOLD) -> float:
    """Automatic side of the spatial blocks (µm): ``sqrt(A / (blocks_per_fold · n_folds))`` where A is the summed
    area of the slides' bounding boxes of the spots, at least ``2 (patch_um + buffer_um)`` so that a block is
    wider than the buffer around it. Returns a float (µm)."""
    d = pd.DataFrame({"x": np.asarray(x_um, float), "y": np.asarray(y_um, float),
                      "s": np.asarray(slides).astype(str)})
    ext = d.groupby("s").agg(x0=("x", "min"), x1=("x", "max"), y0=("y", "min"), y1=("y", "max"))
    area = float(((ext.x1 - ext.x0 + patch_um) * (ext.y1 - ext.y0 + patch_um)).sum())
    return max(math.sqrt(area / (blocks_per_fold * n_folds)), 2.0 * (patch_um + buffer_um))


def buffer_mask(x_um: np.ndarray, y_um: np.ndarray, slides: Sequence, test: np.ndarray, patch_um: float,
                buffer_um: float) -> np.ndarray:
    """Non-test spots whose patch lies closer than ``buffer_um`` to a test patch on the same slide.

    Square patches of side ``patch_um`` centred on the spots: the gap between two patches is the Chebyshev
    distance of their centres minus ``patch_um``, so a spot is a buffer spot when that distance to the nearest test
    centre is < ``patch_um + buffer_um`` (KD-tree, ``scipy.spatial.cKDTree`` with p = ∞).

    ``x_um``, ``y_um``, ``slides``, ``test``: (n,); returns bool (n,), False on every test spot.
    """
    from scipy.spatial import cKDTree

    x, y = np.asarray(x_um, float), np.asarray(y_um, float)
    s = np.asarray(slides).astype(str)
    test = np.asarray(test, bool)
    bound = float(patch_um) + float(buffer_um)
    out = np.zeros(len(x), dtype=bool)
    for slide in np.unique(s[test]):
        on = s == slide
        t = on & test
        q = on & ~test
        if not q.any():
            continue
        d, _ = cKDTree(np.c_[x[t], y[t]]).query(np.c_[x[q], y[q]], k=1, p=np.inf, distance_upper_bound=bound)
        out[np.flatnonzero(q)[d < bound]] = True
    return out


def buffer_folds(x_um, y_um, slides, fold: np.ndarray, patch_um: float, buffer_um: float) -> list[list[int]]:
    """For each spot, the folds (sorted) whose training part excludes it as a buffer spot of that fold's test part
    (:func:`buffer_mask` per fold). ``fold``: int (n,). Returns a list of n lists."""
    fold = np.asarray(fold, int)
    out: list[list[int]] = [[] for _ in range(len(fold))]
    for k in np.unique(fold):
        for i in np.flatnonzero(buffer_mask(x_um, y_um, slides, fold == k, patch_um, buffer_um)):
            out[i].append(int(k))
    return out


# ----------------------------------------------------------------------------------------------------
# the fold table
# ----------------------------------------------------------------------------------------------------
def _rows(ids, task, fold, group, scheme, outer, buf) -> pd.DataFrame:
    n = len(ids)
    return pd.DataFrame({
        "spot_id": np.asarray(ids, dtype=str),
        "task": task,
        "fold": np.asarray(fold, int),
        "group": np.asarray(group, dtype=object) if group is not None else np.full(n, "", dtype=object),
        "scheme": scheme,
        "outer": np.broadcast_to(np.asarray(outer, int), (n,)),
        "buffer_folds": [";".join(map(str, b)) for b in buf] if buf is not None else [""] * n,
    }, columns=FOLD_COLUMNS)


def _block_folds(obs: pd.DataFrame, n_folds: int, seed: int, patch_um: float, buffer_um: float,
                 block_um: float | None, what: str):
    bu = block_um or auto_block_um(obs["x_um"], obs["y_um"], obs["slide"], n_folds, patch_um, buffer_um)
    blocks = spatial_blocks(obs["x_um"], obs["y_um"], obs["slide"], bu)
    fold = block_assignment(blocks, n_folds, seed)
    buf = buffer_folds(obs["x_um"], obs["y_um"], obs["slide"], fold, patch_um, buffer_um)
    log.info("%s: %d spots in %d spatial blocks of %.1f µm (buffer %.1f µm) over %d folds", what, len(obs),
             len(set(blocks)), bu, buffer_um, fold.max() + 1)
    return fold, blocks, buf, bu


def make_folds(
    obs: pd.DataFrame,
    task_spots: Mapping[str, Sequence[str]],
    protocol: str,
    n_folds: int,
    seed: int,
    cv: str = "kfold",
    patch_um: float = 200.0,
    buffer_um: float | None = None,
    block_um: float | None = None,
    n_outer: int | None = None,
) -> tuple[pd.DataFrame, dict]:
    """The fold table of one dataset, protocol and seed (module docstring).

    Parameters
    ----------
    obs : spots table indexed by spot id with ``slide``, ``donor``, ``x_um``, ``y_um`` (µm).
    task_spots : ``{task: spot ids}``, each task's usable spots (clean labels / targets) in ``obs`` order.
    protocol : ``transductive`` or ``inductive``.
    n_folds : ``config: probe.n_folds``.
    seed : run seed (KFold shuffling, donor and block assignment).
    cv : transductive folds, ``kfold`` or ``group_slide`` (``config: probe.cv``).
    patch_um : patch side (µm) of the dataset; ``buffer_um``: gap kept between training and test patches
        (default ``patch_um``); ``block_um``: side of the spatial blocks (default :func:`auto_block_um`).
    n_outer : outer folds the workflow planned (``config_donors`` → :func:`n_outer_folds`); checked when given.

    Returns
    -------
    ``(table, meta)``: the long table (:data:`FOLD_COLUMNS`) and a JSON-serialisable dict (per task ``scheme``,
    ``note``, ``n_spots``, ``n_folds``, per fold ``n_test``, ``n_buffer``, ``outer``, ``unit``, ``test_groups``).

    Raises
    ------
    ValueError for an unknown protocol or cv, a task spot absent from ``obs``, or ``n_outer`` different from the
    number of outer folds the donors in ``obs`` give.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if cv not in ("kfold", "group_slide"):
        raise ValueError(f"probe.cv must be 'kfold' or 'group_slide', got {cv!r} (fix config probe.cv)")
    need = ("slide", "donor", "x_um", "y_um") if protocol == "inductive" else ("slide",) if cv == "group_slide" else ()
    for c in need:
        if c not in obs.columns:
            raise ValueError(f"spots obs lacks column {c!r} (see workflow_scripts/data/model.py)")
    obs = obs.copy()
    obs.index = obs.index.astype(str)
    for c in ("slide", "donor"):
        if c in obs.columns:
            obs[c] = obs[c].astype(str)
    buffer_um = float(patch_um if buffer_um is None else buffer_um)
    if buffer_um < patch_um and protocol == "inductive":
        log.warning("inductive.buffer_um %.1f µm is below one patch (%.1f µm)", buffer_um, patch_um)
    parts: list[pd.DataFrame] = []
    meta: dict = {"protocol": protocol, "seed": int(seed), "n_folds": int(n_folds), "patch_um": float(patch_um),
                  "buffer_um": buffer_um, "tasks": {}}

    iface = None
    if protocol == "inductive":
        donors = sorted(obs["donor"].unique())
        k_outer = n_outer_folds(len(donors), n_folds)
        if n_outer is not None and int(n_outer) != k_outer:
            raise ValueError(
                f"the spots hold {len(donors)} donor(s) {donors}, i.e. {k_outer} outer folds, but the workflow "
                f"planned {n_outer} from the config (datasets.<d>.sections / samples / donors); make them agree")
        if len(donors) >= 2:
            fold = group_assignment(obs["donor"], n_folds, seed)
            iface = dict(scheme="donor", fold=fold, group=obs["donor"].to_numpy(), buf=None, block_um=None)
            note = f"interface fit on the training donors of each of {k_outer} outer folds"
        else:
            fold, blocks, buf, bu = _block_folds(obs, n_folds, seed, patch_um, buffer_um, block_um, "interface")
            iface = dict(scheme="spatial_block", fold=fold, group=blocks, buf=buf, block_um=bu)
            note = (f"one donor ({donors[0]}): interface fit on spatial blocks of {bu:.0f} µm "
                    f"({buffer_um:.0f} µm buffer)")
        iface["outer_of_donor"] = {}
        if iface["scheme"] == "donor":
            iface["outer_of_donor"] = dict(zip(obs["donor"], iface["fold"].tolist()))
        parts.append(_rows(obs.index, INTERFACE_TASK, iface["fold"], iface["group"], iface["scheme"],
                           iface["fold"], iface["buf"]))
        meta["n_outer"] = k_outer
        meta["donors"] = donors
        meta["interface"] = _task_meta(parts[-1], iface["scheme"], note, seed, iface["block_um"])
        for k, v in meta["interface"]["folds"].items():
            log.info("interface outer fold %s: %d spots held out (%s), %d buffer spots", k, v["n_test"],
                     v["test_groups"] or "blocks", v["n_buffer"])

    for task, ids in task_spots.items():
        ids = pd.Index(np.asarray(ids, dtype=str))
        missing = ids.difference(obs.index)
        if len(missing):
            raise ValueError(f"task {task}: {len(missing)} spot ids not in the spots table, e.g. {list(missing[:3])}")
        o = obs.loc[ids]
        block = None
        if protocol == "transductive":
            if cv == "kfold":
                if len(ids) < n_folds:
                    log.warning("task %s: %d spots < n_folds %d; task has no folds", task, len(ids), n_folds)
                    continue
                fold, group, scheme = kfold_assignment(len(ids), n_folds, seed), None, "kfold"
                note = "interface trained on all spots; KFold over the task's spots (paper protocol)"
            else:
                if o["slide"].nunique() < 2:
                    log.warning("task %s: group_slide needs >= 2 slides, its spots lie on %d; task has no folds",
                                task, o["slide"].nunique())
                    continue
                fold, group, scheme = group_assignment(o["slide"], n_folds), o["slide"].to_numpy(), "group_slide"
                note = "interface trained on all spots; folds grouped by slide"
            part = _rows(ids, task, fold, group, scheme, -1, None)
        else:
            t_donors = sorted(o["donor"].unique())
            if iface["scheme"] == "donor" and len(t_donors) >= 2:
                pos = obs.index.get_indexer(ids)
                fold = iface["fold"][pos]
                part = _rows(ids, task, fold, o["donor"].to_numpy(), "donor", fold, None)
                note = "interface and probe fit on training donors, scored on held-out donors"
            elif iface["scheme"] == "donor":
                d = t_donors[0]
                fold, blocks, buf, block = _block_folds(o, n_folds, seed, patch_um, buffer_um, block_um,
                                                        f"task {task} (donor {d})")
                part = _rows(ids, task, fold, blocks, "spatial_block", iface["outer_of_donor"][d], buf)
                note = (f"labels from donor {d} only: spatial blocks of {block:.0f} µm within it "
                        f"({buffer_um:.0f} µm buffer), interface trained without donor {d}")
            else:
                pos = obs.index.get_indexer(ids)
                fold = iface["fold"][pos]
                buf = [iface["buf"][i] for i in pos]
                block = iface["block_um"]
                part = _rows(ids, task, fold, iface["group"][pos], "spatial_block", fold, buf)
                note = (f"one donor: interface and probe fit on spatial blocks of {block:.0f} µm "
                        f"({buffer_um:.0f} µm buffer), scored on held-out blocks")
        parts.append(part)
        tm = _task_meta(part, part["scheme"].iloc[0], note, seed, block)
        tm["n_spots"] = int(len(ids))
        meta["tasks"][task] = tm
        log.info("task %s: %d spots, scheme %s, %d folds; %s", task, len(ids), tm["scheme"], tm["n_folds"], note)
        for k, v in tm["folds"].items():
            log.info("task %s fold %s: %d test spots, %d buffer spots left out of training, interface %d%s", task,
                     k, v["n_test"], v["n_buffer"], v["outer"], f", held out: {v['test_groups']}"
                     if v["test_groups"] else "")
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=FOLD_COLUMNS)
    return table, meta


def _task_meta(part: pd.DataFrame, scheme: str, note: str, seed: int, block_um: float | None) -> dict:
    folds = {}
    buf = part["buffer_folds"].astype(str)
    for k, g in part.groupby("fold", sort=True):
        grouped = scheme in ("donor", "group_slide")
        held = "+".join(sorted(set(g["group"].astype(str)))) if grouped else ""
        n_buf = int(buf.map(lambda s, k=k: str(k) in s.split(";")).sum())
        folds[str(int(k))] = dict(n_test=int(len(g)), n_buffer=n_buf, outer=int(g["outer"].iloc[0]),
                                  test_groups=held, unit=f"g:{held}" if grouped else f"s{seed}:f{int(k)}")
    return dict(scheme=str(scheme), note=note, n_folds=len(folds), block_um=block_um, folds=folds)


# ----------------------------------------------------------------------------------------------------
# reading and using a fold table
# ----------------------------------------------------------------------------------------------------
def read_folds(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read a fold table (TSV) and its ``.json`` side file; FileNotFoundError naming the path when absent,
    ValueError when columns are missing."""
    path = Path(path)
    side = path.with_suffix(".json")
    for p in (path, side):
        if not p.exists():
            raise FileNotFoundError(f"fold file not found: {p} (run the `folds` rule for this dataset, protocol and seed)")
    t = pd.read_csv(path, sep="\t", dtype={"spot_id": str, "task": str, "group": str, "scheme": str,
                                           "buffer_folds": str}, keep_default_na=False)
    missing = [c for c in FOLD_COLUMNS if c not in t.columns]
    if missing:
        raise ValueError(f"{path}: fold table lacks columns {missing}")
    return t, json.loads(side.read_text())


def split_ids(task_folds: pd.DataFrame, fold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spot ids of the training part, the test part and the buffer of ``fold`` in one task's fold rows.

    Training = rows of other folds that are not buffer spots of ``fold``. Returns three arrays of ids.
    """
    f = task_folds["fold"].to_numpy(int)
    ids = task_folds["spot_id"].to_numpy(str)
    key = str(int(fold))
    buf = task_folds["buffer_folds"].astype(str).map(lambda s: key in s.split(";")).to_numpy(bool)
    test = f == int(fold)
    return ids[~test & ~buf], ids[test], ids[~test & buf]


def fit_spot_ids(folds: pd.DataFrame, outer: int) -> np.ndarray:
    """Spot ids the interface of outer fold ``outer`` may be fit on (its training part of the ``_interface``
    rows). Raises ValueError when the table has no interface rows or no such fold."""
    rows = folds[folds["task"] == INTERFACE_TASK]
    if rows.empty:
        raise ValueError("the fold table has no interface rows (only the inductive protocol trains per outer fold)")
    if int(outer) not in set(rows["fold"].astype(int)):
        raise ValueError(f"outer fold {outer} not in the fold table (folds {sorted(set(rows['fold']))})")
    return split_ids(rows, int(outer))[0]


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    """CLI.

    ``python -m workflow_scripts.evaluation.folds make --spots spots.h5ad --protocol P --seed S --tasks JSON
    --params JSON [--inductive JSON] [--min-class-size N] [--patch-um X] [--n-outer K] --out FOLDS.tsv --log LOG``
    writes the fold table and ``FOLDS.json``;
    ``make --interface-only`` writes only the ``_interface`` rows of the inductive protocol (identical to those of
    the full table: they do not depend on the tasks), so that the alignment jobs do not rerun when a task setting
    changes;
    ``python -m workflow_scripts.evaluation.folds fit-spots --folds FOLDS.tsv --outer K --out FIT.tsv --log LOG``
    writes the ``spot_id`` list the interface of outer fold K is fit on (``align --fit-spots``).
    """
    from ..io import json_arg, setup_logging

    p = argparse.ArgumentParser(prog="python -m workflow_scripts.evaluation.folds", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="compute the fold table of one dataset, protocol and seed")
    m.add_argument("--spots", required=True)
    m.add_argument("--protocol", required=True, choices=PROTOCOLS)
    m.add_argument("--seed", type=int, required=True)
    m.add_argument("--tasks", default=None, help="JSON dict {task: {type, label|obsm, exclude}}")
    m.add_argument("--params", required=True, help="JSON of config probe: {n_folds, cv, ...}")
    m.add_argument("--inductive", default="{}", help="JSON of config inductive: {buffer_um, block_um}")
    m.add_argument("--min-class-size", type=int, default=10)
    m.add_argument("--patch-um", type=float, default=200.0)
    m.add_argument("--n-outer", type=int, default=None, help="outer folds planned by the workflow (checked)")
    m.add_argument("--interface-only", action="store_true",
                   help="inductive: write only the interface rows (the outer folds the alignment is trained on); "
                        "they depend on the donors, n_folds, seed and patch geometry, not on the tasks")
    f = sub.add_parser("fit-spots", help="the spots one outer fold's interface is fit on")
    f.add_argument("--folds", required=True)
    f.add_argument("--outer", type=int, required=True)
    for s in (m, f):
        s.add_argument("--out", required=True)
        s.add_argument("--log", default=None)
    args = p.parse_args(argv)
    setup_logging(args.log)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.cmd == "fit-spots":
        table, _ = read_folds(args.folds)
        ids = fit_spot_ids(table, args.outer)
        pd.DataFrame({"spot_id": ids}).to_csv(out, sep="\t", index=False)
        log.info("outer fold %d: interface fit on %d of %d spots; wrote %s", args.outer, len(ids),
                 int((table["task"] == INTERFACE_TASK).sum()), out)
        return

    import anndata as ad

    from .probes import check_task_spec, task_targets
    from .tasks import check_tasks

    if args.interface_only and args.protocol != "inductive":
        raise ValueError("--interface-only needs --protocol inductive (only it trains one interface per outer fold)")
    if args.tasks is None and not args.interface_only:
        raise ValueError("folds make: --tasks is required (JSON of datasets.<d>.tasks) unless --interface-only")
    tasks = {} if args.interface_only else json_arg(args.tasks, "--tasks")
    params = json_arg(args.params, "--params")
    ind = json_arg(args.inductive, "--inductive") or {}
    spots = Path(args.spots)
    if not spots.exists():
        raise FileNotFoundError(f"spots AnnData not found: {spots} (run the rule that builds results/<dataset>/spots.h5ad)")
    adata = ad.read_h5ad(spots, backed="r")
    log.info("folds: %s, protocol %s, seed %d, %d spots, tasks %s", spots, args.protocol, args.seed, adata.n_obs,
             list(tasks))
    check_tasks(adata, tasks, source=str(spots))  # a task whose label/obsm is absent fails here, before any probe
    task_spots, classes = {}, {}
    for task, spec in tasks.items():
        check_task_spec(task, spec)
        y = task_targets(adata, task, spec, args.min_class_size)
        if y is None:
            continue
        task_spots[task] = y.index
        if spec["type"] == "classification":
            classes[task] = sorted(y.unique().tolist())
            log.info("task %s: fixed class set %s", task, classes[task])
    table, meta = make_folds(adata.obs[["slide", "donor", "x_um", "y_um"]], task_spots, args.protocol,
                             int(params.get("n_folds", 5)), args.seed, params.get("cv", "kfold"), args.patch_um,
                             ind.get("buffer_um"), ind.get("block_um"), args.n_outer)
    for task, cl in classes.items():
        if task in meta["tasks"]:
            meta["tasks"][task]["classes"] = cl
    for task, spec in tasks.items():
        if task in meta["tasks"]:
            meta["tasks"][task]["type"] = spec["type"]
    table.to_csv(out, sep="\t", index=False)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    log.info("wrote %d rows (%d tasks) to %s and %s", len(table), table["task"].nunique(), out, out.with_suffix(".json"))


if __name__ == "__main__":
    main()
