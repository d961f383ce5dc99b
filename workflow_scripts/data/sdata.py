"""The SpatialData view of a prepared dataset: ``results/{dataset}/sdata.zarr``.

Written by ``prepare`` next to the spot data model (``spots.h5ad``, :mod:`workflow_scripts.data.model`) so that
napari-spatialdata and spatialdata-plot open the dataset with its labels. Per slide ``s`` it holds

* ``he_{s}`` — the slide's H&E (the image ``uns['slides'][s]['image_path']`` that patches are cut from), as an
  RGB image (c, y, x) uint8, block-averaged by an integer factor ``k`` to about ``image_um_per_px`` µm per
  pixel (``k = max(1, round(image_um_per_px / um_per_px))``; ``None`` keeps every pixel); a multiscale image
  when a side exceeds :data:`MULTISCALE_ABOVE_PX` pixels;
* ``spots_{s}`` — one shape per spot: a circle of the spot diameter (``uns['spot_diameter_um']``: Visium,
  HER2ST) or, for tiled cell-level data (Xenium), the square patch of side ``uns['patch_um']``;

and one table ``table`` (AnnData: the spots' raw counts, ``obs`` with every label, ``obsm['composition']``)
that annotates the ``spots_*`` shapes: ``region_key='spatial_element'`` (the shapes element of the spot),
``instance_key='instance_id'`` (the spot's index in that element); its ``obs_names`` are the spot ids.

Coordinates: **µm**. Each slide has its own coordinate system named after the slide (µm in the slide's
H&E frame: image pixel × µm/px, the frame of ``obs.x_um``/``y_um``), and the common ``global`` coordinate
system places the slides side by side (slide ``i`` shifted right by the widths of slides ``0 … i-1`` plus a
gap of 10 % of the widest slide), so that one plot shows them all. Shapes are placed at
``(px_x, px_y) × um_per_px``, the very pixels :mod:`workflow_scripts.data.patches` cuts, so shapes and image
overlay exactly.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from PIL import Image

from .patches import open_slide

log = logging.getLogger(__name__)

DEFAULT_IMAGE_UM_PER_PX = 2.0
MULTISCALE_ABOVE_PX = 4096
REGION_KEY = "spatial_element"
INSTANCE_KEY = "instance_id"
TABLE_NAME = "table"


def downsample_factor(um_per_px: float, image_um_per_px: float | None) -> int:
    """Integer block size ``k`` that brings an image of ``um_per_px`` closest to ``image_um_per_px`` (≥ 1)."""
    if not image_um_per_px:
        return 1
    return max(1, int(round(float(image_um_per_px) / float(um_per_px))))


def read_slide_image(path: str | Path, k: int, band_bytes: int = 2**28) -> np.ndarray:
    """The slide image at ``path`` block-averaged by ``k`` × ``k`` pixels → (3, H // k, W // k) uint8.

    Read through :func:`workflow_scripts.data.patches.open_slide` (the reader patches are cut with; lazy for
    TIFFs) in bands of full-resolution rows of at most ``band_bytes`` (256 MiB), so a whole-slide TIFF is never in
    memory at full resolution (unless ``k`` = 1, when the output is that resolution).
    Output pixel ``(J, I)`` is the mean of input pixels ``[kJ, kJ + k) × [kI, kI + k)`` (within one grey level: Pillow
    ``Image.reduce``); the last ``H mod k`` rows and ``W mod k`` columns are left out.
    """
    slide = open_slide(path)
    h, w = slide.height // k, slide.width // k
    if h == 0 or w == 0:
        raise ValueError(f"{path}: image of {slide.width} x {slide.height} px is smaller than the block size {k}")
    out = np.empty((h, w, 3), dtype=np.uint8)
    step = max(1, band_bytes // (3 * k * k * w))  # output rows per band
    for j0 in range(0, h, step):
        j1 = min(h, j0 + step)
        band = slide.read_region(0, j0 * k, w * k, (j1 - j0) * k)
        out[j0:j1] = np.asarray(Image.fromarray(band).reduce(k)) if k > 1 else band
    return np.moveaxis(out, 2, 0)


def spot_shapes(centres_um: np.ndarray, spot_diameter_um: float | None, patch_um: float | None):
    """Shapes of the spots of one slide, indexed 0 … n-1, in µm.

    Circles of diameter ``spot_diameter_um`` at ``centres_um`` (n, 2) when it is given, else axis-aligned squares
    of side ``patch_um`` centred there. Returns a GeoDataFrame (not yet parsed by ``ShapesModel``).
    Raises ValueError when neither size is given.
    """
    import geopandas as gpd
    import shapely

    c = np.asarray(centres_um, dtype=float)
    index = pd.Index(np.arange(len(c)), name=INSTANCE_KEY)
    if spot_diameter_um:
        gdf = gpd.GeoDataFrame(geometry=gpd.points_from_xy(c[:, 0], c[:, 1]), index=index)
        gdf["radius"] = float(spot_diameter_um) / 2.0
        return gdf
    if not patch_um:
        raise ValueError("spots need uns['spot_diameter_um'] (circles) or uns['patch_um'] (squares)")
    half = float(patch_um) / 2.0
    boxes = shapely.box(c[:, 0] - half, c[:, 1] - half, c[:, 0] + half, c[:, 1] + half)
    return gpd.GeoDataFrame(geometry=boxes, index=index)


def _table(spots: ad.AnnData, element: np.ndarray, instance: np.ndarray) -> ad.AnnData:
    """The table of the SpatialData object: counts, obs, obsm['composition'] and uns of the spots."""
    obs = spots.obs.copy()
    for col in (REGION_KEY, INSTANCE_KEY):
        if col in obs.columns:
            raise ValueError(f"spots.obs already has a column {col!r}, needed for the SpatialData table")
    obs[REGION_KEY] = pd.Categorical(element)
    obs[INSTANCE_KEY] = instance
    table = ad.AnnData(X=spots.X.copy(), obs=obs, var=spots.var.copy(), uns=dict(spots.uns))
    if "composition" in spots.obsm:
        table.obsm["composition"] = np.asarray(spots.obsm["composition"], dtype=float)
    return table


def _image_width_px(path: str | Path) -> int:
    """Width (px) of a slide image from its header (TIFFs lazily through ``open_slide``, others with Pillow)."""
    if Path(path).suffix.lower() in (".tif", ".tiff"):
        return open_slide(path).width
    with Image.open(path) as im:
        return im.width


def _slide_width_um(spots: ad.AnnData, slide: str, um_per_px: float) -> float:
    """Width (µm) of a slide: its image's, or for a slide without an image (synthetic or precomputed data) the
    extent of its spot centres."""
    path = spots.uns["slides"][slide]["image_path"]
    if path:
        return _image_width_px(path) * um_per_px
    return float(spots.obs.loc[spots.obs["slide"].astype(str) == slide, "px_x"].max()) * um_per_px


def _layout(spots: ad.AnnData, patch_um: float | None):
    """Slides in order, their µm/px and x offsets in ``global`` (µm), the shapes elements and the table."""
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity, Translation

    diameter = spots.uns.get("spot_diameter_um")
    side = spots.uns.get("patch_um", patch_um)
    slide_of = spots.obs["slide"].astype(str).to_numpy()
    slides = list(pd.unique(slide_of))
    ums = [float(spots.uns["slides"][s]["um_per_px"]) for s in slides]
    widths = np.array([_slide_width_um(spots, s, um) for s, um in zip(slides, ums)])
    offsets = np.concatenate([[0.0], np.cumsum(widths + 0.1 * widths.max())[:-1]])
    shapes = {}
    element = np.empty(spots.n_obs, dtype=object)
    instance = np.zeros(spots.n_obs, dtype=np.int64)
    for s, um, off in zip(slides, ums, offsets):
        rows = np.flatnonzero(slide_of == s)
        centres = spots.obs[["px_x", "px_y"]].to_numpy(float)[rows] * um
        name = f"spots_{s}"
        shift = Translation([off, 0.0], axes=("x", "y"))
        shapes[name] = ShapesModel.parse(spot_shapes(centres, diameter, side),
                                         transformations={s: Identity(), "global": shift})
        element[rows] = name
        instance[rows] = np.arange(len(rows))
        log.info("%s: %d %s", s, len(rows), f"circles of {diameter:g} µm" if diameter else f"squares of {side:g} µm")
    table = TableModel.parse(_table(spots, element, instance), region=list(shapes), region_key=REGION_KEY,
                             instance_key=INSTANCE_KEY)
    return list(zip(slides, ums, offsets)), shapes, table


def slide_image_element(path: str | Path, slide: str, um_per_px: float, offset_um: float,
                        image_um_per_px: float | None):
    """The H&E element of one slide: (c, y, x) uint8, block-averaged (:func:`read_slide_image`), multiscale above
    :data:`MULTISCALE_ABOVE_PX`, with ``Scale(µm/px)`` to the slide's coordinate system and that plus a shift of
    ``offset_um`` along x to ``global``."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Sequence, Translation

    k = downsample_factor(um_per_px, image_um_per_px)
    img = read_slide_image(path, k)
    to_um = Scale([um_per_px * k] * 2, axes=("x", "y"))
    side = max(img.shape[1:])
    n = int(np.ceil(np.log2(side / MULTISCALE_ABOVE_PX))) if side > MULTISCALE_ABOVE_PX else 0  # pyramid levels
    log.info("%s: H&E %s at %.3f µm/px (blocks of %d px)", slide, tuple(img.shape), um_per_px * k, k)
    return Image2DModel.parse(
        img, dims=("c", "y", "x"), c_coords=["r", "g", "b"], scale_factors=[2] * n or None,
        transformations={slide: to_um, "global": Sequence([to_um, Translation([offset_um, 0.0], axes=("x", "y"))])},
    )


def build_sdata(spots: ad.AnnData, image_um_per_px: float | None = DEFAULT_IMAGE_UM_PER_PX,
                patch_um: float | None = None):
    """Build the SpatialData object of a spots AnnData in memory (see the module docstring for its elements).

    Parameters
    ----------
    spots : AnnData following :mod:`workflow_scripts.data.model`; ``uns['spot_diameter_um']`` (circles) or
        ``uns['patch_um']`` / ``patch_um`` (squares) give the shape size in µm.
    image_um_per_px : target resolution of the written H&E (µm/px); ``None`` keeps full resolution.
    patch_um : square side (µm) when ``uns`` gives no spot diameter and no ``patch_um``.

    Returns
    -------
    spatialdata.SpatialData. Raises ValueError when the spots lack a shape size or a slide name is not a valid
    element name. :func:`write_sdata` writes the same object holding one slide image in memory at a time.
    """
    from spatialdata import SpatialData

    plan, shapes, table = _layout(spots, patch_um)
    images = {f"he_{s}": slide_image_element(spots.uns["slides"][s]["image_path"], s, um, off, image_um_per_px)
              for s, um, off in plan if spots.uns["slides"][s]["image_path"]}
    return SpatialData(images=images, shapes=shapes, tables={TABLE_NAME: table})


def write_sdata(spots: ad.AnnData, path: str | Path, image_um_per_px: float | None = DEFAULT_IMAGE_UM_PER_PX,
                patch_um: float | None = None) -> Path:
    """Write the SpatialData zarr store of :func:`build_sdata` at ``path`` (replaced if present).

    The shapes and the table are written first, then the slide images one at a time, so only one slide image is
    in memory (``image_um_per_px=None`` on whole-slide images: about 3 bytes per pixel of the largest slide).
    """
    from spatialdata import SpatialData

    path = Path(path)
    plan, shapes, table = _layout(spots, patch_um)
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # one line per array of the table, about a future zarr default
        warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
        sdata = SpatialData(shapes=shapes, tables={TABLE_NAME: table})
        sdata.write(path)
        for s, um, off in plan:
            if not spots.uns["slides"][s]["image_path"]:  # no H&E (synthetic or precomputed data): shapes only
                continue
            name = f"he_{s}"
            sdata.images[name] = slide_image_element(spots.uns["slides"][s]["image_path"], s, um, off,
                                                     image_um_per_px)
            sdata.write_element(name)
            del sdata.images[name]
        sdata.write_consolidated_metadata()
    n_images = sum(bool(spots.uns["slides"][s]["image_path"]) for s, _, _ in plan)
    log.info("wrote %s: %d images, %d shapes elements, table of %d spots", path, n_images, len(shapes), table.n_obs)
    return path
