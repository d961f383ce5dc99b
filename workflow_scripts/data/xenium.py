"""Reader for 10x Xenium data paired with H&E (the paper's lung and breast datasets).

Sources (docs/datasets.md, docs/reference.md#datasets):

* lung — Vannan et al. 2025, GEO GSE250346: per sample a Xenium transcripts table and an author-registered
  H&E TIFF in the Xenium coordinate space (no affine needed), cell annotations of the Seurat object, and
  H&E region annotations;
* breast — 10x public datasets (Janesick et al. 2023 and TENX94–99): the Xenium ``outs`` bundle
  (``cell_feature_matrix.h5``, ``cells.parquet``, ``experiment.xenium``), the H&E OME-TIFF and the
  H&E → Xenium alignment CSV.

Coordinate frames
-----------------
* Xenium µm: ``cells.parquet`` ``x_centroid``/``y_centroid``, transcripts ``x_location``/``y_location``.
* Xenium pixels: µm / ``pixel_size`` (``experiment.xenium``; 0.2125 µm/px on every Xenium instrument).
* H&E pixels: level 0 of the H&E image. The 10x alignment CSV (3 × 3, no header) maps **H&E pixels to
  Xenium pixels**: ``[x_x, y_x, 1]ᵀ = A · [x_he, y_he, 1]ᵀ`` (10x knowledge base "How can I convert coordinates
  between H&E image and Xenium data"; spatialdata-io ``xenium_aligned_image`` uses it as the image → global
  affine). A cell therefore lands at ``A⁻¹ · [x_µm / pixel_size, y_µm / pixel_size, 1]ᵀ``.
  The H&E resolution follows from the same matrix: ``µm/px(H&E) = pixel_size · sqrt(|det A[:2, :2]|)``.
* Without an alignment file (the GEO lung images, already registered), H&E px = Xenium µm / µm/px(H&E),
  with µm/px(H&E) from the config (``um_per_px``) or the TIFF resolution tags.

Patches are built by :mod:`workflow_scripts.data.tiling` in the H&E frame (H&E px × µm/px), so each patch is
exactly the axis-aligned square that :mod:`workflow_scripts.data.patches` cuts from the image.

Dataset config keys are listed in ``docs/datasets.md`` ("Dataset keys"); :func:`build_dataset` is the
entry point used by ``workflow_scripts/data/prepare.py`` for ``reader: xenium``.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

from . import tiling
from .download import dataset_samples
from .model import validate_spots

log = logging.getLogger(__name__)

DEFAULT_XENIUM_PX_UM = 0.2125
CONTROL_PREFIXES = (
    "NegControlProbe_", "NegControlCodeword_", "BLANK_", "antisense_", "UnassignedCodeword_",
    "DeprecatedCodeword_", "Intergenic_", "GenomicControlProbe_",
)
FILE_KEYS = ("matrix", "transcripts", "cells", "experiment", "image", "alignment", "cell_table", "regions")


# --------------------------------------------------------------------------------------------------
# small readers


def read_cell_feature_matrix(path: str | Path) -> ad.AnnData:
    """Read a 10x HDF5 feature-barcode matrix (``cell_feature_matrix.h5``) with :func:`scanpy.read_10x_h5`.

    Returns cells × genes raw counts (CSR float32), ``var_names`` = gene symbols (made unique),
    ``var['gene_ids']`` = Ensembl ids. Only ``feature_type == 'Gene Expression'`` is kept; the control
    features dropped are counted per type in the log. Raises FileNotFoundError naming the path.
    """
    import scanpy as sc

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Xenium cell-feature matrix not found: {path}")
    a = sc.read_10x_h5(path, gex_only=False)
    ftype = a.var["feature_types"].astype(str)
    drop = ftype != "Gene Expression"
    if drop.any():
        log.info("%s: dropped %d non-gene features %s", path.name, int(drop.sum()),
                 ftype[drop].value_counts().to_dict())
    a = a[:, ~drop.to_numpy()].copy()
    a.var_names_make_unique()
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    a.obs_names = a.obs_names.astype(str)
    return a


def read_cells_table(path: str | Path) -> pd.DataFrame:
    """Read Xenium ``cells.parquet`` / ``cells.csv(.gz)``: index ``cell_id`` (str), columns ``x_um``, ``y_um``.

    Raises FileNotFoundError or ValueError (naming the file and the columns found) when the centroid columns
    ``x_centroid``/``y_centroid`` are missing.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Xenium cells table not found: {path}")
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    need = {"cell_id", "x_centroid", "y_centroid"}
    if not need <= set(df.columns):
        raise ValueError(f"{path}: needs columns {sorted(need)}, found {list(df.columns)[:20]}")
    ids = df["cell_id"]
    if ids.map(type).eq(bytes).any():
        ids = ids.map(lambda v: v.decode() if isinstance(v, bytes) else v)
    out = pd.DataFrame({"x_um": df["x_centroid"].to_numpy(float), "y_um": df["y_centroid"].to_numpy(float)},
                       index=pd.Index(ids.astype(str), name="cell_id"))
    return out


