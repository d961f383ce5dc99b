"""The HER2ST reader on the real data shipped in resources/her2st."""

import logging

import numpy as np
import pandas as pd
import pytest

from workflow_scripts.data.her2st import input_files, read_her2st, read_sections_table
from workflow_scripts.data.model import DataModelError, validate_spots


@pytest.fixture(scope="module")
def her2st(repo):
    return read_her2st(repo / "resources/her2st", sections=["A1", "C2"])


def test_sections_table_lists_the_eight_imaged_sections(repo):
    t = read_sections_table(repo / "resources/her2st")
    assert list(t.index) == ["A1", "A2", "B4", "C2", "C3", "C4", "C5", "C6"]
    assert t["n_spots"].sum() == 1864


def test_reader_builds_the_data_model(her2st):
    a = her2st
    assert a.n_obs == 346 + 187
    validate_spots(a)
    assert set(a.obs["slide"].cat.categories) == {"A1", "C2"}
    assert a.obs_names[0].startswith("A1_")
    # composition rows are proportions over the 8 stereoscope major types
    comp = np.asarray(a.obsm["composition"])
    assert comp.shape == (a.n_obs, 8)
    np.testing.assert_allclose(comp.sum(axis=1), 1.0, atol=1e-6)
    assert "Epithelial" in a.uns["composition_names"]
    # dominant cell type is the argmax of the composition
    names = np.asarray(a.uns["composition_names"])
    assert (a.obs["dominant_celltype"].astype(str).to_numpy() == names[comp.argmax(axis=1)]).all()


def test_pathology_labels_only_on_a1(her2st):
    a = her2st
    a1 = a.obs["slide"] == "A1"
    assert a.obs.loc[a1, "pathology"].notna().sum() == 346
    assert a.obs.loc[~a1, "pathology"].isna().all()
    assert (a.obs.loc[a1, "pathology"] == "invasive cancer").sum() > 250


def test_cluster_names_are_harmonised(her2st):
    names = set(her2st.obs["cluster"].dropna().astype(str))
    assert "cancer" in names
    assert not any(n.endswith(("1", "2", "3")) for n in names), names


def test_coordinates_in_um_and_image_pixels(her2st, repo):
    a = her2st
    t = read_sections_table(repo / "resources/her2st")
    c2 = a[a.obs["slide"] == "C2"]
    sp = pd.read_csv(repo / "resources/her2st/spots/C2_selection.tsv", sep="\t")
    row = sp[(sp.x == 25) & (sp.y == 13)].iloc[0]
    o = c2.obs.loc["C2_25x13"]
    assert o.px_x == pytest.approx(row.pixel_x * t.loc["C2", "coord_scale"])
    assert o.x_um == pytest.approx(row.pixel_x * t.loc["C2", "orig_um_per_px"])
    # neighbouring array spots are ~200 µm apart
    xy = c2.obs[["x_um", "y_um"]].to_numpy()
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    assert 150 < np.median(d[:, 1]) < 260


def test_subsampling_is_seeded_and_logged(repo, caplog):
    caplog.set_level(logging.INFO)
    a = read_her2st(repo / "resources/her2st", sections=["C2"], max_spots_per_slide=20, seed=3)
    b = read_her2st(repo / "resources/her2st", sections=["C2"], max_spots_per_slide=20, seed=3)
    assert a.n_obs == 20 and list(a.obs_names) == list(b.obs_names)
    assert "subsampled to 20 of 187" in caplog.text


def test_unknown_section_and_missing_file_errors(repo, tmp_path):
    with pytest.raises(ValueError, match="unknown HER2ST sections"):
        read_her2st(repo / "resources/her2st", sections=["Z9"])
    with pytest.raises(FileNotFoundError, match="sections.tsv"):
        read_her2st(tmp_path)


def test_input_files_name_every_file(repo):
    files = input_files({"reader": "her2st", "resource_dir": str(repo / "resources/her2st"), "sections": ["A1"]})
    assert any(f.endswith("counts/A1.tsv.gz") for f in files)
    assert any(f.endswith("images/A1.png") for f in files)
    assert any(f.endswith("pathology/A1_labeled_coordinates.tsv") for f in files)


