"""Reader for 10x Xenium data paired with H&E (the paper's lung and breast datasets), built on spatialdata-io.

Sources (docs/datasets.md, docs/reference.md#datasets):

* breast — 10x public datasets (Janesick et al. 2023 and TENX94–99): the Xenium ``outs`` folder
  (``experiment.xenium``, ``cell_feature_matrix.h5``, ``cells.parquet``, ``cells.zarr.zip``), the H&E OME-TIFF
  and its H&E → Xenium alignment CSV. Read with :func:`spatialdata_io.xenium` (cells, counts, the µm → Xenium
  pixel scale) and :func:`spatialdata_io.xenium_aligned_image` (the H&E with the alignment as its affine).
* lung — Vannan et al. 2025, GEO GSE250346: per sample a transcripts table and an author-registered H&E TIFF
  in the Xenium coordinate space, cell annotations of the Seurat object, H&E region annotations. There is no
  ``outs`` folder, so the counts are built from the transcripts (:func:`counts_from_transcripts`); the
  registered H&E is read with :func:`spatialdata_io.xenium_aligned_image` without an alignment file.

Coordinate frames (spatialdata-io's conventions)
------------------------------------------------
* cells: Xenium µm (``cells.parquet`` ``x_centroid``/``y_centroid``), mapped to the ``global`` coordinate
  system (Xenium morphology pixels) by ``Scale(1 / pixel_size)``;
* H&E: level-0 pixels, mapped to ``global`` by the 10x alignment matrix (H&E px → Xenium px), or by the
  identity for an image already registered to Xenium pixels (with ``um_per_px`` configured and no alignment:
  ``Scale(um_per_px / pixel_size)``).

A cell's H&E pixel is the composition ``cells → global → H&E`` (spatialdata transformations), and the H&E
resolution follows from the same map: ``µm/px(H&E) = sqrt(|det|)`` of its linear part (H&E px → µm).
Patches are built by :mod:`workflow_scripts.data.tiling` in the H&E frame (H&E px × µm/px), so each patch is
exactly the axis-aligned square that :mod:`workflow_scripts.data.patches` cuts from the image.

Dataset config keys are listed in ``docs/datasets.md`` ("Dataset keys"); :func:`build_dataset` is the entry
point used by ``workflow_scripts/data/prepare.py`` for ``reader: xenium``.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

from ..io import lazy_module
from . import tiling
from .download import dataset_samples
from .model import validate_spots
from .reader_common import (align_genes, common_genes, expand_glob, file_template, label_points, map_labels,
                            per_sample, read_region_polygons, resolve_file, sample_split)

ad = lazy_module("anndata")  # imported on first use: readers are imported while the DAG is planned
log = logging.getLogger(__name__)

DEFAULT_XENIUM_PX_UM = 0.2125  # µm per Xenium morphology pixel on every Xenium instrument (experiment.xenium)
CONTROL_PREFIXES = (
    "NegControlProbe_", "NegControlCodeword_", "BLANK_", "antisense_", "UnassignedCodeword_",
    "DeprecatedCodeword_", "Intergenic_", "GenomicControlProbe_",
)
OUTS_FILES = ("experiment.xenium", "cell_feature_matrix.h5", "cells.parquet", "cells.zarr.zip")
FILE_KEYS = ("transcripts", "image", "alignment", "cell_table", "regions")


# --------------------------------------------------------------------------------------------------
# counts and cells


def read_outs(outs: str | Path, name: str = ""):
    """Cells of a Xenium ``outs`` folder through :func:`spatialdata_io.xenium` (table and cell circles only).

    Returns ``(counts, centroids, cells_to_global)``: counts = AnnData cells × genes, raw counts (CSR float32),
    ``var_names`` gene symbols (made unique), ``var['gene_ids']`` Ensembl ids, only ``feature_types ==
    'Gene Expression'`` (the control features dropped are counted per type in the log); centroids =
    DataFrame ``x_um``, ``y_um`` (Xenium µm) indexed by ``cell_id``; cells_to_global = the spatialdata
    transformation of the cells (µm → Xenium pixels). Raises FileNotFoundError naming a missing file.
    """
    import spatialdata_io
    from spatialdata.transformations import get_transformation

    outs = Path(outs)
    missing = [f for f in OUTS_FILES if not (outs / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"{name}: the Xenium outs folder {outs} lacks {missing}; spatialdata-io reads "
            f"{list(OUTS_FILES)} from it (run the download rule, or unpack them from the sample's outs.zip)"
        )
    sdata = spatialdata_io.xenium(
        outs, cells_boundaries=False, nucleus_boundaries=False, cells_as_circles=True, cells_labels=False,
        nucleus_labels=False, transcripts=False, morphology_mip=False, morphology_focus=False,
        aligned_images=False, cells_table=True, gex_only=False,
    )
    table = sdata.tables["table"]
    ftype = table.var["feature_types"].astype(str)
    drop = (ftype != "Gene Expression").to_numpy()
    if drop.any():
        log.info("%s: dropped %d non-gene features %s", name, int(drop.sum()), ftype[drop].value_counts().to_dict())
    counts = ad.AnnData(X=sp.csr_matrix(table.X[:, ~drop], dtype=np.float32),
                        obs=pd.DataFrame(index=table.obs_names.astype(str)),
                        var=table.var.loc[~drop, ["gene_ids"]].copy())
    counts.var_names_make_unique()
    xy = np.asarray(table.obsm["spatial"], dtype=float)
    cent = pd.DataFrame({"x_um": xy[:, 0], "y_um": xy[:, 1]}, index=counts.obs_names)
    return counts, cent, get_transformation(sdata.shapes["cell_circles"], "global")


def _decode(v):
    return v.decode() if isinstance(v, bytes) else v


def counts_from_transcripts(
    path: str | Path, min_qv: float = 20.0, chunksize: int = 2_000_000
) -> tuple[ad.AnnData, pd.DataFrame]:
    """Cell × gene counts and transcript-mean centroids from a Xenium transcripts table (csv(.gz) or parquet).

    For data published without an ``outs`` folder (GEO lung). Keeps transcripts with ``qv >= min_qv`` (10x's
    own matrix uses Q20) that are assigned to a cell (``cell_id`` not ``UNASSIGNED``/-1/empty) and are not
    control features (names starting with :data:`CONTROL_PREFIXES`); every dropped transcript is counted in the
    log. Read in chunks; the whole table is never in memory.

    Returns
    -------
    counts : AnnData cells × genes (CSR float32).
    centroids : DataFrame ``x_um``, ``y_um`` indexed by ``cell_id``: the mean transcript position, only an
        approximation of the segmented cell centroid.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Xenium transcripts table not found: {path}")
    cols = ["cell_id", "feature_name", "qv", "x_location", "y_location"]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        chunks = (b.to_pandas() for b in pf.iter_batches(batch_size=chunksize, columns=cols))
        n_chunks = int(np.ceil(pf.metadata.num_rows / chunksize))
    else:
        chunks = pd.read_csv(path, usecols=cols, chunksize=chunksize)
        n_chunks = None
    parts, cents = [], []
    n_read = n_qv = n_ctrl = n_unassigned = 0
    for df in tqdm(chunks, desc=f"transcripts {path.name}", unit="chunk", total=n_chunks, mininterval=5.0):
        n_read += len(df)
        df["cell_id"] = df["cell_id"].map(_decode).astype(str)
        df["feature_name"] = df["feature_name"].map(_decode).astype(str)
        ok_qv = df["qv"].to_numpy(float) >= min_qv
        ctrl = df["feature_name"].str.startswith(CONTROL_PREFIXES).to_numpy()
        unassigned = df["cell_id"].isin(["UNASSIGNED", "-1", "", "nan"]).to_numpy()
        n_qv += int((~ok_qv).sum())
        n_ctrl += int((ok_qv & ctrl).sum())
        n_unassigned += int((ok_qv & ~ctrl & unassigned).sum())
        df = df[ok_qv & ~ctrl & ~unassigned]
        parts.append(df.groupby(["cell_id", "feature_name"], sort=False).size())
        cents.append(df.groupby("cell_id", sort=False)[["x_location", "y_location"]].agg(["sum", "count"]))
    if not parts:
        raise ValueError(f"{path}: no transcripts")
    counts = pd.concat(parts).groupby(level=[0, 1]).sum()
    log.info(
        "%s: %d transcripts read; dropped %d with qv < %g, %d control features, %d not assigned to a cell; "
        "%d kept", path.name, n_read, n_qv, min_qv, n_ctrl, n_unassigned, int(counts.sum()),
    )
    cell_codes, cell_names = pd.factorize(counts.index.get_level_values(0), sort=True)
    gene_codes, gene_names = pd.factorize(counts.index.get_level_values(1), sort=True)
    X = sp.csr_matrix(
        (counts.to_numpy(np.float32), (cell_codes, gene_codes)), shape=(len(cell_names), len(gene_names))
    )
    c = pd.concat(cents).groupby(level=0).sum()
    cent = pd.DataFrame(
        {"x_um": c[("x_location", "sum")] / c[("x_location", "count")],
         "y_um": c[("y_location", "sum")] / c[("y_location", "count")]}
    ).reindex(cell_names.astype(str))
    a = ad.AnnData(X=X, obs=pd.DataFrame(index=cell_names.astype(str)), var=pd.DataFrame(index=gene_names.astype(str)))
    return a, cent


