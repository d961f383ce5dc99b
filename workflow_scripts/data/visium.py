"""Reader for 10x Visium data paired with H&E (the paper's thymus dataset): one patch per spot.

Source (docs/datasets.md, docs/reference.md#datasets): Yayon et al. 2024 human thymus atlas — full-resolution
H&E OME-TIFFs in BioImage Archive S-BIAD1257 (0.2271 µm/px) and the annotated Visium objects of CELLxGENE
collection fc19ae6c-d7c1-4dce-b703-62c5d52061b4; label = the 11 cortico-medullary classes.

Two input layouts are read, per sample:

* Space Ranger ``outs/`` (``files.outs``), read with :func:`spatialdata_io.visium`: the counts
  (``filtered_feature_bc_matrix.h5``), the spot positions (``spatial/tissue_positions.csv`` or
  ``tissue_positions_list.csv``) as circles in full-resolution pixels, the scale factors as the
  transformations of the ``hires``/``lowres`` images; labels from a CSV (``files.labels``: barcode +
  ``label_col``).
* an AnnData ``.h5ad`` (``files.h5ad``; CELLxGENE layout, which no spatialdata-io reader covers): raw counts in
  ``raw.X`` (else ``X``), full-resolution spot centres in ``obsm['spatial']`` (x = column, y = row), scale
  factors in ``uns['spatial'][library]['scalefactors']`` (squidpy's layout), labels in ``obs[label_col]``;
  several sections in one file are selected with ``h5ad_sample_col``.

Coordinates: ``px`` = full-resolution pixel × image scale (1 for the full-resolution H&E, the hires or lowres
scale factor for ``image: hires|lowres``). µm per full-resolution pixel = ``um_per_px`` from the config when
given, else ``spot_diameter_um`` / ``spot_diameter_fullres`` with ``spot_diameter_um`` = 65 µm: Space Ranger's
``spot_diameter_fullres`` spans a *theoretical 65 µm spot* (10x scale-factor documentation), not the 55 µm
physical spot. With 55 µm the spot centres of the scanpy fixture come out 84.9 µm apart instead of Visium's
100 µm (tests/test_visium.py). Either way the estimate is checked against the array grid (neighbouring spot
centres are 100 µm apart) and a > 5 % disagreement is logged. ``x_um = pxl_col_in_fullres · µm/px``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

from ..io import lazy_module
from .download import dataset_samples
from .model import validate_spots
from .patches import open_slide
from .reader_common import (align_genes, common_genes, file_template, map_labels, per_sample, resolve_file,
                            sample_split)

ad = lazy_module("anndata")  # imported on first use: readers are imported while the DAG is planned
log = logging.getLogger(__name__)

SCALEFACTOR_SPOT_UM = 65.0  # the spot that spot_diameter_fullres spans (10x); physical spots are 55 µm
VISIUM_SPOT_UM = 55.0  # physical spot diameter, drawn as the spot circles of the SpatialData output
VISIUM_SPOT_PITCH_UM = 100.0  # centre-to-centre distance of neighbouring Visium spots


def read_spaceranger(outs: str | Path, sample: str) -> tuple[ad.AnnData, dict]:
    """Read a Space Ranger ``outs`` folder with :func:`spatialdata_io.visium` → (in-tissue spots, scale factors).

    Returns
    -------
    counts : AnnData spots × genes, raw counts; obs ``in_tissue``, ``array_row``, ``array_col``,
        ``pxl_col_in_fullres``, ``pxl_row_in_fullres`` (spot centre, full-resolution px).
    scalefactors : ``spot_diameter_fullres`` (px, the spot circles' diameter) and ``tissue_{hires,lowres}_scalef``
        (full-resolution px → image px, from the images' transformations) where the image exists.
    Barcodes of the matrix without a position, and spots outside tissue, are dropped with a log line.
    Raises FileNotFoundError naming the missing file.
    """
    import spatialdata_io
    from spatialdata.transformations import get_transformation

    outs = Path(outs)
    h5 = outs / "filtered_feature_bc_matrix.h5"
    if not h5.exists():
        raise FileNotFoundError(f"{h5} not found (Space Ranger outs folder expected at {outs})")
    if not (outs / "spatial" / "scalefactors_json.json").exists():
        raise FileNotFoundError(f"{outs / 'spatial' / 'scalefactors_json.json'} not found (Space Ranger outs)")
    sdata = spatialdata_io.visium(outs, dataset_id=sample)
    table = sdata.tables["table"]
    a = ad.AnnData(X=sp.csr_matrix(table.X, dtype=np.float32), var=table.var.copy(),
                   obs=table.obs[["in_tissue", "array_row", "array_col"]].copy())
    a.obs_names = table.obs_names.astype(str)
    xy = np.asarray(table.obsm["spatial"], dtype=float)
    a.obs["pxl_col_in_fullres"], a.obs["pxl_row_in_fullres"] = xy[:, 0], xy[:, 1]
    nopos = ~np.isfinite(xy).all(axis=1) | a.obs["in_tissue"].isna().to_numpy()
    if nopos.any():
        log.warning("%s: %d barcodes have no spot position and are dropped", outs, int(nopos.sum()))
        a = a[~nopos].copy()
    off = a.obs["in_tissue"].to_numpy(int) == 0
    if off.any():
        log.info("%s: %d spots outside tissue dropped", outs, int(off.sum()))
        a = a[~off].copy()
    sf = {"spot_diameter_fullres": 2.0 * float(sdata.shapes[sample]["radius"].iloc[0])}
    for res in ("hires", "lowres"):
        key = f"{sample}_{res}_image"
        if key in sdata.images:  # the image maps to full resolution by Scale(1 / scalef)
            full = get_transformation(sdata.images[key], sample).to_affine_matrix(("x", "y"), ("x", "y"))
            sf[f"tissue_{res}_scalef"] = 1.0 / float(full[0, 0])
    return a, sf


def read_h5ad_sample(
    path: str | Path, sample: str, sample_col: str | None, library_id: str | None
) -> tuple[ad.AnnData, dict]:
    """Read one section of a Visium ``.h5ad`` (CELLxGENE layout, see module docstring) → (counts, scalefactors).

    obs gains ``pxl_col_in_fullres``/``pxl_row_in_fullres`` from ``obsm['spatial']``. Counts come from ``raw.X``
    when present (CELLxGENE keeps normalised values in ``X``). Raises ValueError naming the file and what is
    missing (sample column values, spatial coordinates).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Visium h5ad not found: {path}")
    full = ad.read_h5ad(path, backed="r")
    if sample_col:
        if sample_col not in full.obs.columns:
            raise ValueError(f"{path}: h5ad_sample_col {sample_col!r} not in obs ({list(full.obs.columns)[:30]})")
        mask = (full.obs[sample_col].astype(str) == sample).to_numpy()
        if not mask.any():
            raise ValueError(f"{path}: no spots with {sample_col} == {sample!r}; values: "
                             f"{full.obs[sample_col].astype(str).unique()[:20].tolist()}")
    else:
        mask = np.ones(full.n_obs, dtype=bool)
    sub = full[mask]
    if "spatial" not in sub.obsm:
        raise ValueError(f"{path}: obsm['spatial'] (full-resolution spot centres) is missing")
    X = sub.raw.X if sub.raw is not None else sub.X
    X = sp.csr_matrix(X[:] if not sp.issparse(X) else X)
    var = (sub.raw.var if sub.raw is not None else sub.var).copy()
    a = ad.AnnData(X=X.astype(np.float32), obs=sub.obs.copy(), var=var)
    xy = np.asarray(sub.obsm["spatial"], dtype=float)
    a.obs["pxl_col_in_fullres"], a.obs["pxl_row_in_fullres"] = xy[:, 0], xy[:, 1]
    sf: dict = {}
    spatial = full.uns.get("spatial") or {}
    libs = [k for k in spatial if isinstance(spatial[k], Mapping)]
    if library_id:
        lib = library_id.format(sample=sample)
    else:
        lib = sample if sample in libs else (libs[0] if len(libs) == 1 else None)
    if lib is not None and lib in spatial:
        sf = dict(spatial[lib].get("scalefactors") or {})
    full.file.close()
    if not np.allclose(X.data, np.round(X.data)):
        log.warning("%s: counts of %s are not integers (normalised data?); check that raw counts are stored",
                    path, sample)
    return a, sf


def gene_symbols(a: ad.AnnData, gene_map: str | Path | None, name: str) -> ad.AnnData:
    """Use gene symbols as var_names, keeping Ensembl ids in ``var['gene_ids']``.

    When most var names are Ensembl ids (``ENSG…``), symbols come from CELLxGENE's ``var['feature_name']`` or
    the ``gene_map`` table (TSV: Ensembl id, symbol). Ids without a symbol keep their id (counted in the log);
    duplicated symbols are made unique (``-1``, ``-2``, …; counted).
    """
    names = a.var_names.astype(str)
    if not names.str.startswith("ENSG").mean() > 0.5:
        a.var_names_make_unique()
        return a
    if "gene_ids" not in a.var:
        a.var["gene_ids"] = names.to_numpy()
    if "feature_name" in a.var:
        sym = a.var["feature_name"].astype(str)
    elif gene_map:
        tab = pd.read_csv(gene_map, sep="\t", header=None, usecols=[0, 1], names=["id", "symbol"])
        sym = pd.Series(names.to_numpy(), index=names).map(tab.drop_duplicates("id").set_index("id")["symbol"])
        n_un = int(sym.isna().sum())
        if n_un:
            log.warning("%s: %d of %d Ensembl ids have no symbol in %s and keep their id",
                        name, n_un, len(sym), gene_map)
        sym = sym.fillna(pd.Series(names.to_numpy(), index=names))
    else:
        log.warning("%s: var_names are Ensembl ids and no gene_map is configured; keeping ids", name)
        return a
    a.var_names = pd.Index(sym.to_numpy(str))
    n_dup = int(a.var_names.duplicated().sum())
    if n_dup:
        log.info("%s: %d duplicated gene symbols made unique (suffix -1, -2, ...)", name, n_dup)
    a.var_names_make_unique()
    return a


def _image_key(params: Mapping, sample: str) -> str | None:
    key = (params.get("files") or {}).get("image", "hires")
    return ((params.get("sample_files") or {}).get(sample) or {}).get("image", key)


def input_files(params: Mapping) -> list[str]:
    """Every raw file ``prepare`` reads for this dataset (per built sample), for Snakemake's missing-input check."""
    out: list[str] = []
    for s in dataset_samples(params):
        outs = file_template(params, s, "outs")
        files = []
        if outs:
            files += [f"{outs}/filtered_feature_bc_matrix.h5", f"{outs}/spatial/scalefactors_json.json"]
        for key in ("h5ad", "labels"):
            files.append(file_template(params, s, key))
        img = _image_key(params, s)
        if img in ("hires", "lowres"):
            files.append(f"{outs}/spatial/tissue_{img}_image.png" if outs else None)
        else:
            files.append(file_template(params, s, "image"))
        out += [f for f in files if f and f not in out]
    return out


def grid_pitch_px(obs: pd.DataFrame) -> float | None:
    """Median full-resolution distance (px) between spots that are neighbours in one array row (array_col ± 2).

    Visium neighbours are 100 µm apart, so ``100 / pitch`` is an independent µm/px estimate. None when the
    array coordinates are missing or no two neighbouring spots are present.
    """
    need = {"array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"}
    if not need <= set(obs.columns):
        return None
    o = obs[list(need)].astype(float)
    key = pd.MultiIndex.from_arrays([o["array_row"], o["array_col"]])
    right = pd.MultiIndex.from_arrays([o["array_row"], o["array_col"] + 2])
    pos = pd.DataFrame(o[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(), index=key)
    pos = pos[~pos.index.duplicated()]
    other = pos.reindex(right).to_numpy()
    d = np.hypot(*(other - o[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()).T)
    d = d[np.isfinite(d)]
    return float(np.median(d)) if len(d) else None


def build_dataset(params: Mapping, seed: int) -> tuple[ad.AnnData, None]:
    """Build the spots AnnData of a Visium dataset (``reader: visium``): one patch per in-tissue spot.

    Returns ``(spots, None)``. spots: X raw counts (CSR float32, gene symbols); obs ``slide``, ``donor``,
    ``x_um``/``y_um`` (full-resolution px × µm/px), ``px_x``/``px_y`` (px in the image of ``uns['slides']``),
    ``split``, ``region`` (``label_col`` mapped onto ``annotation_classes``; unknown → ``unannotated_class``),
    ``array_row``/``array_col``, ``barcode``; ``uns['slides']`` {slide: {image_path, um_per_px}};
    ``uns['spot_diameter_um']`` = 55 (the physical spot, drawn in the SpatialData output).
    ``max_spots_per_slide`` (optional) keeps a seeded random subset per slide for quick runs.
    Raises FileNotFoundError/ValueError naming the missing file or key.
    """
    samples = dataset_samples(params)
    if not samples:
        raise ValueError("dataset config lists no samples (samples / splits + build_splits)")
    classes = list(params.get("annotation_classes") or [])
    if not classes:
        raise ValueError("dataset config: annotation_classes is required")
    default = params.get("unannotated_class", classes[-1])
    label_col = params.get("label_col")
    spot_um = float(params.get("spot_diameter_um", SCALEFACTOR_SPOT_UM))
    donors = params.get("donors") or {}
    max_spots = params.get("max_spots_per_slide")
    rng = np.random.default_rng(seed)
    parts, slides = [], {}
    for s in tqdm(samples, desc="Visium samples", unit="sample"):
        outs = resolve_file(params, s, "outs")
        h5ad = resolve_file(params, s, "h5ad")
        if outs is not None:
            a, sf = read_spaceranger(outs, s)
        elif h5ad is not None:
            a, sf = read_h5ad_sample(h5ad, s, params.get("h5ad_sample_col"), params.get("h5ad_library_id"))
        else:
            raise ValueError("dataset config: set files.outs (Space Ranger outs folder) or files.h5ad")
        a = gene_symbols(a, params.get("gene_map"), s)

        # labels
        lab_path = resolve_file(params, s, "labels")
        if lab_path is not None:
            lab = pd.read_csv(lab_path, index_col=0)
            lab.index = lab.index.astype(str)
            if label_col not in lab.columns:
                raise ValueError(f"{lab_path}: label_col {label_col!r} not found (columns {list(lab.columns)})")
            raw = lab[label_col].reindex(a.obs_names).to_numpy(object)
        elif label_col and label_col in a.obs.columns:
            raw = a.obs[label_col].astype(object).to_numpy()
        else:
            raise ValueError(
                f"sample {s!r}: no labels: set files.labels (CSV barcode,{label_col}) or label_col to an obs column "
                f"of the h5ad (found {list(a.obs.columns)[:30]})"
            )
        n_nolab = int(pd.isna(raw).sum())
        if n_nolab:
            log.info("%s: %d of %d spots have no label -> %s", s, n_nolab, a.n_obs, default)
        codes = map_labels(raw, classes, default, params.get("label_aliases"), f"{s} labels")

        # coordinates
        sd = sf.get("spot_diameter_fullres")
        conf_um = per_sample(params.get("um_per_px"), s)
        if conf_um:
            um_full = float(conf_um)
            if sd and abs(spot_um / float(sd) - um_full) / um_full > 0.05:
                log.warning("%s: um_per_px %.4f differs from %.4f implied by the spot diameter (%g px = %g µm)",
                            s, um_full, spot_um / float(sd), float(sd), spot_um)
        elif sd:
            um_full = spot_um / float(sd)
        else:
            raise ValueError(f"sample {s!r}: no spot_diameter_fullres in the scale factors; set um_per_px")
        pitch_px = grid_pitch_px(a.obs)
        if pitch_px and abs(VISIUM_SPOT_PITCH_UM / pitch_px - um_full) / um_full > 0.05:
            log.warning("%s: %.4f µm/px disagrees with the spot grid (%.1f px between neighbouring spots = "
                        "%.4f µm/px)",
                        s, um_full, pitch_px, VISIUM_SPOT_PITCH_UM / pitch_px)
        img_key = _image_key(params, s)
        if img_key in ("hires", "lowres"):
            if outs is None:
                raise ValueError(f"sample {s!r}: image: {img_key} needs a Space Ranger outs folder; give a path")
            if f"tissue_{img_key}_scalef" not in sf:
                raise FileNotFoundError(f"sample {s!r}: {outs}/spatial/tissue_{img_key}_image.png not found")
            scale = float(sf[f"tissue_{img_key}_scalef"])
            image = outs / "spatial" / f"tissue_{img_key}_image.png"
        else:
            scale = 1.0
            image = resolve_file(params, s, "image", required=True)
        px_full = a.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
        obs = pd.DataFrame(index=[f"{s}_{b}" for b in a.obs_names])
        obs["slide"] = s
        obs["donor"] = str(donors.get(s, s))
        obs["x_um"], obs["y_um"] = px_full[:, 0] * um_full, px_full[:, 1] * um_full
        obs["px_x"], obs["px_y"] = px_full[:, 0] * scale, px_full[:, 1] * scale
        obs["split"] = sample_split(params, s)
        obs["region"] = np.asarray(classes, dtype=object)[codes]
        for c in ("array_row", "array_col"):
            if c in a.obs:
                obs[c] = a.obs[c].to_numpy()
        obs["barcode"] = a.obs_names.to_numpy(str)
        slide = open_slide(image)  # the reader patches.py cuts patches with (TIFFs: lazy, header only)
        w, h = slide.width, slide.height
        inside = ((obs["px_x"] >= 0) & (obs["px_x"] < w) & (obs["px_y"] >= 0) & (obs["px_y"] < h)).mean()
        if inside < 0.95:
            log.warning("%s: only %.1f%% of spots fall inside %s (%d x %d px); check the image / coordinates",
                        s, 100 * inside, image, w, h)
        b = ad.AnnData(X=sp.csr_matrix(a.X, dtype=np.float32), obs=obs, var=a.var.copy())
        if max_spots and b.n_obs > int(max_spots):
            keep = np.sort(rng.choice(b.n_obs, size=int(max_spots), replace=False))
            log.info("%s: subsampled to %d of %d spots (max_spots_per_slide)", s, int(max_spots), b.n_obs)
            b = b[keep].copy()
        parts.append(b)
        slides[s] = {"image_path": str(image), "um_per_px": um_full / scale}
        log.info("%s: %d spots, %d genes, %.4f µm per image px (%s)",
                 s, b.n_obs, b.n_vars, um_full / scale, image.name)
    genes = common_genes(parts, samples, params.get("gene_join", "inner"))
    aligned = []
    for p in parts:
        q = align_genes(p, genes)
        q.obs = p.obs
        aligned.append(q)
    spots = ad.concat(aligned, join="outer", merge="first")
    spots.X = sp.csr_matrix(spots.X, dtype=np.float32)
    for c in ("slide", "donor", "split"):
        spots.obs[c] = spots.obs[c].astype("category")
    spots.obs["region"] = pd.Categorical(spots.obs["region"], categories=classes)
    spots.uns["slides"] = slides
    spots.uns["spot_diameter_um"] = VISIUM_SPOT_UM
    spots.uns["excluded_classes"] = [classes[i] for i in params.get("excluded_classes", []) or []]
    if params.get("name"):
        spots.uns["dataset"] = str(params["name"])
    vc = spots.obs["region"].value_counts()
    log.info("spots per label: %s", vc[vc > 0].to_dict())
    validate_spots(spots, source=f"visium dataset {params.get('name', '')}".strip())
    return spots, None
