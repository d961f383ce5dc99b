"""Tests of the Visium reader (spatialdata-io for Space Ranger outs) on scanpy's Space Ranger fixture
(tests/data/visium_toy), of a CELLxGENE-style h5ad, and of the SpatialData output for spots."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import yaml
from scipy.spatial import cKDTree

from workflow_scripts.data import visium
from workflow_scripts.data.model import validate_spots

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "tests/data/visium_toy/1.0.0"
GENE_MAP = REPO / "resources/gene_maps/10x_GRCh38_features.tsv.gz"
CLASSES = ["Capsular", "Cortical CMJ", "Cortical level 1", "Cortical level 2", "Cortical level 3", "Medullar CMJ",
           "Medullar level 1", "Medullar level 2", "Medullar level 3", "Sub-Capsular", "unassigned"]


def _positions() -> dict[str, list[str]]:
    with open(TOY / "spatial/tissue_positions_list.csv") as fh:
        return {row[0]: row for row in csv.reader(fh)}


def _scalefactors() -> dict:
    return json.loads((TOY / "spatial/scalefactors_json.json").read_text())


@pytest.fixture()
def outs_dataset(tmp_path):
    shutil.copytree(TOY, tmp_path / "S1/outs")
    barcodes = sc.read_10x_h5(TOY / "filtered_feature_bc_matrix.h5").obs_names
    raw = ["cortical_level_1", "Medullar-CMJ", "Sub-Capsular", "no such class"]
    labels = pd.DataFrame({"cma": [raw[i % 4] for i in range(len(barcodes))]}, index=barcodes)
    labels.iloc[:3] = None  # unlabeled spots
    labels.to_csv(tmp_path / "S1/labels.csv")
    params = {
        "reader": "visium", "name": "toy_thymus", "raw_dir": str(tmp_path),
        "splits": {"train": ["OTHER"], "test": ["S1"]}, "build_splits": ["test"],
        "files": {"outs": "{sample}/outs", "labels": "{sample}/labels.csv", "image": "hires"},
        "label_col": "cma", "annotation_classes": CLASSES, "unannotated_class": "unassigned",
        "excluded_classes": [10], "gene_map": str(GENE_MAP), "patch_um": 116.3,
    }
    return params, labels


def test_spaceranger_outs_to_spots(outs_dataset):
    params, labels = outs_dataset
    spots, cells = visium.build_dataset(params, seed=0)
    assert cells is None
    validate_spots(spots, source="toy visium", check_images=True)
    assert spots.n_obs == 100 and spots.n_vars == 100
    sf = _scalefactors()
    # spot_diameter_fullres spans a theoretical 65 µm spot (10x); the physical spot is 55 µm
    um_full = 65.0 / sf["spot_diameter_fullres"]
    pos = _positions()
    # one spot checked against the positions file: x = pxl_col_in_fullres, y = pxl_row_in_fullres
    for i in (0, 57):
        obs = spots.obs.iloc[i]
        row = pos[obs["barcode"]]
        pxl_row, pxl_col = float(row[4]), float(row[5])
        assert obs["px_x"] == pytest.approx(pxl_col * sf["tissue_hires_scalef"])
        assert obs["px_y"] == pytest.approx(pxl_row * sf["tissue_hires_scalef"])
        assert obs["x_um"] == pytest.approx(pxl_col * um_full)
        assert (obs["array_row"], obs["array_col"]) == (int(row[2]), int(row[3]))
    assert spots.uns["slides"]["S1"]["um_per_px"] == pytest.approx(um_full / sf["tissue_hires_scalef"])
    assert spots.uns["slides"]["S1"]["image_path"].endswith("tissue_hires_image.png")
    # physical scale: Visium spot centres are 100 µm apart along a row (array_col step 2)
    o = spots.obs
    pairs = o.reset_index().merge(o.reset_index(), on="array_row")
    pairs = pairs[pairs["array_col_y"] - pairs["array_col_x"] == 2]
    assert len(pairs) >= 1
    d = np.hypot(pairs["x_um_x"] - pairs["x_um_y"], pairs["y_um_x"] - pairs["y_um_y"])
    assert np.allclose(d, 100.0, rtol=0.02), d.tolist()
    assert visium.grid_pitch_px(visium.read_spaceranger(TOY, "S1")[0].obs) * um_full == pytest.approx(
        100.0, rel=0.02)
    # gene symbols from the 10x GRCh38 table, Ensembl ids kept
    assert spots.var_names[0] == "MIR1302-2HG" and spots.var["gene_ids"].iloc[0] == "ENSG00000243485"
    # labels: spelling variants mapped, unknown and missing -> unassigned
    want = labels["cma"].map({"cortical_level_1": "Cortical level 1", "Medullar-CMJ": "Medullar CMJ",
                              "Sub-Capsular": "Sub-Capsular"}).fillna("unassigned")
    assert (spots.obs["region"].astype(str).to_numpy() == want.to_numpy()).all()
    assert list(spots.obs["region"].cat.categories) == CLASSES
    assert spots.uns["excluded_classes"] == ["unassigned"]
    # counts are the raw matrix
    raw = sc.read_10x_h5(TOY / "filtered_feature_bc_matrix.h5")
    assert np.array_equal(spots.X.toarray(), raw.X.toarray())


def test_spaceranger_scale_factors_and_off_tissue_spots(outs_dataset, caplog):
    params, _ = outs_dataset
    outs = Path(params["raw_dir"]) / "S1/outs"
    _, sf = visium.read_spaceranger(outs, "S1")
    want = _scalefactors()  # spatialdata-io turns them into circle radii and image transformations
    for k in ("spot_diameter_fullres", "tissue_hires_scalef", "tissue_lowres_scalef"):
        assert sf[k] == pytest.approx(want[k], rel=1e-9), k
    # a spot that Space Ranger marks outside the tissue is dropped, with a log line
    pos = pd.read_csv(outs / "spatial/tissue_positions_list.csv", header=None)
    barcode = sc.read_10x_h5(outs / "filtered_feature_bc_matrix.h5").obs_names[4]
    pos.loc[pos[0] == barcode, 1] = 0
    pos.to_csv(outs / "spatial/tissue_positions_list.csv", header=False, index=False)
    with caplog.at_level("INFO", logger="workflow_scripts.data.visium"):
        a, _ = visium.read_spaceranger(outs, "S1")
    assert a.n_obs == 99 and barcode not in a.obs_names
    assert "1 spots outside tissue dropped" in caplog.text


def test_sdata_zarr_of_the_spots(outs_dataset, tmp_path):
    """The SpatialData output: the lowres H&E, one 55 µm circle per spot on its pixel, a labelled table."""
    import spatialdata
    from spatialdata.transformations import get_transformation_between_coordinate_systems

    from workflow_scripts.data.sdata import build_sdata, write_sdata

    params, _ = outs_dataset
    params["files"]["image"] = "lowres"
    spots, _ = visium.build_dataset(params, seed=0)
    um = spots.uns["slides"]["S1"]["um_per_px"]
    assert um > 2.0  # the lowres image is coarser than the 2 µm/px target: written as is
    write_sdata(spots, tmp_path / "sdata.zarr")
    sd = spatialdata.read_zarr(tmp_path / "sdata.zarr")
    assert sd.images["he_S1"].shape == (3, 600, 600)
    circles = sd.shapes["spots_S1"]
    assert len(circles) == spots.n_obs == 100 and np.allclose(circles["radius"], 55.0 / 2)
    table = sd.tables["table"]
    assert table.uns["spatialdata_attrs"]["region"] == ["spots_S1"]
    assert list(table.obs_names) == list(spots.obs_names)
    lab = spatialdata.get_values(value_key="region", sdata=sd, element_name="spots_S1", table_name="table")
    assert (lab["region"].astype(str).to_numpy() == spots.obs["region"].astype(str).to_numpy()).all()
    # circle centres land on the spots' pixels of the image (µm -> lowres px)
    M = get_transformation_between_coordinate_systems(sd, circles, sd.images["he_S1"], "S1").to_affine_matrix(
        ("x", "y"), ("x", "y"))
    xy = np.stack([circles.geometry.x, circles.geometry.y], axis=1) @ M[:2, :2].T + M[:2, 2]
    assert np.allclose(xy, spots.obs[["px_x", "px_y"]].to_numpy(), atol=1e-6)
    img = np.asarray(sd.images["he_S1"])
    from PIL import Image

    ref = np.asarray(Image.open(TOY / "spatial/tissue_lowres_image.png").convert("RGB"))
    assert np.array_equal(np.moveaxis(img, 0, 2), ref)
    # the in-memory object holds what write_sdata wrote slide by slide
    mem = build_sdata(spots)
    assert set(mem.images) == set(sd.images) and set(mem.shapes) == set(sd.shapes)
    assert np.array_equal(np.asarray(mem.images["he_S1"]), img)


def test_input_files_list_what_prepare_reads(outs_dataset):
    params, _ = outs_dataset
    files = visium.input_files(params)
    assert [Path(f).name for f in files] == ["filtered_feature_bc_matrix.h5", "scalefactors_json.json", "labels.csv",
                                            "tissue_hires_image.png"]
    assert all(Path(f).exists() for f in files)


def test_lowres_image_and_configured_resolution(outs_dataset):
    params, _ = outs_dataset
    params["files"]["image"] = "lowres"
    params["um_per_px"] = 0.62
    spots, _ = visium.build_dataset(params, seed=0)
    sf = _scalefactors()
    assert spots.uns["slides"]["S1"]["um_per_px"] == pytest.approx(0.62 / sf["tissue_lowres_scalef"])
    p = _positions()[spots.obs["barcode"].iloc[3]]
    assert spots.obs["px_y"].iloc[3] == pytest.approx(float(p[4]) * sf["tissue_lowres_scalef"])
    assert spots.obs["y_um"].iloc[3] == pytest.approx(float(p[4]) * 0.62)


def test_missing_labels_column_is_explained(outs_dataset):
    params, _ = outs_dataset
    params["files"]["labels"] = None
    with pytest.raises(ValueError, match="no labels"):
        visium.build_dataset(params, seed=0)


def test_cellxgene_style_h5ad_with_two_sections(tmp_path):
    raw = sc.read_10x_h5(TOY / "filtered_feature_bc_matrix.h5")
    pos = _positions()
    xy = np.array([[float(pos[b][5]), float(pos[b][4])] for b in raw.obs_names])
    norm = raw.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    obs = pd.DataFrame({"library_id": np.where(np.arange(raw.n_obs) < 60, "S1", "S2"),
                        "cma_bins": pd.Categorical(np.where(np.arange(raw.n_obs) % 2, "Capsular", "Medullar level 3"))},
                       index=raw.obs_names)
    var = pd.DataFrame({"feature_name": [f"SYM{i}" for i in range(raw.n_vars)]}, index=raw.var["gene_ids"].to_numpy())
    a = ad.AnnData(X=sp.csr_matrix(norm.X), obs=obs, var=var)
    a.raw = ad.AnnData(X=sp.csr_matrix(raw.X), obs=obs, var=var)
    a.obsm["spatial"] = xy
    a.uns["spatial"] = {"S1": {"scalefactors": _scalefactors()}, "S2": {"scalefactors": _scalefactors()}}
    a.write_h5ad(tmp_path / "thymus.h5ad")
    shutil.copy(TOY / "spatial/tissue_lowres_image.png", tmp_path / "he.png")
    params = {
        "reader": "visium", "raw_dir": str(tmp_path), "splits": {"test": ["S1", "S2"]},
        "files": {"h5ad": "thymus.h5ad", "image": "he.png"}, "h5ad_sample_col": "library_id",
        "label_col": "cma_bins", "annotation_classes": CLASSES, "um_per_px": 0.2271, "patch_um": 116.3,
    }
    spots, _ = visium.build_dataset(params, seed=0)
    validate_spots(spots, check_images=True)
    assert spots.obs["slide"].value_counts().to_dict() == {"S1": 60, "S2": 40}
    assert spots.var_names[0] == "SYM0"
    assert np.array_equal(spots.X.toarray(), raw.X.toarray())  # raw counts, not the log-normalised X
    assert np.allclose(spots.obs[["px_x", "px_y"]].to_numpy(), xy)  # full-resolution image: scale 1
    assert np.allclose(spots.obs["x_um"].to_numpy(), xy[:, 0] * 0.2271)
    assert set(spots.obs["region"]) == {"Capsular", "Medullar level 3"}
    params["h5ad_sample_col"] = "nope"
    with pytest.raises(ValueError, match="h5ad_sample_col 'nope'"):
        visium.build_dataset(params, seed=0)


def test_thymus_ring_edges_on_the_visium_grid():
    d = yaml.safe_load((REPO / "config/paper.yaml").read_text())["datasets"]["thymus"]
    edges = np.asarray(d["spatial"]["ring_edges_um"])
    ij = np.stack(np.meshgrid(np.arange(50), np.arange(50)), -1).reshape(-1, 2)
    pts = np.stack([ij[:, 0] * 100.0 + (ij[:, 1] % 2) * 50.0, ij[:, 1] * 100.0 * np.sqrt(3) / 2], axis=1)
    centre = (np.abs(ij - 25) < 2).all(axis=1)
    dist, _ = cKDTree(pts).query(pts[centre], k=400, distance_upper_bound=edges[-1] + 1)
    cum = [(dist[:, 1:] <= e).sum(axis=1).mean() for e in edges[1:]]
    target = np.cumsum(np.arange(8, 72, 8))  # 8, 24, 48, ... neighbours within each outer edge
    assert np.allclose(cum, target, rtol=0.26), cum