def read_experiment_pixel_size(path: str | Path) -> float:
    """``pixel_size`` (µm per Xenium morphology pixel) from ``experiment.xenium`` (JSON). Raises KeyError if absent."""
    with open(path) as fh:
        spec = json.load(fh)
    if "pixel_size" not in spec:
        raise KeyError(f"{path}: no 'pixel_size' key (found {list(spec)[:15]})")
    return float(spec["pixel_size"])


def read_alignment(path: str | Path) -> np.ndarray:
    """Read a 3 × 3 affine alignment CSV as written by 10x / Xenium Explorer (comma-separated, no header).

    A header row or extra whitespace is tolerated. Returns a float (3, 3) array. Raises ValueError naming the
    file when it is not 3 × 3 numbers with last row ``0, 0, 1``, or when it is singular.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"H&E alignment CSV not found: {path}")
    rows = []
    for line in path.read_text().splitlines():
        parts = [p for p in re.split(r"[,\s;]+", line.strip()) if p]
        if not parts:
            continue
        try:
            rows.append([float(p) for p in parts])
        except ValueError:
            if rows:
                raise ValueError(f"{path}: non-numeric row after the matrix: {line!r}") from None
            continue  # header
    A = np.asarray(rows, dtype=float)
    if A.shape != (3, 3) or not np.allclose(A[2], [0, 0, 1], atol=1e-6):
        raise ValueError(f"{path}: expected a 3x3 affine matrix with last row 0,0,1, got {A.tolist()}")
    if abs(np.linalg.det(A[:2, :2])) < 1e-12:
        raise ValueError(f"{path}: alignment matrix is singular")
    return A


def apply_affine(A: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a 3 × 3 affine to points ``xy`` (n, 2) → (n, 2)."""
    xy = np.asarray(xy, dtype=float)
    return xy @ A[:2, :2].T + A[:2, 2]


def he_px_from_xenium_um(xy_um: np.ndarray, he_to_xenium_px: np.ndarray, xenium_px_um: float) -> np.ndarray:
    """Xenium µm (n, 2) → H&E level-0 pixels (n, 2): ``A⁻¹ · (xy_um / pixel_size)`` (see module docstring)."""
    return apply_affine(np.linalg.inv(he_to_xenium_px), np.asarray(xy_um, dtype=float) / xenium_px_um)


def he_um_per_px(he_to_xenium_px: np.ndarray, xenium_px_um: float, name: str = "") -> float:
    """µm per H&E pixel implied by the alignment: ``pixel_size · sqrt(|det A[:2,:2]|)``.

    Logs a warning when the linear part is anisotropic by more than 2 % (then patches are not exactly square).
    """
    L = he_to_xenium_px[:2, :2]
    s = np.linalg.svd(L, compute_uv=False)
    if s[0] / s[1] > 1.02:
        log.warning("%s: alignment scales x and y differently (singular values %.4f, %.4f)", name, s[0], s[1])
    return float(xenium_px_um * np.sqrt(abs(np.linalg.det(L))))


def tiff_um_per_px(path: str | Path) -> float | None:
    """Resolution of a TIFF's first page in µm/px from OME ``PhysicalSizeX`` or TIFF resolution tags, else None."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        if tf.ome_metadata:
            m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tf.ome_metadata)
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tf.ome_metadata)
            if m and (unit is None or unit.group(1) in ("µm", "um", "\u00b5m", "micron")):
                return float(m.group(1))
        page = tf.pages[0]
        tags = page.tags
        if "XResolution" not in tags:
            return None
        num, den = tags["XResolution"].value
        if not num:
            return None
        per_unit = num / den  # pixels per unit
        unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
        ij_unit = (tf.imagej_metadata or {}).get("unit") if tf.is_imagej else None
        if ij_unit in ("micron", "microns", "um", "\u00b5m"):
            return 1.0 / per_unit
        if unit == 3:  # centimetre
            return 1e4 / per_unit
        if unit == 2 and per_unit > 1000:  # inch, only when plausible for a microscope
            return 25400.0 / per_unit
    return None


def image_shape(path: str | Path) -> tuple[int, int]:
    """(height, width) of level 0 of a TIFF/OME-TIFF (metadata only) or a Pillow image; planar RGB handled."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tf:
            s = tf.series[0]
            axes, shape = s.axes, s.shape
        return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        return im.height, im.width