def test_validate_rejects_missing_columns_and_images(tiny_spots, tmp_path):
    a = tiny_spots.copy()
    validate_spots(a)
    bad = a.copy()
    del bad.obs["x_um"]
    with pytest.raises(DataModelError, match="x_um"):
        validate_spots(bad, source="bad.h5ad")
    gone = a.copy()
    gone.uns["slides"] = {s: {"image_path": str(tmp_path / "nope.png"), "um_per_px": 1.0} for s in ("S1", "S2")}
    with pytest.raises(FileNotFoundError, match="nope.png"):
        validate_spots(gone)


def _background_fraction(repo, section):
    """Fraction of a section's spot centres whose 5x5-px neighbourhood is slide background (white or black)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    t = read_sections_table(repo / "resources/her2st")
    im = np.asarray(Image.open(repo / "resources/her2st" / t.loc[section, "image_path"]).convert("RGB"))
    sp = pd.read_csv(repo / "resources/her2st" / t.loc[section, "spots_path"], sep="\t")
    k = t.loc[section, "coord_scale"]
    x = np.clip((sp.pixel_x * k).round().astype(int), 0, im.shape[1] - 1)
    y = np.clip((sp.pixel_y * k).round().astype(int), 0, im.shape[0] - 1)
    v = np.array([im[max(0, b - 2) : b + 3, max(0, a - 2) : a + 3].reshape(-1, 3).mean(0) for a, b in zip(x, y)])
    return ((v.min(axis=1) > 215) | (v.max(axis=1) < 25)).mean()


def test_spot_centres_fall_on_tissue(repo):
    """Every default section's spot centres land on tissue (catches misregistration); A2, left out, does not."""
    import yaml

    cfg = yaml.safe_load(open(repo / "config/config.yaml"))["datasets"]["her2st"]
    assert "A2" not in cfg["sections"]
    for s in cfg["sections"]:
        assert _background_fraction(repo, s) < 0.05, s
    assert _background_fraction(repo, "A2") > 0.15


def test_sdata_zarr_of_two_sections(repo, tmp_path):
    """prepare's SpatialData output for HER2ST: downsampled H&E, 100 µm circles on the spots, a labelled table."""
    import spatialdata
    from spatialdata.transformations import get_transformation_between_coordinate_systems

    from workflow_scripts.data.patches import open_slide
    from workflow_scripts.data.prepare import build_her2st
    from workflow_scripts.data.sdata import write_sdata

    spots, _ = build_her2st({"resource_dir": str(repo / "resources/her2st"), "sections": ["A1", "C2"],
                             "max_spots_per_slide": 30}, seed=0)
    write_sdata(spots, tmp_path / "sdata.zarr", image_um_per_px=2.0)
    sd = spatialdata.read_zarr(tmp_path / "sdata.zarr")
    # A1's PNG (3.2 µm/px) is kept as is; C2's JPEG (0.696 µm/px) is averaged over 3 x 3 blocks (2.09 µm/px)
    assert sd.images["he_A1"].shape == (3, 2138, 2000)
    assert sd.images["he_C2"].shape == (3, 9911 // 3, 9274 // 3)
    c2 = open_slide(spots.uns["slides"]["C2"]["image_path"]).read_region(3000, 4500, 3, 3)
    got = np.asarray(sd.images["he_C2"][:, 1500, 1000])
    assert np.abs(got - c2.reshape(-1, 3).mean(axis=0)).max() <= 1.0
    table = sd.tables["table"]
    for s in ("A1", "C2"):
        circles = sd.shapes[f"spots_{s}"]
        assert len(circles) == 30 and np.allclose(circles["radius"], 50.0)
        k = 1 if s == "A1" else 3
        M = get_transformation_between_coordinate_systems(sd, circles, sd.images[f"he_{s}"], s).to_affine_matrix(
            ("x", "y"), ("x", "y"))
        xy = np.stack([circles.geometry.x, circles.geometry.y], axis=1) @ M[:2, :2].T + M[:2, 2]
        rows = table.obs[table.obs["spatial_element"] == f"spots_{s}"].sort_values("instance_id")
        assert np.allclose(xy * k, rows[["px_x", "px_y"]].to_numpy(), atol=1e-6)
    path = spatialdata.get_values(value_key="pathology", sdata=sd, element_name="spots_A1", table_name="table")
    a1 = spots.obs[spots.obs["slide"] == "A1"]
    assert (path["pathology"].astype(str).to_numpy() == a1["pathology"].astype(str).to_numpy()).all()
    assert list(table.uns["composition_names"]) == list(spots.uns["composition_names"])
    assert table.obsm["composition"].shape == (60, 8)
