"""Cutting H&E patches around spots, on demand, at a physical size given in µm.

A patch for a spot is the square of side ``patch_um`` µm centred on the spot centre (``obs.px_x``,
``obs.px_y`` in slide-image pixels), i.e. ``patch_um / um_per_px`` image pixels, resampled to
``out_px`` × ``out_px`` pixels (224 for UNI2-h). Regions outside the image are filled with white
(255), the usual slide background; how many patches touch the border is logged.

Slide images are opened through :func:`open_slide`, which picks a backend by file type: whole-image
decoding with Pillow for JPEG/PNG (the images shipped here, up to ~10k × 10k px), and lazy tiled reads
for (pyramidal) TIFF/OME-TIFF through tifffile + zarr, which never loads the whole slide.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ..io import DataFileError

log = logging.getLogger(__name__)
Image.MAX_IMAGE_PIXELS = None  # whole-slide images are larger than Pillow's decompression-bomb guard

FILL_VALUE = 255


class ArraySlide:
    """A slide held in memory as an ``(H, W, 3)`` uint8 array."""

    def __init__(self, array: np.ndarray):
        if array.ndim != 3 or array.shape[2] < 3:
            raise ValueError(f"slide image must be (H, W, 3+), got {array.shape}")
        self.array = array[..., :3]
        self.height, self.width = self.array.shape[:2]

    def read_region(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Return the ``(h, w, 3)`` uint8 region with top-left (x0, y0), white-filled outside the image."""
        out = np.full((h, w, 3), FILL_VALUE, dtype=np.uint8)
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + w, self.width), min(y0 + h, self.height)
        if xb > xa and yb > ya:
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = self.array[ya:yb, xa:xb]
        return out


class TiffSlide(ArraySlide):
    """Lazy reader for level 0 of a (pyramidal) TIFF / OME-TIFF, never loading the whole slide.

    Memory-mapped when level 0 is uncompressed and contiguous (e.g. GEO's single-strip registered H&E),
    otherwise read tile by tile through tifffile + zarr. Handles (Y, X, S), planar (S|C, Y, X) and
    singleton extra axes; raises ValueError for other layouts, naming the file.
    """

    def __init__(self, path: str | Path):
        import tifffile
        import zarr

        self.path = Path(path)
        self._tif = tifffile.TiffFile(path)
        series = self._tif.series[0]
        level0 = series.levels[0]
        self._axes, shape = level0.axes, level0.shape
        if "Y" not in self._axes or "X" not in self._axes:
            raise ValueError(f"{path}: TIFF axes {self._axes!r} lack Y/X")
        if level0.keyframe.is_memmappable and len(level0.pages) == 1:
            self.array = tifffile.memmap(path, mode="r", series=0, level=0)
        else:
            self.array = zarr.open(series.aszarr(level=0), mode="r")
        self._chan = next(
            (self._axes.index(a) for a in "SC" if a in self._axes and shape[self._axes.index(a)] in (3, 4)), None
        )
        for i, a in enumerate(self._axes):
            if a not in "YX" and i != self._chan and shape[i] != 1:
                raise ValueError(f"{path}: cannot read axis {a!r} of size {shape[i]} (axes {self._axes!r})")
        self.height, self.width = shape[self._axes.index("Y")], shape[self._axes.index("X")]

    def read_region(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), FILL_VALUE, dtype=np.uint8)
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + w, self.width), min(y0 + h, self.height)
        if xb > xa and yb > ya:
            idx = tuple(
                slice(ya, yb) if a == "Y" else slice(xa, xb) if a == "X" else slice(0, 3) if i == self._chan else 0
                for i, a in enumerate(self._axes)
            )
            try:
                region = np.asarray(self.array[idx])
            except Exception as e:  # noqa: BLE001 - tile decoders (imagecodecs, zarr) raise their own types
                raise _unreadable(self.path, e) from e
            kept = [a for i, a in enumerate(self._axes) if a in "YX" or i == self._chan]
            if self._chan is not None:
                region = np.moveaxis(region, kept.index(self._axes[self._chan]), -1)
                if kept.index("Y") > kept.index("X"):
                    region = region.swapaxes(0, 1)
            else:
                if kept.index("Y") > kept.index("X"):
                    region = region.T
                region = np.repeat(region[..., None], 3, axis=2)
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = region[..., :3]
        return out


def _unreadable(path: Path, err: Exception) -> DataFileError:
    return DataFileError(
        f"slide image {path} cannot be decoded ({type(err).__name__}: {err}): the file is truncated or corrupt "
        "(an interrupted copy or download?). Restore or re-download it; the spots table's uns['slides'] names "
        "the image of each slide."
    )


