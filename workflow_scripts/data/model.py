"""The spot data model shared by every dataset (``results/{dataset}/spots.h5ad``).

One AnnData per dataset; one row ("spot") per spatial unit that pairs an expression profile with an
H&E patch: a Visium / legacy-ST spot, or a patch of a Xenium tissue tile (then ``X`` holds the summed
counts of the cells inside it and ``obsm['cell_counts']`` is not used).

``X``
    raw counts, spots × genes (CSR, float32); ``var_names`` are gene symbols, ``var['gene_ids']``
    Ensembl ids where known.
``obs`` (index = ``spot_id``, unique strings)
    ``slide`` (category), ``donor`` (category), ``x_um``, ``y_um`` (spot centre in µm, in the slide's
    own frame), ``px_x``, ``px_y`` (spot centre in pixels of the slide image that ships with the data;
    x = column, y = row), ``split`` (category), and one column per classification label.
``obsm['composition']``
    cell-type proportions (spots × K, rows sum to 1 or are all-zero); names in ``uns['composition_names']``.
``uns['slides']``
    ``{slide: {"image_path": str, "um_per_px": float}}`` where ``um_per_px`` is the resolution of the
    image at ``image_path`` (µm per image pixel). A dataset without H&E (the ``synthetic`` reader, or
    ``precomputed`` spots without images) has ``image_path = ""`` for every slide, ``um_per_px = 1`` and
    ``px_x, px_y`` = µm: nothing can cut patches from it (:func:`has_images`), so its IMG encoder must read
    embeddings (``precomputed``).
``uns['dataset']``
    the dataset name.
``uns['spot_diameter_um']`` / ``uns['patch_um']`` (optional)
    the physical spot diameter (µm; HER2ST, Visium) or, for tiled cell-level data, the patch side (µm): the
    shapes of the SpatialData view ``sdata.zarr`` (:mod:`workflow_scripts.data.sdata`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the readers import this module while the DAG is planned
    import anndata as ad

REQUIRED_OBS = ("slide", "donor", "x_um", "y_um", "px_x", "px_y", "split")


class DataModelError(ValueError):
    """Raised when a spots AnnData does not follow the data model above."""


def validate_spots(adata: ad.AnnData, source: str | Path = "<memory>", check_images: bool = True) -> None:
    """Check that ``adata`` follows the spot data model; raise :class:`DataModelError` naming ``source``.

    With ``check_images`` every slide image path must exist on disk.
    """
    missing = [c for c in REQUIRED_OBS if c not in adata.obs.columns]
    if missing:
        raise DataModelError(f"{source}: obs lacks required columns {missing}")
    if adata.obs_names.has_duplicates:
        raise DataModelError(f"{source}: duplicated spot ids")
    for c in ("x_um", "y_um", "px_x", "px_y"):
        v = adata.obs[c].to_numpy(dtype=float)
        if not np.isfinite(v).all():
            raise DataModelError(f"{source}: obs['{c}'] has {int((~np.isfinite(v)).sum())} non-finite values")
    slides = adata.uns.get("slides")
    if not isinstance(slides, dict):
        raise DataModelError(f"{source}: uns['slides'] missing (slide -> image_path, um_per_px)")
    for s in adata.obs["slide"].astype(str).unique():
        if s not in slides:
            raise DataModelError(f"{source}: slide {s!r} has no entry in uns['slides']")
        info = slides[s]
        if float(info["um_per_px"]) <= 0:
            raise DataModelError(f"{source}: slide {s!r} um_per_px must be > 0")
        if check_images and str(info["image_path"]) and not Path(str(info["image_path"])).exists():
            raise FileNotFoundError(
                f"{source}: image for slide {s!r} not found at {info['image_path']}; "
                "restore the file or fix the dataset's resource path in config"
            )
    if "composition" in adata.obsm:
        comp = np.asarray(adata.obsm["composition"])
        if comp.shape[0] != adata.n_obs:
            raise DataModelError(f"{source}: obsm['composition'] has {comp.shape[0]} rows for {adata.n_obs} spots")
        names = adata.uns.get("composition_names")
        if names is None or len(names) != comp.shape[1]:
            raise DataModelError(f"{source}: uns['composition_names'] must list {comp.shape[1]} names")


def has_images(adata: ad.AnnData) -> bool:
    """Whether every slide of ``adata`` has an H&E image (a non-empty ``uns['slides'][s]['image_path']``)."""
    slides = adata.uns.get("slides") or {}
    return bool(slides) and all(str((info or {}).get("image_path") or "") for info in slides.values())
