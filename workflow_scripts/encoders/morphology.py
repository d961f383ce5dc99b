"""``morphology`` — the offline default image encoder: interpretable H&E features per spot patch.

A weight-free stand-in for the paper's UNI2-h image encoder (docs/reference.md#uni2-h). Every spot's patch is
cut on demand (:func:`workflow_scripts.data.patches.patch_reader`: ``ctx.patch_um`` µm square resampled
to ``ctx.patch_px`` px, so one patch pixel is ``ctx.patch_um / ctx.patch_px`` µm, 0.893 µm at the
defaults 200 µm / 224 px) and described by hand-crafted features computed with scikit-image:

* **Stain deconvolution** (Ruifrok & Johnston, Anal Quant Cytol Histol 23:291, 2001;
  ``skimage.color.rgb2hed``): optical density of haematoxylin (H), eosin (E) and DAB (D) per pixel;
  for each: mean, std and the 10/50/90th percentiles over all patch pixels (OD units).
* **Colour**: mean and std of R, G, B over all pixels (0–255), and the **tissue fraction**: the share of
  pixels that are not background. Background = near-white (all channels > ``background_threshold``,
  default 220) or near-black (all channels < ``black_threshold``, default 20: the downscaled HER2ST
  A1/A2 PNGs have black margins). Near-black pixels are painted white (255) before any other feature is
  computed, so a black margin and glass give the same stain, colour and texture values (real H&E
  tissue has essentially no such pixels: < 0.1 % of any B4/C2/C5 spot patch).
* **GLCM texture** (Haralick et al., IEEE SMC 3:610, 1973; ``skimage.feature.graycomatrix`` /
  ``graycoprops``): grey image (``rgb2gray``) quantised to 64 levels; symmetric, normalised
  co-occurrence matrices at distances ``glcm_distances`` (px of the resampled patch, default [1, 3]) and
  angles 0, π/4, π/2, 3π/4; contrast, dissimilarity, homogeneity, energy, correlation and ASM, each
  **averaged over the 4 angles** (so a 90° rotation leaves them unchanged), per distance.
* **LBP texture** (Ojala et al., IEEE TPAMI 24:971, 2002; ``skimage.feature.local_binary_pattern``,
  P = 8 neighbours, radius ``lbp_radius`` px (default 1), method "uniform" = rotation-invariant uniform
  patterns, codes 0…9): 10-bin histogram normalised to sum 1.
* **Nuclei**: H optical density smoothed (Gaussian, σ = 1 px), thresholded at
  ``max(Otsu(H over tissue pixels), min_hematoxylin_od)`` (Otsu, IEEE SMC 9:62, 1979; the floor, default
  0.05 OD, keeps Otsu from splitting nuclei-free stroma into "nuclei"), restricted to tissue pixels;
  objects smaller than ``min_nucleus_area_um2`` µm² (default 10 µm² = 12.5 px at 0.893 µm/px) are
  removed; 8-connected components (``skimage.measure.label``) are nuclei; area and eccentricity as in
  ``regionprops`` (computed vectorised, :func:`region_area_eccentricity`).
  Features: nuclei per mm² of tissue, mean nucleus area (µm²), mean eccentricity (0 = circle), and the
  nuclear fraction of the tissue area. Touching nuclei are not split (no watershed), so the count is a
  lower bound in dense regions; the nuclear area fraction is not affected. Nuclear features are only
  computed when the tissue fraction is at least ``min_tissue_fraction`` (default 0.05); otherwise, and
  when no nucleus is found, they are 0.

Patches whose tissue fraction is below ``min_tissue_fraction`` are still described (and counted in the
log). A patch with any non-finite feature gets an all-NaN row (counted in the log; the align rule drops
NaN rows, logged). Features are **not standardised** here: they have very different units, and the
probes and alignment methods standardise their inputs themselves.

Table columns are ``f0 … f{d-1}``; their meanings are :data:`FEATURE_NAMES` (default parameters) or
:func:`feature_names` (other ``glcm_distances``), returned in ``df.attrs["feature_names"]``.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from ..io import embedding_frame
from ..data.patches import patch_reader
from . import EncodeContext, register

log = logging.getLogger(__name__)

DEFAULTS = {
    "glcm_distances": [1, 3],
    "lbp_radius": 1.0,
    "background_threshold": 220,
    "black_threshold": 20,
    "min_nucleus_area_um2": 10.0,
    "min_hematoxylin_od": 0.05,
    "min_tissue_fraction": 0.05,
}

GLCM_LEVELS = 64
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
LBP_POINTS = 8
LBP_BINS = LBP_POINTS + 2  # "uniform" codes 0..P+1
STAINS = ("H", "E", "DAB")
STAIN_STATS = ("mean", "std", "p10", "p50", "p90")


def feature_names(glcm_distances=(1, 3)) -> list[str]:
    """Names of the morphology features, in column order, for the given GLCM distances (px)."""
    names = [f"{s}_od_{st}" for s in STAINS for st in STAIN_STATS]
    names += [f"{c}_{st}" for st in ("mean", "std") for c in ("R", "G", "B")]
    names += ["tissue_fraction"]
    names += [f"glcm_{pr.lower()}_d{int(d)}" for d in glcm_distances for pr in GLCM_PROPS]
    names += [f"lbp_u{k}" for k in range(LBP_BINS)]
    names += ["nuclei_per_mm2_tissue", "nucleus_mean_area_um2", "nucleus_mean_eccentricity", "nuclear_area_fraction"]
    return names


FEATURE_NAMES = feature_names(DEFAULTS["glcm_distances"])


def check_params(params: dict | None) -> dict:
    """Merge ``params`` over :data:`DEFAULTS`; raise ValueError naming unknown or invalid keys."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"encoders.morphology: unknown parameter(s) {unknown}; allowed: {sorted(DEFAULTS)} "
            "(fix config encoders.morphology)"
        )
    p = {**DEFAULTS, **params}
    d = p["glcm_distances"]
    if not isinstance(d, (list, tuple)) or not d or any(int(x) != x or int(x) < 1 for x in d):
        raise ValueError(f"encoders.morphology.glcm_distances must be a non-empty list of positive ints, got {d!r}")
    p["glcm_distances"] = [int(x) for x in d]
    if not float(p["lbp_radius"]) > 0:
        raise ValueError(f"encoders.morphology.lbp_radius must be > 0 px, got {p['lbp_radius']!r}")
    for k in ("background_threshold", "black_threshold"):
        if not 0 <= int(p[k]) <= 255:
            raise ValueError(f"encoders.morphology.{k} must be in 0..255, got {p[k]!r}")
    if float(p["min_nucleus_area_um2"]) < 0 or float(p["min_hematoxylin_od"]) < 0:
        raise ValueError("encoders.morphology.min_nucleus_area_um2 and min_hematoxylin_od must be >= 0")
    if not 0 <= float(p["min_tissue_fraction"]) <= 1:
        raise ValueError(f"encoders.morphology.min_tissue_fraction must be in [0, 1], got {p['min_tissue_fraction']!r}")
    return p