def open_slide(path: str | Path) -> ArraySlide:
    """Open a slide image.

    Raises FileNotFoundError naming the path if it is missing, and :class:`workflow_scripts.io.DataFileError`
    naming it when it cannot be decoded (truncated or corrupt file, not an image).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"slide image not found: {path}")
    if path.suffix.lower() in (".tif", ".tiff") or path.name.lower().endswith(".ome.tif"):
        try:
            return TiffSlide(path)
        except Exception as e:  # noqa: BLE001 - tifffile raises many types for damaged files
            if isinstance(e, ValueError) and str(path) in str(e):  # TiffSlide's own layout errors name the file
                raise
            raise _unreadable(path, e) from e
    try:
        with Image.open(path) as im:
            return ArraySlide(np.asarray(im.convert("RGB")))
    except (OSError, EOFError, SyntaxError, ValueError) as e:  # Pillow: "image file is truncated", not an image
        raise _unreadable(path, e) from e


def patch_size_px(patch_um: float, um_per_px: float) -> int:
    """Side of a ``patch_um`` µm patch in image pixels (at least 1)."""
    if patch_um <= 0 or um_per_px <= 0:
        raise ValueError(f"patch_um ({patch_um}) and um_per_px ({um_per_px}) must be > 0")
    return max(1, int(round(patch_um / um_per_px)))


def cut_patch(slide: ArraySlide, cx: float, cy: float, size_px: int, out_px: int = 224) -> np.ndarray:
    """Cut a ``size_px`` square centred on (cx, cy) image pixels and resample it to ``(out_px, out_px, 3)`` uint8."""
    x0 = int(round(cx - size_px / 2))
    y0 = int(round(cy - size_px / 2))
    region = slide.read_region(x0, y0, size_px, size_px)
    if size_px != out_px:
        region = np.asarray(Image.fromarray(region).resize((out_px, out_px), Image.Resampling.BILINEAR))
    return region


def touches_border(slide: ArraySlide, cx: float, cy: float, size_px: int) -> bool:
    """True if the patch square extends outside the image."""
    x0, y0 = cx - size_px / 2, cy - size_px / 2
    return x0 < 0 or y0 < 0 or x0 + size_px > slide.width or y0 + size_px > slide.height


class PatchReader:
    """Random access to spot patches of a spots AnnData, keeping the last few decoded slides in memory.

    ``reader[i]`` returns the ``(out_px, out_px, 3)`` uint8 patch of the i-th spot (row order of
    ``adata.obs``). Iterate spots slide by slide to avoid re-decoding images (``order()`` gives such an
    order). Safe to use from DataLoader workers (each worker holds its own cache).
    """

    def __init__(self, obs, slides: dict, patch_um: float, out_px: int = 224, cache_slides: int = 1):
        self.slide_ids = obs["slide"].astype(str).to_numpy()
        self.px = obs[["px_x", "px_y"]].to_numpy(dtype=float)
        self.slides = slides
        self.patch_um = float(patch_um)
        self.out_px = int(out_px)
        self.cache_slides = max(1, int(cache_slides))
        self._cache: OrderedDict[str, ArraySlide] = OrderedDict()
        self.n_border = 0

    def __len__(self) -> int:
        return len(self.slide_ids)

    def order(self) -> np.ndarray:
        """Spot indices sorted by slide (stable), the efficient reading order."""
        return np.argsort(self.slide_ids, kind="stable")

    def _slide(self, s: str) -> ArraySlide:
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        slide = open_slide(self.slides[s]["image_path"])
        self._cache[s] = slide
        while len(self._cache) > self.cache_slides:
            self._cache.popitem(last=False)
        return slide

    def __getitem__(self, i: int) -> np.ndarray:
        s = self.slide_ids[i]
        slide = self._slide(s)
        size = patch_size_px(self.patch_um, float(self.slides[s]["um_per_px"]))
        cx, cy = self.px[i]
        if touches_border(slide, cx, cy, size):
            self.n_border += 1
        return cut_patch(slide, cx, cy, size, self.out_px)

    def iter_patches(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(spot index, patch)`` for every spot, slide by slide."""
        for i in self.order():
            yield int(i), self[int(i)]


def patch_reader(adata, patch_um: float, out_px: int = 224, cache_slides: int = 1) -> PatchReader:
    """Build a :class:`PatchReader` for a spots AnnData (see :mod:`workflow_scripts.data.model`).

    Raises ValueError naming the slides when the dataset has no H&E image (``image_path`` empty).
    """
    no_image = sorted(s for s, info in dict(adata.uns["slides"]).items() if not str(info.get("image_path") or ""))
    if no_image:
        raise ValueError(
            f"slides {no_image[:5]} have no H&E image, so no patch can be cut (an IMG encoder such as morphology or "
            "uni2h needs one): set datasets.<d>.encoders.img: precomputed with your IMG embeddings "
            "(docs/synthetic.md#bring-your-own-embeddings)"
        )
    return PatchReader(adata.obs, dict(adata.uns["slides"]), patch_um, out_px, cache_slides)