def _decode(v):
    return v.decode() if isinstance(v, bytes) else v


def counts_from_transcripts(
    path: str | Path, min_qv: float = 20.0, chunksize: int = 2_000_000
) -> tuple[ad.AnnData, pd.DataFrame]:
    """Cell × gene counts and transcript-mean centroids from a Xenium transcripts table (csv(.gz) or parquet).

    Keeps transcripts with ``qv >= min_qv`` (10x's own matrix uses Q20) that are assigned to a cell
    (``cell_id`` not ``UNASSIGNED``/-1/empty) and are not control features (names starting with
    :data:`CONTROL_PREFIXES`). Read in chunks; the whole table is never in memory.
    Returns ``(counts AnnData cells × genes, centroids DataFrame[x_um, y_um] indexed by cell_id)``; the
    centroids (mean transcript position) are only an approximation of the segmented cell centroid.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Xenium transcripts table not found: {path}")
    cols = ["cell_id", "feature_name", "qv", "x_location", "y_location"]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        chunks = (b.to_pandas() for b in pf.iter_batches(batch_size=chunksize, columns=cols))
        n_total = pf.metadata.num_rows
    else:
        chunks = pd.read_csv(path, usecols=cols, chunksize=chunksize)
        n_total = None
    parts, cents = [], []
    n_read = n_qv = n_ctrl = n_unassigned = 0
    for df in tqdm(chunks, desc=f"transcripts {path.name}", unit="chunk", total=None if n_total is None
                   else int(np.ceil(n_total / chunksize)), mininterval=5.0):
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
    cells = counts.index.get_level_values(0)
    genes = counts.index.get_level_values(1)
    cell_codes, cell_names = pd.factorize(cells, sort=True)
    gene_codes, gene_names = pd.factorize(genes, sort=True)
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
# region annotations


@dataclass
class RegionPolygon:
    """One annotated polygon: ``label`` (raw text), ``exterior`` (k, 2) and ``holes`` [(k_i, 2)], same units."""

    label: str
    exterior: np.ndarray
    holes: list

    @property
    def area(self) -> float:
        def shoelace(p):
            x, y = p[:, 0], p[:, 1]
            return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))

        return shoelace(self.exterior) - sum(shoelace(h) for h in self.holes)


def _get_dotted(d: Mapping, key: str):
    cur: Any = d
    for part in key.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def read_region_polygons(path: str | Path, label_property: str | None = None) -> list[RegionPolygon]:
    """Read annotated polygons from GeoJSON (QuPath / napari / shapely exports).

    Accepts a FeatureCollection, a list of Features or one Feature; Polygon and MultiPolygon geometries.
    The label is ``properties[label_property]`` (dotted path, e.g. ``classification.name``) or, by default,
    the first of ``classification.name``, ``classification``, ``name``, ``label``, ``annotation``, ``class``.
    Features without a label or with other geometry types are skipped and counted in the log.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"region annotation file not found: {path}")
    data = json.loads(path.read_text())
    feats = data.get("features", [data]) if isinstance(data, dict) else data
    keys = [label_property] if label_property else ["classification.name", "classification", "name", "label",
                                                    "annotation", "class"]
    out: list[RegionPolygon] = []
    n_nolabel = n_geom = 0
    for f in feats:
        props = f.get("properties") or {}
        label = None
        for k in keys:
            v = _get_dotted(props, k)
            if isinstance(v, str) and v.strip():
                label = v.strip()
                break
        geom = f.get("geometry") or {}
        gtype = geom.get("type")
        if label is None:
            n_nolabel += 1
            continue
        if gtype == "Polygon":
            polys = [geom["coordinates"]]
        elif gtype == "MultiPolygon":
            polys = geom["coordinates"]
        else:
            n_geom += 1
            continue
        for rings in polys:
            ext = np.asarray(rings[0], dtype=float)[:, :2]
            holes = [np.asarray(r, dtype=float)[:, :2] for r in rings[1:]]
            out.append(RegionPolygon(label, ext, holes))
    if n_nolabel or n_geom:
        log.warning("%s: skipped %d features without a label (tried %s) and %d non-polygon features",
                    path.name, n_nolabel, keys, n_geom)
    log.info("%s: %d labelled polygons, labels %s", path.name, len(out), sorted({p.label for p in out}))
    return out