# --------------------------------------------------------------------------------------------------
# H&E placement


def he_image_transform(params: Mapping, sample: str, image: Path, alignment: Path | None, px_um: float):
    """The H&E of ``sample`` as a spatialdata image element with its H&E px → Xenium px (``global``) transformation.

    Read with :func:`spatialdata_io.xenium_aligned_image` (lazy; only the shape is used here). With an alignment
    file (10x writes H&E px → Xenium px) that matrix is the transformation, inverted when
    ``alignment_direction: xenium_to_he``; without one the image is taken as registered to Xenium pixels
    (identity), or scaled by ``um_per_px / pixel_size`` when ``um_per_px`` is configured.

    Returns ``(he_to_global, (height, width))``. Raises ValueError for an unknown ``alignment_direction``.
    """
    import spatialdata_io
    from spatialdata.transformations import Scale, get_transformation

    from xarray import DataTree

    he = spatialdata_io.xenium_aligned_image(image, alignment)
    level0 = next(iter(he["scale0"].data_vars.values())) if isinstance(he, DataTree) else he
    shape = (int(level0.sizes["y"]), int(level0.sizes["x"]))
    t = get_transformation(he, "global")
    if alignment is not None:
        direction = params.get("alignment_direction", "he_to_xenium")
        if direction == "xenium_to_he":
            t = t.inverse()
        elif direction != "he_to_xenium":
            raise ValueError(f"alignment_direction must be he_to_xenium or xenium_to_he, got {direction!r}")
    else:
        conf_um = per_sample(params.get("um_per_px"), sample)
        if conf_um:
            t = Scale([float(conf_um) / px_um] * 2, axes=("x", "y"))
    return t, shape


