"""Tests of the two offline default encoders: ``pca`` (GEX) and ``morphology`` (H&E)."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image
from skimage.draw import disk
from sklearn.metrics import roc_auc_score

from workflow_scripts.encoders import EncodeContext, get_encoder
from workflow_scripts.encoders.morphology import (
    FEATURE_NAMES,
    GLCM_ANGLES,
    feature_names,
    patch_features,
    region_area_eccentricity,
)

PINK = (232, 160, 205)
PURPLE = (70, 40, 120)
UM_PER_PX = 200 / 224


# ----------------------------------------------------------------------------------------------- pca
def _toy_counts(n_per_group=40, n_genes=300, seed=0):
    """Poisson counts with two planted programmes: group 0 up-regulates genes 0-29, group 1 genes 30-59."""
    rng = np.random.default_rng(seed)
    n = 2 * n_per_group
    group = np.repeat([0, 1], n_per_group)
    base = rng.gamma(2.0, 1.0, size=n_genes)
    rate = np.tile(base, (n, 1))
    rate[group == 0, :30] *= 6
    rate[group == 1, 30:60] *= 6
    lib = rng.uniform(0.5, 1.5, size=(n, 1))
    X = rng.poisson(rate * lib).astype(np.float32)
    X[:, -1] = 0  # one gene never detected
    a = ad.AnnData(
        X=sp.csr_matrix(X),
        obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )
    return a, group


def test_pca_registered_and_pc1_separates_programmes():
    spec = get_encoder("pca")
    assert spec.modality == "gex"
    a, group = _toy_counts()
    df = spec.fn(a, {"target_sum": 1e4, "n_top_genes": 100, "n_comps": 10}, EncodeContext(seed=0))
    assert df.shape == (a.n_obs, 10)
    assert list(df.index) == list(a.obs_names)
    assert list(df.columns) == [f"f{i}" for i in range(10)]
    assert df.attrs["n_hvg"] == 100 and df.attrs["feature_names"][0] == "PC1"
    auc = roc_auc_score(group, df["f0"].to_numpy())
    assert max(auc, 1 - auc) > 0.99, auc
    # later PCs carry no group signal beyond noise
    auc9 = roc_auc_score(group, df["f9"].to_numpy())
    assert max(auc9, 1 - auc9) < 0.9


def test_pca_deterministic_and_logs_dropped_genes(caplog):
    a, _ = _toy_counts()
    fn = get_encoder("pca").fn
    with caplog.at_level(logging.INFO, logger="workflow_scripts.encoders.pca"):
        d1 = fn(a, {"n_top_genes": 100, "n_comps": 5}, EncodeContext(seed=3))
    d2 = fn(a, {"n_top_genes": 100, "n_comps": 5}, EncodeContext(seed=3))
    np.testing.assert_array_equal(d1.to_numpy(), d2.to_numpy())
    assert "1 of 300 genes are detected in 0 spots" in caplog.text
    assert "100 highly variable genes" in caplog.text


def test_pca_clips_n_comps_with_log(caplog):
    a, _ = _toy_counts(n_per_group=10)  # 20 spots
    with caplog.at_level(logging.WARNING, logger="workflow_scripts.encoders.pca"):
        df = get_encoder("pca").fn(a, {"n_top_genes": 50, "n_comps": 50}, EncodeContext())
    assert df.shape == (20, 19)  # min(50, 20 - 1, 50 - 1)
    assert "n_comps clipped from 50 to 19" in caplog.text
    assert np.isfinite(df.to_numpy()).all()


def test_pca_zero_count_spot_gives_nan_row(caplog):
    a, _ = _toy_counts()
    X = a.X.toarray()
    X[5] = 0
    a.X = sp.csr_matrix(X)
    with caplog.at_level(logging.WARNING, logger="workflow_scripts.encoders.pca"):
        df = get_encoder("pca").fn(a, {"n_top_genes": 100, "n_comps": 5}, EncodeContext())
    assert df.shape == (a.n_obs, 5)
    assert df.loc["s5"].isna().all()
    assert np.isfinite(df.drop(index="s5").to_numpy()).all()
    assert "1 of 80 spots have zero total counts" in caplog.text


def test_pca_rejects_unknown_param():
    a, _ = _toy_counts(n_per_group=5)
    with pytest.raises(ValueError, match="n_pcs"):
        get_encoder("pca").fn(a, {"n_pcs": 5}, EncodeContext())


# ---------------------------------------------------------------------------------------- morphology
def _tissue_patch(n_nuclei, size=224, radius=4, seed=0):
    """Pink (eosin) patch with ``n_nuclei`` non-overlapping dark-purple disks on a jittered grid."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), dtype=np.float64)
    img[:] = PINK
    img += rng.normal(0, 4, img.shape)
    step = 20
    centres = [(r, c) for r in range(step // 2, size - radius, step) for c in range(step // 2, size - radius, step)]
    picks = rng.choice(len(centres), size=n_nuclei, replace=False)
    for k in picks:
        r, c = centres[k]
        rr, cc = disk((r + rng.integers(-3, 4), c + rng.integers(-3, 4)), radius, shape=(size, size))
        img[rr, cc] = PURPLE
    return np.clip(img, 0, 255).astype(np.uint8)


def _f(vec, name, names=FEATURE_NAMES):
    return vec[names.index(name)]


def test_nuclear_density_counts_planted_nuclei():
    few, many = _tissue_patch(8, seed=1), _tissue_patch(40, seed=2)
    f_few, f_many = patch_features(few, UM_PER_PX), patch_features(many, UM_PER_PX)
    assert f_few.shape == f_many.shape == (len(FEATURE_NAMES),)
    tissue_mm2 = (224 * UM_PER_PX) ** 2 * 1e-6  # whole patch is tissue
    assert _f(f_few, "tissue_fraction") == pytest.approx(1.0)
    # hand computation: nuclei per mm² of tissue = planted count / tissue area
    assert _f(f_few, "nuclei_per_mm2_tissue") * tissue_mm2 == pytest.approx(8, abs=0.01)
    assert _f(f_many, "nuclei_per_mm2_tissue") * tissue_mm2 == pytest.approx(40, abs=0.01)
    assert _f(f_many, "nuclear_area_fraction") > 3 * _f(f_few, "nuclear_area_fraction")
    disk_um2 = np.pi * 4**2 * UM_PER_PX**2  # ~40 µm²
    assert _f(f_many, "nucleus_mean_area_um2") == pytest.approx(disk_um2, rel=0.3)
    assert _f(f_many, "nucleus_mean_eccentricity") < 0.4
    assert _f(f_many, "H_od_p90") > _f(f_few, "H_od_p90")


def test_min_nucleus_area_is_in_um2():
    patch = _tissue_patch(20, radius=4, seed=3)  # disks of ~49 px = ~39 µm² at 0.893 µm/px
    tissue_mm2 = (224 * UM_PER_PX) ** 2 * 1e-6
    f30 = patch_features(patch, UM_PER_PX, {"min_nucleus_area_um2": 30.0})
    f60 = patch_features(patch, UM_PER_PX, {"min_nucleus_area_um2": 60.0})
    assert _f(f30, "nuclei_per_mm2_tissue") * tissue_mm2 == pytest.approx(20, abs=0.01)
    assert _f(f60, "nuclei_per_mm2_tissue") == 0
    # same disks at twice the pixel size (1.786 µm/px) are 4x larger in µm² and survive the 60 µm² cut
    f60_coarse = patch_features(patch, 2 * UM_PER_PX, {"min_nucleus_area_um2": 60.0})
    assert _f(f60_coarse, "nuclei_per_mm2_tissue") * tissue_mm2 * 4 == pytest.approx(20, abs=0.01)


def test_white_patch_is_background():
    white = np.full((224, 224, 3), 250, dtype=np.uint8)
    f = patch_features(white, UM_PER_PX)
    assert len(f) == len(FEATURE_NAMES)
    assert np.isfinite(f).all()
    assert _f(f, "tissue_fraction") == pytest.approx(0.0)
    assert _f(f, "nuclei_per_mm2_tissue") == 0 and _f(f, "nuclear_area_fraction") == 0
    half = _tissue_patch(30)
    half[:, :112] = 250
    assert _f(patch_features(half, UM_PER_PX), "tissue_fraction") == pytest.approx(0.5, abs=0.01)


def test_black_margin_is_treated_like_glass():
    tissue = _tissue_patch(30)
    on_glass, on_black = tissue.copy(), tissue.copy()
    on_glass[150:] = 255
    on_black[150:] = 0
    f_glass, f_black = patch_features(on_glass, UM_PER_PX), patch_features(on_black, UM_PER_PX)
    assert _f(f_black, "tissue_fraction") == pytest.approx(150 / 224, abs=1e-9)
    np.testing.assert_allclose(f_black, f_glass, rtol=1e-9, atol=1e-12)


def test_texture_features_invariant_to_rotation():
    from skimage.color import rgb2gray
    from skimage.feature import graycomatrix, graycoprops

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:224, :224]
    stripes = 128 + 60 * np.sin(xx / 2.0) + rng.normal(0, 4, (224, 224))  # strongly anisotropic
    grey = np.clip(stripes, 0, 255)
    patch = np.stack([grey, grey * 0.7, grey * 0.9], axis=2).astype(np.uint8)
    rot = np.ascontiguousarray(np.rot90(patch))
    # per-angle contrast differs a lot, so the invariance below comes from averaging over angles
    q = (np.round(rgb2gray(patch) * 255).astype(np.uint8)) // 4
    per_angle = graycoprops(graycomatrix(q, [1], GLCM_ANGLES, levels=64, symmetric=True, normed=True), "contrast")[0]
    assert per_angle.max() > 3 * per_angle.min()
    f, fr = patch_features(patch, UM_PER_PX), patch_features(rot, UM_PER_PX)
    tex = [i for i, n in enumerate(FEATURE_NAMES) if n.startswith(("glcm_", "lbp_"))]
    assert len(tex) == 12 + 10
    np.testing.assert_allclose(fr[tex], f[tex], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(fr, f, rtol=1e-6, atol=1e-6)  # colour/stain stats are permutation-invariant


def test_region_area_eccentricity_matches_regionprops():
    from skimage.measure import label, regionprops_table

    rng = np.random.default_rng(1)
    lab = label(rng.random((120, 120)) > 0.55, connectivity=2)
    area, ecc = region_area_eccentricity(lab)
    ref = regionprops_table(lab, properties=("area", "eccentricity"))
    np.testing.assert_array_equal(area, ref["area"])
    np.testing.assert_allclose(ecc, ref["eccentricity"], atol=1e-9)


def test_params_override_and_validation():
    patch = _tissue_patch(10)
    names = feature_names([1, 2, 5])
    assert len(patch_features(patch, UM_PER_PX, {"glcm_distances": [1, 2, 5]})) == len(names) == len(FEATURE_NAMES) + 6
    with pytest.raises(ValueError, match="lbp_points"):
        patch_features(patch, UM_PER_PX, {"lbp_points": 16})
    with pytest.raises(ValueError, match="uint8"):
        patch_features(patch.astype(float), UM_PER_PX)


def _spots_with_slide(tmp_path):
    """A 400 × 300 px synthetic slide at 1 µm/px: dense nuclei on the left, sparse in the middle, glass right."""
    slide = np.full((300, 400, 3), 250, dtype=np.uint8)
    slide[:, :150] = _tissue_patch(120, size=300, seed=4)[:, :150]
    slide[:, 150:300] = _tissue_patch(12, size=300, seed=5)[:, 150:]
    path = tmp_path / "slide.png"
    Image.fromarray(slide).save(path)
    px = np.array([[75, 75], [75, 225], [225, 75], [225, 225], [360, 150]], dtype=float)  # x = column, y = row
    obs = pd.DataFrame(
        {"slide": pd.Categorical(["S1"] * 5), "donor": "D", "x_um": px[:, 0], "y_um": px[:, 1],
         "px_x": px[:, 0], "px_y": px[:, 1], "split": "eval"},
        index=[f"S1_spot{i}" for i in range(5)],
    )
    a = ad.AnnData(X=sp.csr_matrix((5, 3), dtype=np.float32), obs=obs)
    a.uns["slides"] = {"S1": {"image_path": str(path), "um_per_px": 1.0}}
    return a


def test_morphology_encoder_end_to_end(tmp_path, caplog):
    spec = get_encoder("morphology")
    assert spec.modality == "img"
    a = _spots_with_slide(tmp_path)
    ctx = EncodeContext(patch_um=100.0, patch_px=112)
    with caplog.at_level(logging.INFO, logger="workflow_scripts.encoders.morphology"):
        df = spec.fn(a, {}, ctx)
    assert list(df.index) == list(a.obs_names) and df.index.name == "spot_id"
    assert df.shape == (5, len(FEATURE_NAMES))
    assert df.attrs["feature_names"] == FEATURE_NAMES
    assert np.isfinite(df.to_numpy()).all()
    dens = df[f"f{FEATURE_NAMES.index('nuclei_per_mm2_tissue')}"]
    tf = df[f"f{FEATURE_NAMES.index('tissue_fraction')}"]
    assert min(dens["S1_spot0"], dens["S1_spot1"]) > 2 * max(dens["S1_spot2"], dens["S1_spot3"])
    assert tf["S1_spot4"] < 0.05 and tf["S1_spot0"] > 0.95
    assert "1 of 5 patches are background" in caplog.text