def label_points(xy: np.ndarray, polygons: Sequence[RegionPolygon], default: str) -> np.ndarray:
    """Region label of each point (n, 2): the smallest polygon containing it (holes excluded), else ``default``.

    Nested annotations (e.g. a TLS inside a fibrotic area) thus give the more specific label. Uses
    :class:`matplotlib.path.Path` point-in-polygon with a bounding-box pre-filter.
    """
    from matplotlib.path import Path as MplPath

    xy = np.asarray(xy, dtype=float)
    labels = np.full(len(xy), default, dtype=object)
    for poly in sorted(polygons, key=lambda p: -p.area):
        lo, hi = poly.exterior.min(axis=0), poly.exterior.max(axis=0)
        cand = np.flatnonzero(((xy >= lo) & (xy <= hi)).all(axis=1))
        if not len(cand):
            continue
        inside = MplPath(poly.exterior).contains_points(xy[cand])
        for h in poly.holes:
            inside &= ~MplPath(h).contains_points(xy[cand])
        labels[cand[inside]] = poly.label
    return labels


def normalise_label(s: str) -> str:
    """Canonical form for matching label spellings: case-folded, ``_``/``-`` → space, single spaces."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]+", " ", str(s))).strip().casefold()


def map_labels(raw: np.ndarray, classes: Sequence[str], default: str, aliases: Mapping[str, str] | None,
               what: str) -> np.ndarray:
    """Map raw label strings onto ``classes`` (spelling-insensitive, plus ``aliases`` raw → class).

    Unknown labels become ``default`` and are counted in a warning (never silently). Returns codes
    (indices into ``classes``). Raises ValueError when ``default`` or an alias target is not a class.
    """
    lookup = {normalise_label(c): i for i, c in enumerate(classes)}
    if normalise_label(default) not in lookup:
        raise ValueError(f"{what}: default class {default!r} is not in the class list {list(classes)}")
    for k, v in (aliases or {}).items():
        if normalise_label(v) not in lookup:
            raise ValueError(f"{what}: alias {k!r} -> {v!r} names no class of {list(classes)}")
        lookup[normalise_label(k)] = lookup[normalise_label(v)]
    raw_s = pd.Series(raw, dtype=object).fillna(default).astype(str)
    norm = raw_s.map(normalise_label)
    codes = norm.map(lookup)
    unknown = codes.isna()
    if unknown.any():
        log.warning("%s: %d cells carry labels that match no class and are set to %r: %s", what,
                    int(unknown.sum()), default, raw_s[unknown].value_counts().head(20).to_dict())
        codes[unknown] = lookup[normalise_label(default)]
    return codes.to_numpy(int)


# --------------------------------------------------------------------------------------------------
# one sample


def file_template(params: Mapping, sample: str, key: str) -> str | None:
    """Path of input ``key`` for ``sample`` (``files`` / ``sample_files`` template under ``raw_dir``), or None.

    ``{sample}`` is replaced; the result may still hold glob characters.
    """
    per = (params.get("sample_files") or {}).get(sample) or {}
    tmpl = per.get(key, (params.get("files") or {}).get(key))
    if tmpl in (None, ""):
        return None
    return str(Path(params.get("raw_dir", ".")) / str(tmpl).format(sample=sample))


def _resolve(params: Mapping, sample: str, key: str, required: bool = False) -> Path | None:
    """The file configured as ``files.<key>`` for ``sample``; None when not configured.

    Every configured file must exist (a glob must match exactly one file): FileNotFoundError names the path and
    the fix. ``required`` raises ValueError when the key is not configured at all.
    """
    pattern = file_template(params, sample, key)
    if pattern is None:
        if required:
            raise ValueError(f"dataset config: files.{key} is required (sample {sample!r})")
        return None
    if any(ch in pattern for ch in "*?["):
        hits = sorted(glob.glob(pattern))
        if len(hits) != 1:
            raise FileNotFoundError(
                f"sample {sample!r}: files.{key} pattern {pattern} matches {len(hits)} files {hits[:5]}; "
                "it must match exactly one (run the download rule, or fix the pattern in the config)"
            )
        return Path(hits[0])
    p = Path(pattern)
    if not p.exists():
        raise FileNotFoundError(
            f"sample {sample!r}: files.{key} not found at {p}. Run `snakemake download_<dataset>` or place the "
            "file there (see docs/datasets.md); set files." + key + " to null if this input is not used."
        )
    return p


def input_files(params: Mapping) -> list[str]:
    """Every raw file ``prepare`` reads for this dataset (configured ``files.*`` of the built samples).

    Used by the workflow so that Snakemake names missing inputs before the job starts. Glob templates are
    listed as their single match when there is one, else as the pattern (which Snakemake then reports missing).
    """
    out: list[str] = []
    for s in dataset_samples(params):
        for key in FILE_KEYS:
            pattern = file_template(params, s, key)
            if pattern is None:
                continue
            if any(ch in pattern for ch in "*?["):
                hits = sorted(glob.glob(pattern))
                pattern = hits[0] if len(hits) == 1 else pattern
            if pattern not in out:
                out.append(pattern)
    return out


def _per_sample(value, sample: str):
    return value.get(sample) if isinstance(value, Mapping) else value


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

    Counts come from ``files.matrix`` (10x HDF5) or, if that is absent, ``files.transcripts``. Centroids come
    from ``files.cells``, else the cell table's ``x_um``/``y_um`` columns, else the transcript means.
    Cell types come from ``files.cell_table`` (mapped with ``cell_type_map`` to ``composition_classes``;
    unmatched cells → ``unmapped_class``). Region labels come from ``files.regions`` (GeoJSON) or the cell
    table's ``region`` column; cells outside every polygon → ``unannotated_class``.
    Every configured ``files.*`` entry must exist. Raises FileNotFoundError/ValueError naming the missing file
    or key.
    """
    name = sample
    matrix = _resolve(params, sample, "matrix")
    transcripts = _resolve(params, sample, "transcripts")
    if matrix is None and transcripts is None:
        raise ValueError("dataset config: set files.matrix (cell_feature_matrix.h5) or files.transcripts")
    tx_cent = None
    if matrix is not None:
        counts = read_cell_feature_matrix(matrix)
    else:
        counts, tx_cent = counts_from_transcripts(transcripts, float(params.get("min_qv", 20)))

    # cell table (annotations, optionally coordinates)
    table = None
    ct_path = _resolve(params, sample, "cell_table")
    cols = {"cell_id": "cell_id", "sample": None, "cell_type": None, "region": None, "x_um": None, "y_um": None}
    cols.update(params.get("cell_table_columns") or {})
    if ct_path is not None:
        table = _read_cell_table(ct_path, cols, sample, params.get("cell_key_format", "{cell_id}"))

    # centroids
    cells_path = _resolve(params, sample, "cells")
    if cells_path is not None:
        cent = read_cells_table(cells_path)
    elif table is not None and cols.get("x_um") and cols.get("y_um"):
        cent = table[["x_um", "y_um"]].astype(float)
        if tx_cent is not None:  # cells absent from the table (e.g. removed by the authors' QC) keep a position
            extra = tx_cent.index.difference(cent.index)
            if len(extra):
                log.info("%s: %d cells are not in the cell table; their centroid is the mean transcript position",
                         name, len(extra))
                cent = pd.concat([cent, tx_cent.loc[extra]])
    elif tx_cent is not None:
        log.warning("%s: no cells table; using mean transcript positions as cell centroids", name)
        cent = tx_cent
    else:
        raise FileNotFoundError(f"sample {sample!r}: no cell centroids (files.cells or cell table x_um/y_um)")
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
    image = _resolve(params, sample, "image", True)
    px_um = float(_per_sample(params.get("xenium_px_um"), sample) or DEFAULT_XENIUM_PX_UM)
    exp = _resolve(params, sample, "experiment")
    if exp is not None:
        px_um = read_experiment_pixel_size(exp)
    align_path = _resolve(params, sample, "alignment")
    conf_um = _per_sample(params.get("um_per_px"), sample)
    if align_path is not None:
        A = read_alignment(align_path)
        direction = params.get("alignment_direction", "he_to_xenium")
        if direction == "xenium_to_he":
            A = np.linalg.inv(A)
        elif direction != "he_to_xenium":
            raise ValueError(f"alignment_direction must be he_to_xenium or xenium_to_he, got {direction!r}")
        if params.get("alignment_target_units", "px") == "um":  # matrix maps H&E px to Xenium µm
            A = np.diag([1 / px_um, 1 / px_um, 1.0]) @ A
        xy_px = he_px_from_xenium_um(obs[["x_um", "y_um"]].to_numpy(), A, px_um)
        um = he_um_per_px(A, px_um, name)
        if conf_um and abs(float(conf_um) - um) / um > 0.02:
            log.warning("%s: configured um_per_px %.5f differs from the alignment's %.5f; using the alignment",
                        name, float(conf_um), um)
    else:
        tag_um = tiff_um_per_px(image)
        if conf_um and tag_um and abs(float(conf_um) - tag_um) / tag_um > 0.02:
            log.warning("%s: configured um_per_px %.5f differs from the TIFF resolution tags (%.5f); using the config",
                        name, float(conf_um), tag_um)
        um = float(conf_um) if conf_um else tag_um
        if not um:
            raise ValueError(
                f"sample {sample!r}: no alignment file and no resolution for {image}; set `um_per_px` for the "
                "dataset (µm per H&E pixel) or provide files.alignment"
            )
        xy_px = obs[["x_um", "y_um"]].to_numpy() / um
    obs["x_px"], obs["y_px"] = xy_px[:, 0], xy_px[:, 1]
    h, w = image_shape(image)
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
    reg_path = _resolve(params, sample, "regions")
    if reg_path is not None:
        polys = read_region_polygons(reg_path, params.get("region_property"))
        units = params.get("regions_units", "he_px")
        if units == "he_px":
            pts = xy_px
        elif units == "xenium_px":
            pts = obs[["x_um", "y_um"]].to_numpy() / px_um
        elif units == "um":
            pts = obs[["x_um", "y_um"]].to_numpy()
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