def region_area_eccentricity(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Area (px) and eccentricity of every region 1..max of a 2-D label image, vectorised over regions.

    Same definitions as ``skimage.measure.regionprops`` (``area``, ``eccentricity``): eccentricity
    = sqrt(1 − λ₂/λ₁), λ₁ ≥ λ₂ the eigenvalues of the covariance matrix of the region's pixel
    coordinates (its inertia tensor, Burger & Burge, Digital Image Processing, section 11.4), 0 for a disk and
    a single pixel. ``regionprops`` loops over regions in Python, which costs ~10 ms per patch with
    ~100 nuclei; ``np.bincount`` over all pixels costs ~0.5 ms. Returns two (max(lab),) float arrays;
    labels without pixels get area 0 and eccentricity NaN.
    """
    n = int(lab.max())
    rr, cc = np.nonzero(lab)
    lv = lab[rr, cc]
    area = np.bincount(lv, minlength=n + 1)[1:].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mr = np.bincount(lv, rr, n + 1)[1:] / area
        mc = np.bincount(lv, cc, n + 1)[1:] / area
        dr, dc = rr - mr[lv - 1], cc - mc[lv - 1]
        vrr = np.bincount(lv, dr * dr, n + 1)[1:] / area
        vcc = np.bincount(lv, dc * dc, n + 1)[1:] / area
        vrc = np.bincount(lv, dr * dc, n + 1)[1:] / area
        half_tr = (vrr + vcc) / 2
        root = np.sqrt(((vrr - vcc) / 2) ** 2 + vrc**2)
        l1, l2 = half_tr + root, half_tr - root
        ecc = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / np.where(l1 > 0, l1, 1), 0, 1)), 0.0)
    ecc[area == 0] = np.nan
    return area, ecc


def patch_features(patch: np.ndarray, um_per_px: float, params: dict | None = None) -> np.ndarray:
    """Morphology feature vector of one RGB patch (see module docstring for each feature and its source).

    Parameters
    ----------
    patch : (H, W, 3) uint8 RGB array (H, W ≥ 8).
    um_per_px : µm per patch pixel (``patch_um / patch_px`` for resampled spot patches); converts
        nucleus areas to µm² and the tissue area to mm².
    params : overrides of :data:`DEFAULTS` (validated by :func:`check_params`).

    Returns
    -------
    (len(feature_names(params["glcm_distances"])),) float64 array, in :func:`feature_names` order.

    Raises ValueError for a patch that is not (H, W, 3) uint8 or a non-positive ``um_per_px``.
    """
    from scipy import ndimage
    from skimage.color import rgb2gray, rgb2hed
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
    from skimage.filters import threshold_otsu
    from skimage.measure import label
    from skimage.morphology import remove_small_objects

    p = check_params(params)
    patch = np.asarray(patch)
    if patch.ndim != 3 or patch.shape[2] != 3 or patch.dtype != np.uint8 or min(patch.shape[:2]) < 8:
        raise ValueError(f"patch must be an (H, W, 3) uint8 array with H, W >= 8, got {patch.shape} {patch.dtype}")
    if not um_per_px > 0:
        raise ValueError(f"um_per_px must be > 0, got {um_per_px}")
    feats: list[float] = []

    # background: glass (near-white) or the black margin of some downscaled slide images (near-black);
    # black margins are painted white so that both conventions look like glass to every feature below
    r, g, b = np.ascontiguousarray(patch.reshape(-1, 3).T)
    white = np.minimum(np.minimum(r, g), b) > p["background_threshold"]
    black = np.maximum(np.maximum(r, g), b) < p["black_threshold"]
    if black.any():
        patch = patch.copy()
        patch.reshape(-1, 3)[black] = 255
        r, g, b = np.ascontiguousarray(patch.reshape(-1, 3).T)
    tissue = ~(white | black).reshape(patch.shape[:2])
    n_tissue = int(tissue.sum())
    tissue_fraction = n_tissue / tissue.size

    # stain optical densities (Ruifrok & Johnston 2001)
    hed = rgb2hed(patch)
    hed_c = np.ascontiguousarray(hed.reshape(-1, 3).T)  # (3 stains, n_px): channel-contiguous is ~10x faster
    pct = np.percentile(hed_c, [10, 50, 90], axis=1)  # (3 pct, 3 stains)
    mean, std = hed_c.mean(axis=1), hed_c.std(axis=1)
    for c in range(3):
        feats += [mean[c], std[c], pct[0, c], pct[1, c], pct[2, c]]

    # colour and tissue fraction
    rgb_c = np.stack([r, g, b]).astype(np.float64)
    feats += list(rgb_c.mean(axis=1)) + list(rgb_c.std(axis=1))
    feats.append(tissue_fraction)

    # GLCM texture (Haralick 1973), averaged over angles, per distance
    grey = rgb2gray(patch)  # float in [0, 1]
    grey_u8 = np.round(grey * 255).astype(np.uint8)
    q = grey_u8 // (256 // GLCM_LEVELS)  # 64 grey levels
    glcm = graycomatrix(q, distances=p["glcm_distances"], angles=GLCM_ANGLES, levels=GLCM_LEVELS,
                        symmetric=True, normed=True)
    props = np.stack([graycoprops(glcm, pr) for pr in GLCM_PROPS])  # (n_props, n_dist, n_angles)
    feats += list(props.mean(axis=2).T.ravel())  # distance-major, as in feature_names

    # LBP texture (Ojala 2002), rotation-invariant uniform codes 0..P+1
    lbp = local_binary_pattern(grey_u8, LBP_POINTS, float(p["lbp_radius"]), method="uniform")
    hist = np.bincount(lbp.astype(np.int64).ravel(), minlength=LBP_BINS)[:LBP_BINS]
    feats += list(hist / hist.sum())

    # nuclei from the haematoxylin channel
    density = mean_area = mean_ecc = nuc_frac = 0.0
    if n_tissue > 0 and tissue_fraction >= p["min_tissue_fraction"]:
        h = ndimage.gaussian_filter(hed[..., 0], sigma=1.0)
        h_t = h[tissue]
        thr = float(p["min_hematoxylin_od"])
        if h_t.max() - h_t.min() > 1e-6:
            thr = max(thr, float(threshold_otsu(h_t)))
        nuclei = (h > thr) & tissue
        min_px = float(p["min_nucleus_area_um2"]) / um_per_px**2
        if min_px > 1:  # drop objects with area < min_px (remove_small_objects drops area <= max_size)
            nuclei = remove_small_objects(nuclei, max_size=int(np.ceil(min_px)) - 1, connectivity=2)
        lab = label(nuclei, connectivity=2)
        n_nuc = int(lab.max())
        px_area_um2 = um_per_px**2
        nuc_frac = float(nuclei.sum()) / n_tissue
        if n_nuc:
            area, ecc = region_area_eccentricity(lab)
            mean_area = float(area.mean()) * px_area_um2
            mean_ecc = float(ecc.mean())
            density = n_nuc / (n_tissue * px_area_um2 * 1e-6)  # nuclei per mm² of tissue
    feats += [density, mean_area, mean_ecc, nuc_frac]
    return np.asarray(feats, dtype=np.float64)


@register("morphology", "img", description="interpretable H&E features (stains, colour, texture, nuclei)")
def encode_morphology(adata, params: dict, ctx: EncodeContext) -> pd.DataFrame:
    """Morphology features of every spot's H&E patch (see module docstring for each feature and its source).

    Parameters
    ----------
    adata : spots AnnData with ``obs`` px_x/px_y/slide and ``uns['slides']`` (see
        :mod:`workflow_scripts.data.model`).
    params : overrides of :data:`DEFAULTS` (``glcm_distances`` px, ``lbp_radius`` px,
        ``background_threshold`` / ``black_threshold`` 0–255, ``min_nucleus_area_um2`` µm²,
        ``min_hematoxylin_od`` OD, ``min_tissue_fraction``); ``{}`` uses the defaults.
    ctx : :class:`EncodeContext`; ``patch_um`` (µm) and ``patch_px`` (px) set the patch geometry.

    Returns
    -------
    DataFrame (n_spots, n_features) float32 indexed by spot id, in ``adata.obs`` order; columns f0…,
    named by ``df.attrs["feature_names"]``. Rows with a non-finite feature are all-NaN (logged).

    Raises ValueError for invalid params; FileNotFoundError (from the patch reader) for a missing slide image.
    """
    from tqdm.auto import tqdm

    p = check_params(params)
    names = feature_names(p["glcm_distances"])
    um_per_px = float(ctx.patch_um) / int(ctx.patch_px)
    log.info(
        "morphology: %d spots, %g µm patches at %d px (%.3f µm/px), min nucleus area %g µm² = %.1f px",
        adata.n_obs, ctx.patch_um, ctx.patch_px, um_per_px, p["min_nucleus_area_um2"],
        p["min_nucleus_area_um2"] / um_per_px**2,
    )
    reader = patch_reader(adata, ctx.patch_um, ctx.patch_px)
    values = np.full((adata.n_obs, len(names)), np.nan, dtype=np.float64)
    t0 = time.perf_counter()
    t_feat = 0.0
    for i in tqdm(reader.order(), total=len(reader), desc="morphology", unit="patch", mininterval=2.0):
        patch = reader[int(i)]
        t1 = time.process_time()
        values[i] = patch_features(patch, um_per_px, p)
        t_feat += time.process_time() - t1
    n = max(adata.n_obs, 1)
    log.info(
        "morphology: %d patches in %.1f s wall (features %.1f ms CPU per patch); "
        "%d patches extend past the image border (white-filled)",
        adata.n_obs, time.perf_counter() - t0, 1e3 * t_feat / n, reader.n_border,
    )
    tf = values[:, names.index("tissue_fraction")]
    n_bg = int((tf < p["min_tissue_fraction"]).sum())
    if n_bg:
        log.warning("morphology: %d of %d patches are background (tissue fraction < %.2f); features kept",
                    n_bg, adata.n_obs, p["min_tissue_fraction"])
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        cols = [names[j] for j in np.flatnonzero(~np.isfinite(values[bad]).all(axis=0))]
        log.warning("morphology: %d of %d patches have non-finite features %s; set to NaN rows",
                    int(bad.sum()), adata.n_obs, cols)
        values[bad] = np.nan
    df = embedding_frame(values, adata.obs_names)
    df.attrs.update(feature_names=names, params=p, um_per_px=um_per_px, n_background=n_bg)
    return df