def _affine(t) -> np.ndarray:
    """3 × 3 (x, y) affine matrix of a spatialdata transformation."""
    return np.asarray(t.to_affine_matrix(("x", "y"), ("x", "y")), dtype=float)


def _apply(A: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Points ``xy`` (n, 2) through the 3 × 3 affine ``A`` → (n, 2)."""
    return np.asarray(xy, dtype=float) @ A[:2, :2].T + A[:2, 2]


def cells_to_he_matrix(cells_to_global, he_to_global) -> np.ndarray:
    """3 × 3 affine (x, y) mapping cell µm to H&E level-0 pixels: ``cells → global → H&E`` (spatialdata).

    Both arguments are spatialdata transformations into the ``global`` coordinate system (Xenium pixels).
    """
    from spatialdata.transformations import Sequence

    return _affine(Sequence([cells_to_global, he_to_global.inverse()]))


def he_um_per_px(cells_to_he: np.ndarray, name: str = "") -> float:
    """µm per H&E pixel implied by a cell µm → H&E px affine: ``1 / sqrt(|det A[:2, :2]|)``.

    Logs a warning when the map scales x and y by more than 2 % differently (then patches are not exactly square).
    """
    L = np.asarray(cells_to_he)[:2, :2]
    s = np.linalg.svd(L, compute_uv=False)
    if s[0] / s[1] > 1.02:
        log.warning("%s: the H&E alignment scales x and y differently (singular values %.4f, %.4f)", name, s[0], s[1])
    return float(1.0 / np.sqrt(abs(np.linalg.det(L))))


# --------------------------------------------------------------------------------------------------
# one sample


def input_files(params: Mapping) -> list[str]:
    """Every raw file ``prepare`` reads for this dataset (the ``outs`` files and ``files.*`` of the built samples).

    Used by the workflow so that Snakemake names missing inputs before the job starts. Glob templates are
    listed as their single match when there is one, else as the pattern (which Snakemake then reports missing).
    """
    out: list[str] = []
    for s in dataset_samples(params):
        files = []
        outs = file_template(params, s, "outs")
        if outs is not None:
            outs = expand_glob(outs)
            files += [str(Path(outs) / f) for f in OUTS_FILES]
        for key in FILE_KEYS:
            pattern = file_template(params, s, key)
            if pattern is not None:
                files.append(expand_glob(pattern))
        out += [f for f in files if f not in out]
    return out


@dataclass
class SampleCells:
    """All cells of one sample: raw counts (AnnData cells × genes) and per-cell table ``obs``.

    ``obs`` columns: ``x_um``, ``y_um`` (Xenium µm), ``x_px``, ``y_px`` (H&E level-0 px), ``cell_type`` and
    ``region`` (codes into the dataset's class lists). ``image_path`` and ``um_per_px`` describe the H&E.
    """

    counts: ad.AnnData
    obs: pd.DataFrame
    image_path: Path
    um_per_px: float


def read_sample(params: Mapping, sample: str) -> SampleCells:
    """Read one Xenium sample as configured in ``params`` (see ``docs/datasets.md``) and place its cells on the H&E.

    Counts and centroids come from ``files.outs`` (:func:`read_outs`) or, without one, from ``files.transcripts``
    (:func:`counts_from_transcripts`) with centroids from the cell table's ``x_um``/``y_um`` columns (cells
    missing there keep their mean transcript position). Cell types come from ``files.cell_table`` (mapped with
    ``cell_type_map`` to ``composition_classes``; unmatched cells → ``unmapped_class``). Region labels come from
    ``files.regions`` (GeoJSON) or the cell table's ``region`` column; cells outside every polygon →
    ``unannotated_class``. Every configured ``files.*`` entry must exist. Raises FileNotFoundError/ValueError
    naming the missing file or key.
    """
    from spatialdata.transformations import Scale

    name = sample
    outs = resolve_file(params, sample, "outs")
    transcripts = resolve_file(params, sample, "transcripts")
    px_um = float(per_sample(params.get("xenium_px_um"), sample) or DEFAULT_XENIUM_PX_UM)
    tx_cent = None
    if outs is not None:
        counts, cent, cells_to_global = read_outs(outs, name)
        px_um = 1.0 / np.sqrt(abs(np.linalg.det(_affine(cells_to_global)[:2, :2])))  # experiment.xenium pixel_size
    elif transcripts is not None:
        counts, tx_cent = counts_from_transcripts(transcripts, float(params.get("min_qv", 20)))
        cent = tx_cent
        cells_to_global = Scale([1.0 / px_um] * 2, axes=("x", "y"))
    else:
        raise ValueError("dataset config: set files.outs (Xenium outs folder) or files.transcripts")

    # cell table (annotations, optionally coordinates)
    table = None
    ct_path = resolve_file(params, sample, "cell_table")
    cols = {"cell_id": "cell_id", "sample": None, "cell_type": None, "region": None, "x_um": None, "y_um": None}
    cols.update(params.get("cell_table_columns") or {})
    if ct_path is not None:
        table = _read_cell_table(ct_path, cols, sample, params.get("cell_key_format", "{cell_id}"))
    if tx_cent is not None:
        if table is not None and cols.get("x_um") and cols.get("y_um"):
            cent = table[["x_um", "y_um"]].astype(float)
            extra = tx_cent.index.difference(cent.index)
            if len(extra):  # cells absent from the table (e.g. removed by the authors' QC) keep a position
                log.info("%s: %d cells are not in the cell table; their centroid is the mean transcript position",
                         name, len(extra))
                cent = pd.concat([cent, tx_cent.loc[extra]])
        else:
            log.warning("%s: no cell-table coordinates; using mean transcript positions as cell centroids", name)
    missing = counts.obs_names.difference(cent.index)
    if len(missing):
        log.warning("%s: %d of %d cells have no centroid and are dropped", name, len(missing), counts.n_obs)
        counts = counts[counts.obs_names.isin(cent.index)].copy()
    obs = cent.reindex(counts.obs_names).copy()
    bad = ~np.isfinite(obs[["x_um", "y_um"]].to_numpy()).all(axis=1)
    if bad.any():
        log.warning("%s: %d cells with non-finite centroids dropped", name, int(bad.sum()))
        counts, obs = counts[~bad].copy(), obs[~bad]

    # H&E placement
    image = resolve_file(params, sample, "image", True)
    align_path = resolve_file(params, sample, "alignment")
    he_to_global, (h, w) = he_image_transform(params, sample, image, align_path, px_um)
    A = cells_to_he_matrix(cells_to_global, he_to_global)
    xy_um = obs[["x_um", "y_um"]].to_numpy()
    xy_px = _apply(A, xy_um)
    um = he_um_per_px(A, name)
    conf_um = per_sample(params.get("um_per_px"), sample)
    if align_path is not None and conf_um and abs(float(conf_um) - um) / um > 0.02:
        log.warning("%s: configured um_per_px %.5f differs from the alignment's %.5f; using the alignment",
                    name, float(conf_um), um)
    obs["x_px"], obs["y_px"] = xy_px[:, 0], xy_px[:, 1]
    inside = (xy_px[:, 0] >= 0) & (xy_px[:, 0] < w) & (xy_px[:, 1] >= 0) & (xy_px[:, 1] < h)
    log.info("%s: H&E %s (%d x %d px, %.4f µm/px); %.1f%% of %d cells fall inside the image",
             name, image.name, w, h, um, 100 * inside.mean(), len(obs))
    if inside.mean() < 0.95:
        msg = (f"{name}: only {100 * inside.mean():.1f}% of cells land inside the H&E image; check the alignment "
               "file and `alignment_direction` (10x writes H&E px -> Xenium px)")
        if inside.mean() < 0.5:
            raise ValueError(msg)
        log.warning(msg)

    # cell types
    ctypes = list(params.get("composition_classes") or [])
    unmapped = params.get("unmapped_class", "NOMAP")
    if ctypes and unmapped not in ctypes:
        raise ValueError(f"unmapped_class {unmapped!r} must be one of composition_classes {ctypes}")
    if table is not None and cols.get("cell_type") and ctypes:
        fine = table["cell_type"].reindex(obs.index)
        n_nomatch = int(fine.isna().sum())
        cmap = params.get("cell_type_map") or {}
        broad = fine.map(lambda v: cmap.get(v, v) if isinstance(v, str) else None)
        known = broad.isin(ctypes)
        n_unknown = int((~known & fine.notna()).sum())
        if n_nomatch:
            log.info("%s: %d of %d cells are not in the cell table -> %s", name, n_nomatch, len(obs), unmapped)
        if n_unknown:
            log.warning("%s: %d cells have cell types outside composition_classes -> %s: %s", name, n_unknown,
                        unmapped, fine[~known & fine.notna()].value_counts().head(20).to_dict())
        obs["cell_type"] = np.where(known, broad, unmapped)
    else:
        obs["cell_type"] = unmapped

    # region labels
    classes = list(params.get("annotation_classes") or [])
    default = params.get("unannotated_class", "NOANNOT")
    reg_path = resolve_file(params, sample, "regions")
    if reg_path is not None:
        polys = read_region_polygons(reg_path, params.get("region_property"))
        units = params.get("regions_units", "he_px")
        if units == "he_px":
            pts = xy_px
        elif units == "xenium_px":
            pts = _apply(_affine(cells_to_global), xy_um)
        elif units == "um":
            pts = xy_um
        else:
            raise ValueError(f"regions_units must be he_px, xenium_px or um, got {units!r}")
        raw = label_points(pts, polys, default)
    elif table is not None and cols.get("region"):
        raw = table["region"].reindex(obs.index).to_numpy(object)
    else:
        raise ValueError(
            f"sample {sample!r}: no region annotation: configure files.regions (GeoJSON) or a `region` column of the "
            "cell table (cell_table_columns.region); see docs/datasets.md for where the annotations come from"
        )
    if not classes:
        raise ValueError("dataset config: annotation_classes is required")
    obs["region"] = map_labels(raw, classes, default, params.get("label_aliases"), f"{name} regions")
    return SampleCells(counts=counts, obs=obs, image_path=image, um_per_px=um)


@functools.lru_cache(maxsize=2)
def _load_table(path: str, mtime: float) -> pd.DataFrame:
    """A whole cell table, cached: one table usually serves every sample of a dataset."""
    p = Path(path)
    return pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p, low_memory=False)


def _read_cell_table(path: Path, cols: Mapping[str, str | None], sample: str, key_format: str) -> pd.DataFrame:
    """The rows of the annotation table (``files.cell_table``) that belong to ``sample``, indexed by Xenium cell id.

    Columns renamed to ``cell_type``, ``region``, ``x_um``, ``y_um`` (those configured in ``cell_table_columns``).
    Ids that do not follow ``cell_key_format`` and duplicated ids are counted in the log and dropped.
    """
    df = _load_table(str(path.resolve()), path.stat().st_mtime)
    need = [v for v in cols.values() if v]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: cell_table_columns name columns {missing} that are missing; found "
                         f"{list(df.columns)[:30]}")
    if cols.get("sample"):
        n0 = len(df)
        df = df[df[cols["sample"]].astype(str) == sample]
        if df.empty:
            raise ValueError(f"{path}: no rows with {cols['sample']} == {sample!r}")
        log.info("%s: %d of %d cell-table rows belong to %s", path.name, len(df), n0, sample)
    out = pd.DataFrame(index=df[cols["cell_id"]].astype(str).to_numpy())
    for k in ("cell_type", "region", "x_um", "y_um"):
        if cols.get(k):
            out[k] = df[cols[k]].to_numpy()
    if key_format != "{cell_id}":
        # the table's id is e.g. "{sample}_{cell_id}"; turn it back into the bundle's cell id
        rx = re.escape(key_format).replace(re.escape("{sample}"), re.escape(sample)).replace(
            re.escape("{cell_id}"), "(?P<cid>.+)")
        m = out.index.str.extract(f"^{rx}$")["cid"]
        n_bad = int(m.isna().sum())
        if n_bad:
            log.warning("%s: %d cell ids do not follow cell_key_format %r and are ignored",
                        path.name, n_bad, key_format)
        out = out[m.notna().to_numpy()]
        out.index = m.dropna().to_numpy()
    if out.index.has_duplicates:
        n_dup = int(out.index.duplicated().sum())
        log.warning("%s: %d duplicated cell ids for %s; keeping the first", path.name, n_dup, sample)
        out = out[~out.index.duplicated()]
    return out


# --------------------------------------------------------------------------------------------------
# dataset


def build_dataset(params: Mapping, seed: int) -> tuple[ad.AnnData, ad.AnnData]:
    """Build the spots (patches) and cells AnnData of a Xenium dataset (``reader: xenium``).

    For every sample of :func:`~workflow_scripts.data.download.dataset_samples`: read the cells
    (:func:`read_sample`), tile them in the H&E frame (:func:`workflow_scripts.data.tiling.tile_cells`, keys
    ``patch_um``, ``stride_um``, ``min_cells_per_patch``, ``max_cells_per_patch``), and aggregate.

    Returns
    -------
    spots : AnnData, patches × genes, ``X`` = summed raw counts of the patch's kept cells (CSR float32);
        obs ``slide``, ``donor``, ``x_um``/``y_um`` (patch centre, µm in the H&E frame = px × µm/px),
        ``px_x``/``px_y`` (H&E level-0 px), ``split``, ``region`` (majority label; categories =
        ``annotation_classes``), ``region_frac``, ``n_cells`` (kept), ``n_cells_inside`` (before the cap),
        ``tile_x``/``tile_y``; ``obsm['composition']`` (cell-type fractions without the unmapped class,
        rows sum to 1 or are all-zero) + ``uns['composition_names']`` when ``composition_classes`` is set;
        ``uns['slides']`` {slide: {image_path, um_per_px}} (level 0 of the H&E); ``uns['patch_um']``.
    cells : AnnData, one row per (cell, patch) pair (a cell in k overlapping patches appears k times;
        ``cell_id`` identifies duplicates), raw counts, obs ``spot_id``, ``cell_id``, ``slide``, ``x_px``,
        ``y_px``, ``x_um``, ``y_um`` (Xenium µm), ``cell_type``, ``region``.
    Genes: intersection over samples (``gene_join: inner``, default) or union (``outer``, zero-filled); the
    genes dropped per sample are logged. Raises ValueError/FileNotFoundError for bad config or missing files.
    """
    samples = dataset_samples(params)
    if not samples:
        raise ValueError("dataset config lists no samples (samples / splits + build_splits)")
    patch = float(params["patch_um"])
    stride = float(params.get("stride_um", patch))
    min_cells = int(params.get("min_cells_per_patch", 1))
    max_cells = params.get("max_cells_per_patch", 200)
    max_cells = None if max_cells in (None, 0) else int(max_cells)
    classes = list(params["annotation_classes"])
    ctypes = list(params.get("composition_classes") or [])
    unmapped = params.get("unmapped_class", "NOMAP")
    donors = params.get("donors") or {}
    rng = np.random.default_rng(seed)

    reads: list[tuple[str, SampleCells]] = []
    for s in tqdm(samples, desc="Xenium samples", unit="sample"):
        reads.append((s, read_sample(params, s)))
    genes = common_genes([r.counts for _, r in reads], samples, params.get("gene_join", "inner"))

    spot_parts, cell_parts = [], []
    slides: dict[str, dict] = {}
    for s, r in reads:
        counts = align_genes(r.counts, genes)
        obs = r.obs
        he_um = obs[["x_px", "y_px"]].to_numpy() * r.um_per_px
        tiles = tiling.tile_cells(he_um, patch, stride, min_cells, max_cells, rng, name=s)
        if tiles.member.shape[0] == 0:
            log.warning("%s: no patch with >= %d cells; sample skipped", s, min_cells)
            continue
        ids = np.array([f"{s}_{kx}_{ky}" for kx, ky in tiles.kxy])
        X = sp.csr_matrix(tiles.member @ counts.X, dtype=np.float32)
        lab, frac = tiling.majority_label(tiles.member, obs["region"].to_numpy(int), len(classes))
        so = pd.DataFrame(index=ids)
        so["slide"] = s
        so["donor"] = str(donors.get(s, s))
        so["x_um"], so["y_um"] = tiles.centre[:, 0], tiles.centre[:, 1]
        so["px_x"], so["px_y"] = tiles.centre[:, 0] / r.um_per_px, tiles.centre[:, 1] / r.um_per_px
        so["split"] = sample_split(params, s)
        so["region"] = np.asarray(classes, dtype=object)[lab]
        so["region_frac"] = frac
        so["n_cells"] = np.asarray(tiles.member.sum(axis=1)).ravel().astype(int)
        so["n_cells_inside"] = tiles.n_inside.astype(int)
        so["tile_x"], so["tile_y"] = tiles.kxy[:, 0], tiles.kxy[:, 1]
        sa = ad.AnnData(X=X, obs=so, var=counts.var.copy())
        if ctypes:
            codes = pd.Categorical(obs["cell_type"], categories=ctypes).codes
            sa.obsm["composition"] = tiling.composition(tiles.member, codes, len(ctypes), ctypes.index(unmapped))
        spot_parts.append(sa)
        # cells: one row per (cell, patch) pair
        coo = tiles.member.tocoo()
        order = np.lexsort((coo.col, coo.row))
        prow, pcell = coo.row[order], coo.col[order]
        co = obs.iloc[pcell]
        cobs = pd.DataFrame({
            "spot_id": ids[prow], "cell_id": co.index.to_numpy(str), "slide": s,
            "x_px": co["x_px"].to_numpy(), "y_px": co["y_px"].to_numpy(),
            "x_um": co["x_um"].to_numpy(), "y_um": co["y_um"].to_numpy(),
            "cell_type": co["cell_type"].to_numpy(object),
            "region": np.asarray(classes, dtype=object)[co["region"].to_numpy(int)],
        })
        cobs.index = cobs["spot_id"] + "|" + cobs["cell_id"]
        cell_parts.append(ad.AnnData(X=counts.X[pcell], obs=cobs, var=counts.var.copy()))
        slides[s] = {"image_path": str(r.image_path), "um_per_px": float(r.um_per_px)}
        log.info("%s: %d patches, %d (cell, patch) rows, median %d cells per patch", s, len(ids), len(cobs),
                 int(np.median(so["n_cells"])))
    if not spot_parts:
        raise ValueError("no sample produced any patch; lower min_cells_per_patch or check the inputs")
    spots = ad.concat(spot_parts, join="outer", merge="first")
    cells = ad.concat(cell_parts, join="outer", merge="first")
    spots.X = sp.csr_matrix(spots.X, dtype=np.float32)
    cells.X = sp.csr_matrix(cells.X, dtype=np.float32)
    for c in ("slide", "donor", "split"):
        spots.obs[c] = spots.obs[c].astype("category")
    spots.obs["region"] = pd.Categorical(spots.obs["region"], categories=classes)
    for c in ("slide", "cell_type", "region"):
        cells.obs[c] = cells.obs[c].astype("category")
    if ctypes:
        spots.uns["composition_names"] = [c for c in ctypes if c != unmapped]
    spots.uns["slides"] = slides
    spots.uns["patch_um"] = patch
    if params.get("name"):
        spots.uns["dataset"] = str(params["name"])
    excluded = [classes[i] for i in params.get("excluded_classes", []) or []]
    spots.uns["excluded_classes"] = excluded
    counts_by_label = spots.obs["region"].value_counts()
    log.info("patches per region label: %s (excluded from probes later: %s)",
             counts_by_label[counts_by_label > 0].to_dict(), excluded)
    validate_spots(spots, source=f"xenium dataset {params.get('name', '')}".strip())
    return spots, cells