def sample_split(params: Mapping, sample: str) -> str:
    """Name of the split (``params['splits']``) that lists ``sample``; ValueError if none does."""
    for split, members in (params.get("splits") or {}).items():
        if sample in [str(m) for m in members]:
            return str(split)
    raise ValueError(f"sample {sample!r} is in no split of {list((params.get('splits') or {}))}")


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
        ``uns['slides']`` {slide: {image_path, um_per_px}} (level 0 of the H&E).
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
    genes = _common_genes([r.counts for _, r in reads], samples, params.get("gene_join", "inner"))

    spot_parts, cell_parts = [], []
    slides: dict[str, dict] = {}
    for s, r in reads:
        counts = _align_genes(r.counts, genes)
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
    if params.get("name"):
        spots.uns["dataset"] = str(params["name"])
    excluded = [classes[i] for i in params.get("excluded_classes", []) or []]
    spots.uns["excluded_classes"] = excluded
    counts_by_label = spots.obs["region"].value_counts()
    log.info("patches per region label: %s (excluded from probes later: %s)",
             counts_by_label[counts_by_label > 0].to_dict(), excluded)
    validate_spots(spots, source=f"xenium dataset {params.get('name', '')}".strip())
    return spots, cells


def _common_genes(parts: Sequence[ad.AnnData], samples: Sequence[str], how: str) -> list[str]:
    if how not in ("inner", "outer"):
        raise ValueError(f"gene_join must be inner or outer, got {how!r}")
    genes = list(parts[0].var_names)
    for p in parts[1:]:
        names = set(p.var_names)
        if how == "inner":
            genes = [g for g in genes if g in names]
        else:
            genes += [g for g in p.var_names if g not in set(genes)]
    for s, p in zip(samples, parts):
        n_drop = len(set(p.var_names) - set(genes))
        if n_drop:
            log.info("%s: %d of %d genes are not shared by all samples and are dropped", s, n_drop, p.n_vars)
    if not genes:
        raise ValueError(f"samples {list(samples)} share no gene")
    return genes


def _align_genes(a: ad.AnnData, genes: Sequence[str]) -> ad.AnnData:
    idx = a.var_names.get_indexer(genes)
    X = sp.csr_matrix(a.X)
    if (idx < 0).any():  # outer join: zero columns for absent genes
        X = sp.hstack([X, sp.csr_matrix((a.n_obs, 1), dtype=np.float32)]).tocsr()
        idx = np.where(idx < 0, X.shape[1] - 1, idx)
    var = a.var.reindex(genes)
    return ad.AnnData(X=X[:, idx], obs=a.obs[[]].copy(), var=var)
