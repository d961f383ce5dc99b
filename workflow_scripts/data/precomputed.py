"""``precomputed`` — bring your own spots: spots, coordinates, slides, donors and labels from one file.

Config (``datasets.<name>``; user guide: ``docs/synthetic.md#bring-your-own-embeddings``)::

    reader: precomputed
    spots_file: data/spots.tsv          # .csv, .tsv, .parquet (one row per spot) or .h5ad (obs = spots)
    columns: {spot_id: barcode}         # optional: data-model column -> your column name
    obsm: {composition: "comp_*"}       # optional: regression targets from columns (a list, or a glob)
    images:                             # optional: H&E per slide; then px_x, px_y columns are needed
      A1: {path: data/A1.tif, um_per_px: 0.5}

Columns of the table (or of ``obs`` of the h5ad, whose ``obs_names`` are then the spot ids):

=============  ========  ==========================================================================
column         needed    meaning
=============  ========  ==========================================================================
``spot_id``    yes       unique spot id, as in the embedding files (not needed for an h5ad)
``slide``      yes       section / slide name
``x_um``       yes       spot centre, µm, in the slide's own frame
``y_um``       yes
``donor``      no        donor / patient (default: the slide, logged)
``px_x, px_y`` images    spot centre in pixels of the slide image (x = column); without images = µm
``split``      no        default ``eval``
anything else  no        labels (text columns become categorical) or numeric covariates
=============  ========  ==========================================================================

Without ``images`` the dataset has no H&E (``uns['slides'][s]['image_path'] = ""``, ``um_per_px = 1``): use the
``precomputed`` encoder (or ``pca`` on an h5ad with counts in ``X``) for both modalities. An h5ad's ``X`` (counts),
``var`` and ``obsm`` (e.g. ``composition``, or embeddings for ``precomputed: {obsm: KEY}``) are kept.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..io import lazy_module

ad = lazy_module("anndata")  # imported on first use: readers are imported while the DAG is planned
log = logging.getLogger(__name__)

REQUIRED = ("spot_id", "slide", "x_um", "y_um")
TABLE_TYPES = (".csv", ".tsv", ".txt", ".parquet", ".h5ad")


def _read(path: Path) -> tuple[pd.DataFrame, ad.AnnData | None]:
    suffix = path.suffix.lower()
    if suffix not in TABLE_TYPES:
        raise ValueError(f"datasets.<d>.spots_file {path}: unknown file type {suffix!r}; use one of {list(TABLE_TYPES)}")
    if suffix == ".h5ad":
        a = ad.read_h5ad(path)
        obs = a.obs.copy()
        obs["spot_id"] = a.obs_names.astype(str)
        return obs.reset_index(drop=True), a
    if suffix == ".parquet":
        return pd.read_parquet(path), None
    return pd.read_csv(path, sep="," if suffix == ".csv" else "\t"), None


def _obsm_columns(table: pd.DataFrame, spec, key: str) -> list[str]:
    cols = [c for c in table.columns if fnmatch.fnmatch(str(c), spec)] if isinstance(spec, str) else list(spec)
    missing = [c for c in cols if c not in table.columns]
    if missing or not cols:
        raise ValueError(f"datasets.<d>.obsm.{key}: columns {missing or spec!r} not in the spots file")
    return cols


def read_precomputed(params: dict) -> ad.AnnData:
    """Spots AnnData of the data model (:mod:`workflow_scripts.data.model`) from ``params['spots_file']``.

    Parameters
    ----------
    params : the dataset's config entry (keys of the module docstring).

    Returns the spots AnnData (X: the h5ad's counts, or no genes for a table). Raises FileNotFoundError naming a
    missing file; ValueError naming the column or key for a missing required column, duplicated spot ids, empty
    slides, non-numeric coordinates, or images without ``px_x``/``px_y``.
    """
    if not params.get("spots_file"):
        raise ValueError("reader precomputed needs datasets.<d>.spots_file (a .csv/.tsv/.parquet/.h5ad of the spots)")
    path = Path(params["spots_file"])
    if not path.exists():
        raise FileNotFoundError(f"datasets.<d>.spots_file not found: {path}")
    table, source = _read(path)
    rename = {v: k for k, v in (params.get("columns") or {}).items()}
    table = table.rename(columns=rename)
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; needed: {list(REQUIRED)} (rename yours with "
                         "datasets.<d>.columns: {spot_id: your_column, ...})")
    table["spot_id"] = table["spot_id"].astype(str)
    if table["spot_id"].duplicated().any():
        raise ValueError(f"{path}: duplicated spot ids, e.g. {table.loc[table.spot_id.duplicated(), 'spot_id'][:3].tolist()}")
    if table["slide"].isna().any():
        raise ValueError(f"{path}: {int(table['slide'].isna().sum())} spots have no slide")
    for c in ("x_um", "y_um", "px_x", "px_y"):
        if c in table.columns and not pd.api.types.is_numeric_dtype(table[c]):
            raise ValueError(f"{path}: column {c!r} must be numeric")
    table["slide"] = table["slide"].astype(str)
    if "donor" not in table.columns:
        log.info("%s: no donor column; each slide is its own donor", path)
        table["donor"] = table["slide"]
    table["donor"] = table["donor"].astype(str)
    if "split" not in table.columns:
        table["split"] = "eval"
    images = params.get("images") or {}
    if images:
        if not {"px_x", "px_y"} <= set(table.columns):
            raise ValueError(f"{path}: datasets.<d>.images is set, so px_x and px_y (pixels of each slide image) "
                             "are needed")
        absent = sorted(set(table["slide"]) - set(images))
        if absent:
            raise ValueError(f"datasets.<d>.images: no image for slide(s) {absent}")
        slides = {s: {"image_path": str(images[s]["path"]), "um_per_px": float(images[s]["um_per_px"])}
                  for s in sorted(set(table["slide"]))}
    else:
        if {"px_x", "px_y"} & set(table.columns):
            log.info("%s: px_x/px_y given but no images; replaced by the µm coordinates (um_per_px 1)", path)
        table["px_x"], table["px_y"] = table["x_um"], table["y_um"]
        slides = {s: {"image_path": "", "um_per_px": 1.0} for s in sorted(set(table["slide"]))}
    obsm = {}
    used = set()
    for key, spec in (params.get("obsm") or {}).items():
        cols = _obsm_columns(table, spec, key)
        obsm[key] = (table[cols].to_numpy(dtype=np.float64), [str(c) for c in cols])
        used |= set(cols)
    obs = table.drop(columns=sorted(used)).set_index("spot_id")
    obs.index.name = None
    for c in obs.columns:
        if obs[c].dtype == object or isinstance(obs[c].dtype, pd.StringDtype) or c in ("slide", "donor", "split"):
            obs[c] = obs[c].astype(str).where(obs[c].notna()).astype("category")
    if source is not None:
        a = ad.AnnData(X=source.X, obs=obs, var=source.var.copy())
        for k, v in source.obsm.items():
            a.obsm[k] = v
        for k in ("composition_names",):
            if k in source.uns:
                a.uns[k] = source.uns[k]
    else:
        a = ad.AnnData(X=sp.csr_matrix((len(obs), 0), dtype=np.float32), obs=obs)
    for key, (values, names) in obsm.items():
        a.obsm[key] = values
        if key == "composition":
            a.uns["composition_names"] = names
    a.uns["slides"] = slides
    log.info("precomputed: %d spots on %d slides, %d donors, %d genes, labels %s, obsm %s, images: %s", a.n_obs,
             len(slides), obs["donor"].nunique(), a.n_vars,
             [c for c in obs.columns if c not in ("slide", "donor", "split", "x_um", "y_um", "px_x", "px_y")],
             sorted(a.obsm.keys()), "yes" if images else "none")
    return a


def build_dataset(params: dict, seed: int):
    """Reader adapter (``reader: precomputed``); returns ``(spots, None)``. ``seed`` is unused."""
    return read_precomputed(params), None


def input_files(params: dict) -> list[str]:
    """The spots file and the slide images (for Snakemake's input list)."""
    files = [str(params["spots_file"])] if params.get("spots_file") else []
    files += [str(v["path"]) for v in (params.get("images") or {}).values() if isinstance(v, dict) and v.get("path")]
    return files
