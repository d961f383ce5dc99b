"""Patch building for cell-level data (Xenium): tile the tissue, collect the cells of each tile.

The paper's datasets pair one H&E patch with "the cells inside it" (docs/reference.md#pipeline and
docs/reference.md#flaw-5: ``gexp`` = cells × genes of the patch, at most 200 cells, ``annotation`` = region label of
the patch, ``cell_type_ratio`` = cell-type fractions). The reference
does not publish the patch geometry, so it is configured here:

* Tiles are squares of side ``patch_um`` µm laid on a regular grid with step ``stride_um`` µm (overlapping
  when ``stride_um < patch_um``), in a metric frame of the slide image (H&E pixels × µm/px, so a tile is
  exactly the axis-aligned square that :mod:`workflow_scripts.data.patches` cuts around the tile centre).
  The grid starts at the smallest cell coordinate of the slide; tiles are indexed ``(kx, ky)``.
* A cell belongs to every tile whose half-open square ``[x0, x0 + patch) × [y0, y0 + patch)`` contains its
  centroid, so with overlapping tiles a cell belongs to several tiles.
* Tiles with fewer than ``min_cells`` cells are dropped (tissue edges, empty glass); this also replaces a
  tissue mask, since Xenium only segments cells on tissue.
* Tiles with more than ``max_cells`` cells keep a random subset of ``max_cells`` (seeded; reference: "padded
  up to 200 cells per patch"). Counts, labels and compositions all use the kept cells, so the expression
  and the labels of a patch describe the same cells.
* Patch label = the most frequent region label among its cells (ties → the smallest class index, as
  ``scipy.stats.mode`` in the reference's rings, docs/reference.md#spatial-rings); ``region_frac`` = share of cells carrying it.
* Composition = fraction of the kept cells of each cell type, then the unmapped class removed and the rest
  renormalised to sum 1, a zero vector when every cell is unmapped (reference ``load_and_preprocess_data``,
  docs/reference.md#datasets "cell_type_ratio").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)


@dataclass
class Tiles:
    """Result of :func:`tile_cells` for one slide.

    ``kxy`` (n_tiles, 2) int grid indices; ``origin`` (n_tiles, 2) lower corner and ``centre`` (n_tiles, 2)
    centre of each tile in the tiling frame (µm); ``member`` CSR (n_tiles × n_cells) with 1 where a kept cell
    lies in a tile; ``n_inside`` (n_tiles,) cells inside each tile before the ``max_cells`` cap.
    """

    kxy: np.ndarray
    origin: np.ndarray
    centre: np.ndarray
    member: sp.csr_matrix
    n_inside: np.ndarray


def n_tiles_along(lo: float, hi: float, patch: float, stride: float) -> int:
    """Number of grid steps needed so that tiles starting at ``lo`` cover ``[lo, hi]`` (at least 1)."""
    if patch <= 0 or stride <= 0:
        raise ValueError(f"patch ({patch}) and stride ({stride}) must be > 0")
    if stride > patch:
        log.warning("stride %.1f µm > patch %.1f µm: cells between tiles are not used", stride, patch)
    return max(1, int(np.ceil((hi - lo - patch) / stride + 1e-9)) + 1)


def _axis_candidates(v: np.ndarray, lo: float, patch: float, stride: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per value, the tile indices k with ``lo + k·stride <= v < lo + k·stride + patch`` (shape (n_v, m) + mask)."""
    m = int(np.ceil(patch / stride)) + 1
    k_hi = np.floor((v - lo) / stride).astype(np.int64)
    ks = k_hi[:, None] - np.arange(m, dtype=np.int64)[None, :]
    start = lo + ks * stride
    ok = (ks >= 0) & (ks < n) & (v[:, None] >= start) & (v[:, None] < start + patch)
    return ks, ok


def tile_cells(
    xy: np.ndarray,
    patch: float,
    stride: float,
    min_cells: int = 1,
    max_cells: int | None = 200,
    rng: np.random.Generator | None = None,
    name: str = "slide",
) -> Tiles:
    """Tile the cells at ``xy`` (n_cells, 2; µm in one slide's frame) into overlapping square patches.

    See the module docstring for the rules. Tiles are returned in row-major grid order (ky, then kx).
    ``rng`` drives the random ``max_cells`` subset (default: ``np.random.default_rng(0)``).
    Raises ValueError for an empty or non-finite ``xy``.
    """
    xy = np.asarray(xy, dtype=float)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) == 0:
        raise ValueError(f"{name}: cell coordinates must be a non-empty (n, 2) array, got {xy.shape}")
    if not np.isfinite(xy).all():
        raise ValueError(f"{name}: {int((~np.isfinite(xy)).any(axis=1).sum())} cells have non-finite coordinates")
    rng = rng or np.random.default_rng(0)
    lo = xy.min(axis=0)
    hi = xy.max(axis=0)
    nx = n_tiles_along(lo[0], hi[0], patch, stride)
    ny = n_tiles_along(lo[1], hi[1], patch, stride)
    kx, okx = _axis_candidates(xy[:, 0], lo[0], patch, stride, nx)
    ky, oky = _axis_candidates(xy[:, 1], lo[1], patch, stride, ny)
    m = kx.shape[1]
    # all (x-candidate, y-candidate) combinations per cell
    ok = okx[:, :, None] & oky[:, None, :]
    cell = np.broadcast_to(np.arange(len(xy))[:, None, None], ok.shape)[ok]
    tx = np.broadcast_to(kx[:, :, None], (len(xy), m, m))[ok]
    ty = np.broadcast_to(ky[:, None, :], (len(xy), m, m))[ok]
    tile_id = ty * nx + tx
    uniq, inv = np.unique(tile_id, return_inverse=True)
    n_inside = np.bincount(inv, minlength=len(uniq))

    keep_tile = n_inside >= min_cells
    n_small = int((~keep_tile).sum())
    # cap at max_cells: random rank within each tile
    order = np.lexsort((rng.random(len(inv)), inv))
    inv_s, cell_s = inv[order], cell[order]
    starts = np.r_[0, np.flatnonzero(np.diff(inv_s)) + 1]
    rank = np.arange(len(inv_s)) - np.repeat(starts, np.diff(np.r_[starts, len(inv_s)]))
    keep_pair = keep_tile[inv_s]
    n_capped_tiles = 0
    if max_cells is not None:
        over = keep_pair & (rank >= max_cells)
        n_capped_tiles = int(((n_inside > max_cells) & keep_tile).sum())
        if over.any():
            log.info("%s: %d tiles hold more than %d cells; %d (cell, tile) pairs dropped by the cap",
                     name, n_capped_tiles, max_cells, int(over.sum()))
        keep_pair &= rank < max_cells
    new_index = np.cumsum(keep_tile) - 1
    rows = new_index[inv_s[keep_pair]]
    cols = cell_s[keep_pair]
    n_tiles = int(keep_tile.sum())
    member = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n_tiles, len(xy))
    )
    member.sort_indices()
    kept_ids = uniq[keep_tile]
    kxy = np.stack([kept_ids % nx, kept_ids // nx], axis=1).astype(np.int64)
    origin = lo[None, :] + kxy * stride
    centre = origin + patch / 2.0
    n_unused = int((np.asarray(member.sum(axis=0)).ravel() == 0).sum())
    log.info(
        "%s: %d cells, grid %d x %d (patch %.1f µm, stride %.1f µm): %d tiles with cells, %d dropped "
        "(< %d cells), %d kept; %d cells in no kept tile",
        name, len(xy), nx, ny, patch, stride, len(uniq), n_small, min_cells, n_tiles, n_unused,
    )
    return Tiles(kxy=kxy, origin=origin, centre=centre, member=member, n_inside=n_inside[keep_tile])


def class_counts(member: sp.spmatrix, codes: np.ndarray, n_classes: int) -> np.ndarray:
    """Per tile, the number of member cells of each class: ``member @ onehot(codes)`` → (n_tiles, n_classes).

    ``codes`` (n_cells,) are integer class indices in ``[0, n_classes)``; raises ValueError otherwise.
    """
    codes = np.asarray(codes)
    if len(codes) and (codes.min() < 0 or codes.max() >= n_classes):
        raise ValueError(f"class codes must lie in [0, {n_classes}), got range [{codes.min()}, {codes.max()}]")
    onehot = sp.csr_matrix((np.ones(len(codes)), (np.arange(len(codes)), codes)), shape=(len(codes), n_classes))
    return np.asarray((member @ onehot).todense())


def majority_label(member: sp.spmatrix, codes: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Majority class per tile and the share of its cells carrying it.

    Returns ``(label (n_tiles,) int, frac (n_tiles,) float)``; ties go to the smallest class index
    (``np.argmax`` takes the first maximum, like ``scipy.stats.mode`` in the reference's rings, docs/reference.md#spatial-rings).
    Tiles without cells get label -1 and frac 0.
    """
    counts = class_counts(member, codes, n_classes)
    total = counts.sum(axis=1)
    label = np.where(total > 0, counts.argmax(axis=1), -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(total > 0, counts.max(axis=1) / np.maximum(total, 1), 0.0)
    return label, frac


def remove_unmapped_and_renormalise(comp: np.ndarray, unmapped_index: int | None) -> np.ndarray:
    """Drop column ``unmapped_index`` of a composition matrix and renormalise rows to sum 1.

    ``comp`` (n, K) non-negative → (n, K-1) (or (n, K) when ``unmapped_index`` is None). Rows whose remaining
    sum is 0 stay all-zero (reference ``load_and_preprocess_data``, docs/reference.md#datasets: a zero sum keeps an all-zero vector).
    """
    comp = np.asarray(comp, dtype=float)
    if unmapped_index is not None:
        comp = np.delete(comp, unmapped_index, axis=1)
    s = comp.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s > 0, comp / np.where(s > 0, s, 1.0), 0.0)


def composition(member: sp.spmatrix, codes: np.ndarray, n_classes: int, unmapped_index: int | None) -> np.ndarray:
    """Cell-type composition per tile with the unmapped class removed: (n_tiles, n_classes - 1), rows sum to 1 or 0."""
    return remove_unmapped_and_renormalise(class_counts(member, codes, n_classes), unmapped_index)
