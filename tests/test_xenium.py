"""Tests of the Xenium reader (spatialdata-io), patch tiling and the SpatialData output on tiny bundles
written in the real file formats.

Breast-style sample: a Xenium ``outs`` folder as spatialdata-io reads it (``experiment.xenium`` of XOA 1.4,
10x HDF5 ``cell_feature_matrix.h5``, ``cells.parquet``, ``cells.zarr.zip`` with the encoded cell ids and the
cell summary), a pyramidal H&E OME-TIFF (tifffile, SubIFDs), the 3x3 H&E -> Xenium alignment CSV and a
QuPath-style GeoJSON of region polygons. Lung-style sample (GEO, no outs folder): ``transcripts.csv.gz``, an
author-registered single-strip TIFF, and a cell table with cell types and per-cell region labels.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml
from scipy.spatial import cKDTree

from workflow_scripts.data import tiling, xenium
from workflow_scripts.data.model import validate_spots
from workflow_scripts.data.patches import open_slide, patch_reader, patch_size_px

REPO = Path(__file__).resolve().parents[1]
PX_UM = 0.2125
GENES = [f"G{i}" for i in range(12)]
CLASSES = ["Emphysema", "NOANNOT", "Severe Fibrosis", "TLS"]
CTYPES = ["Alveolar epithelium", "Airway epithelium", "Endothelial", "NOMAP"]
CMAP = {"AT1": "Alveolar epithelium", "Basal": "Airway epithelium", "Capillary": "Endothelial"}
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


# ----------------------------------------------------------------------------------------------------------
# writers for the real formats


def write_10x_h5(path: Path, counts: np.ndarray, barcodes, names, ids, ftypes) -> None:
    """10x HDF5 matrix: /matrix/{barcodes,data,indices,indptr,shape,features/...}, CSC of genes x cells."""
    import scipy.sparse as sp

    m = sp.csr_matrix(counts)  # cells x genes == CSC of genes x cells
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        g.create_dataset("data", data=m.data.astype(np.int32))
        g.create_dataset("indices", data=m.indices.astype(np.int64))
        g.create_dataset("indptr", data=m.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array([counts.shape[1], counts.shape[0]], dtype=np.int32))
        fg = g.create_group("features")
        fg.create_dataset("id", data=np.array(ids, dtype="S"))
        fg.create_dataset("name", data=np.array(names, dtype="S"))
        fg.create_dataset("feature_type", data=np.array(ftypes, dtype="S"))
        fg.create_dataset("genome", data=np.array(["Unknown"] * len(ids), dtype="S"))
        fg.create_dataset("_all_tag_keys", data=np.array([b"genome"]))


def write_cells_zarr(path: Path, ids, xy_um: np.ndarray, area: np.ndarray) -> None:
    """``cells.zarr.zip`` of XOA 1.3-1.x (zarr v2 in a zip): ``cell_id`` (n, 2) uint32 (prefix, dataset suffix)
    and ``cell_summary`` (n, 7) with its ``column_names``; the segmentation masks are not needed here."""
    import zarr
    from spatialdata_io.readers.xenium import prefix_suffix_uint32_from_cell_id_str

    prefix, suffix = prefix_suffix_uint32_from_cell_id_str(ids)
    n = len(ids)
    store = zarr.storage.ZipStore(path, mode="w")
    root = zarr.open_group(store, mode="w", zarr_format=2)
    root.create_array("cell_id", data=np.stack([prefix, suffix.astype(np.uint32)], axis=1))
    root.create_array(
        "cell_summary", data=np.column_stack([xy_um, area, xy_um, area / 3, np.zeros(n)]),
        attributes={"column_names": ["cell_centroid_x", "cell_centroid_y", "cell_area", "nucleus_centroid_x",
                                     "nucleus_centroid_y", "nucleus_area", "z_level"]})
    store.close()


def write_ome_pyramid(path: Path, img: np.ndarray, um_per_px: float) -> None:
    """Pyramidal OME-TIFF: level 0 + 2 SubIFD levels, tiled 64x64, zlib, RGB interleaved."""
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(img, subifds=2, tile=(64, 64), photometric="rgb", compression="zlib",
                 metadata={"axes": "YXS", "PhysicalSizeX": um_per_px, "PhysicalSizeY": um_per_px})
        for k in (2, 4):
            tw.write(img[::k, ::k], subfiletype=1, tile=(64, 64), photometric="rgb", compression="zlib")


def rot_scale(theta_deg: float, s: float, t) -> np.ndarray:
    th = np.deg2rad(theta_deg)
    A = np.eye(3)
    A[:2, :2] = s * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    A[:2, 2] = t
    return A


def region_truth(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Labels of the toy GeoJSON (H&E px): TLS square inside a fibrosis half; emphysema corner; else NOANNOT."""
    lab = np.full(len(x), "NOANNOT", dtype=object)
    lab[x < 320] = "Severe Fibrosis"
    lab[(x >= 100) & (x < 180) & (y >= 100) & (y < 180)] = "TLS"
    lab[(x >= 400) & (y >= 300)] = "Emphysema"
    return lab


def make_breast_sample(root: Path, name: str, seed: int, n_cells: int = 700, extra_gene: bool = False):
    """Write one breast-style Xenium sample under root/name; return its truth (cells in H&E px, types, A)."""
    from spatialdata_io.readers.xenium import cell_id_str_from_prefix_suffix_uint32

    rng = np.random.default_rng(seed)
    d = root / name
    d.mkdir(parents=True)
    H, W = 480, 640
    he = rng.uniform([20, 20], [W - 20, H - 20], size=(n_cells, 2))
    A = rot_scale(-88.0, 1.25, [30.0, 900.0])  # H&E px -> Xenium px (rotated, 0.265625 µm per H&E px)
    xen_um = (he @ A[:2, :2].T + A[:2, 2]) * PX_UM
    prefix = rng.choice(2**24, size=n_cells, replace=False).astype(np.uint32)
    ids = list(cell_id_str_from_prefix_suffix_uint32(prefix, np.ones(n_cells, int)))  # e.g. "aaabdibd-1"
    area = rng.uniform(20, 80, n_cells)
    pd.DataFrame({"cell_id": ids, "x_centroid": xen_um[:, 0], "y_centroid": xen_um[:, 1],
                  "transcript_counts": 1, "control_probe_counts": 0, "control_codeword_counts": 0,
                  "total_counts": 1, "cell_area": area, "nucleus_area": area / 3}).to_parquet(d / "cells.parquet")
    write_cells_zarr(d / "cells.zarr.zip", ids, xen_um, area)
    genes = GENES + (["EXTRA"] if extra_gene else [])
    names = genes + ["NegControlProbe_00001", "BLANK_0001"]
    ftypes = ["Gene Expression"] * len(genes) + ["Negative Control Probe", "Blank Codeword"]
    counts = rng.poisson(2.0, size=(n_cells, len(names)))
    write_10x_h5(d / "cell_feature_matrix.h5", counts, ids, names, [f"ENSG{i:011d}" for i in range(len(names))],
                 ftypes)
    (d / "experiment.xenium").write_text(json.dumps({"pixel_size": PX_UM, "run_name": "toy",
                                                     "analysis_sw_version": "xenium-1.4.0.6"}))
    np.savetxt(d / "he_imagealignment.csv", A, delimiter=",", fmt="%.10g")
    img = np.full((H, W, 3), (240, 220, 230), dtype=np.uint8)
    for c, i in zip(COLOURS, range(3)):
        x, y = np.round(he[i]).astype(int)
        img[y - 3 : y + 4, x - 3 : x + 4] = c
    write_ome_pyramid(d / "he_image.ome.tif", img, 0.265625)
    feats = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [320, 0], [320, 480], [0, 480],
                                                                             [0, 0]]]},
         "properties": {"objectType": "annotation", "classification": {"name": "severe_fibrosis", "color": [1, 2, 3]}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[100, 100], [180, 100], [180, 180],
                                                                             [100, 180], [100, 100]]]},
         "properties": {"classification": {"name": "TLS"}}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[[[400, 300], [640, 300], [640, 480],
                                                                                   [400, 480], [400, 300]]]]},
         "properties": {"name": "Emphysema"}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {"name": "TLS"}},
    ]
    (d / "regions.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    ctype = rng.choice(["AT1", "Basal", "Capillary", "Mystery"], size=n_cells, p=[0.4, 0.3, 0.2, 0.1])
    in_table = rng.random(n_cells) > 0.1  # 10 % of cells are not in the annotation table -> NOMAP
    pd.DataFrame({"cell_id": np.array(ids)[in_table], "celltype": ctype[in_table]}).to_csv(
        d / "cell_types.csv", index=False)
    truth_type = np.where(in_table, pd.Series(ctype).map(CMAP).fillna("NOMAP").to_numpy(), "NOMAP")
    return {"ids": ids, "he": he, "A": A, "type": dict(zip(ids, truth_type)),
            "region": dict(zip(ids, region_truth(he[:, 0], he[:, 1]))),
            "counts": pd.DataFrame(counts[:, : len(genes)], index=ids, columns=genes)}


def breast_params(root: Path, samples, **kw) -> dict:
    p = {
        "reader": "xenium", "name": "toy_breast", "raw_dir": str(root),
        "splits": {"train": ["OTHER"], "test": list(samples)}, "build_splits": ["test"],
        "files": {"outs": "{sample}", "image": "{sample}/he_image.ome.tif",
                  "alignment": "{sample}/he_imagealignment.csv", "regions": "{sample}/regions.geojson",
                  "cell_table": "{sample}/cell_types.csv"},
        "cell_table_columns": {"cell_id": "cell_id", "cell_type": "celltype"},
        "annotation_classes": CLASSES, "unannotated_class": "NOANNOT", "excluded_classes": [0, 1],
        "composition_classes": CTYPES, "unmapped_class": "NOMAP", "cell_type_map": CMAP,
        "patch_um": 64 * 0.265625, "stride_um": 32 * 0.265625, "min_cells_per_patch": 3, "max_cells_per_patch": 6,
    }
    p.update(kw)
    return p


@pytest.fixture(scope="module")
def breast(tmp_path_factory):
    root = tmp_path_factory.mktemp("breast_raw")
    truth = {"BR1": make_breast_sample(root, "BR1", 1), "BR2": make_breast_sample(root, "BR2", 2, 300, extra_gene=True)}
    spots, cells = xenium.build_dataset(breast_params(root, ["BR1", "BR2"]), seed=0)
    return root, truth, spots, cells


# ----------------------------------------------------------------------------------------------------------
# coordinates


def test_alignment_through_spatialdata_and_resolution(tmp_path):
    from spatialdata.transformations import Scale

    A = rot_scale(30.0, 1.2895, [807.98, 73097.66])
    np.savetxt(tmp_path / "he_imagealignment.csv", A, delimiter=",")
    write_ome_pyramid(tmp_path / "he_image.ome.tif", np.zeros((64, 96, 3), np.uint8), 0.274)
    params = {"alignment_direction": "he_to_xenium"}
    t, shape = xenium.he_image_transform(params, "S", tmp_path / "he_image.ome.tif",
                                         tmp_path / "he_imagealignment.csv", PX_UM)
    assert shape == (64, 96)
    M = xenium.cells_to_he_matrix(Scale([1 / PX_UM] * 2, axes=("x", "y")), t)
    he = np.array([[0.0, 0.0], [1000.0, 250.0]])
    um = (he @ A[:2, :2].T + A[:2, 2]) * PX_UM  # H&E px -> Xenium px -> µm
    assert np.allclose(um @ M[:2, :2].T + M[:2, 2], he)
    # the 10x breast example: H&E pixel ~1.29 Xenium px -> 0.274 µm/px (reference: Sample2 0.27398)
    assert xenium.he_um_per_px(M) == pytest.approx(0.2125 * 1.2895, rel=1e-9)
    # a matrix written the other way round is inverted on request
    np.savetxt(tmp_path / "he_imagealignment.csv", np.linalg.inv(A), delimiter=",")
    t2, _ = xenium.he_image_transform({"alignment_direction": "xenium_to_he"}, "S", tmp_path / "he_image.ome.tif",
                                      tmp_path / "he_imagealignment.csv", PX_UM)
    assert np.allclose(xenium.cells_to_he_matrix(Scale([1 / PX_UM] * 2, axes=("x", "y")), t2), M)
    with pytest.raises(ValueError, match="alignment_direction"):
        xenium.he_image_transform({"alignment_direction": "sideways"}, "S", tmp_path / "he_image.ome.tif",
                                  tmp_path / "he_imagealignment.csv", PX_UM)


def test_cells_land_on_their_he_pixels(breast):
    root, truth, spots, cells = breast
    for s in ("BR1", "BR2"):
        t = truth[s]
        c = cells.obs[cells.obs["slide"] == s].drop_duplicates("cell_id").set_index("cell_id")
        he = pd.DataFrame(t["he"], index=t["ids"]).loc[c.index].to_numpy()
        err = np.abs(c[["x_px", "y_px"]].to_numpy() - he).max()
        assert err < 1.0, f"{s}: cells off by {err:.3f} px"
    # the three painted cells read their own colour from level 0 of the pyramid (x = column, y = row)
    slide = open_slide(spots.uns["slides"]["BR1"]["image_path"])
    c = cells.obs.drop_duplicates("cell_id").set_index("cell_id")
    painted = [(colour, cid) for colour, cid in zip(COLOURS, truth["BR1"]["ids"][:3]) if cid in c.index]
    assert len(painted) >= 2  # (a painted cell could lie in no kept patch)
    for colour, cid in painted:
        x, y = np.round(c.loc[cid, ["x_px", "y_px"]].to_numpy(float)).astype(int)
        assert tuple(slide.read_region(x, y, 1, 1)[0, 0]) == colour
        if abs(x - y) > 8:  # x is the column, y the row
            assert tuple(slide.read_region(y, x, 1, 1)[0, 0]) != colour
    assert spots.uns["slides"]["BR1"]["um_per_px"] == pytest.approx(0.265625, rel=1e-9)
    assert spots.obs[["x_um", "px_x"]].pipe(lambda o: np.allclose(o["x_um"], o["px_x"] * 0.265625))


def _painted_cells(truth, cells):
    """(colour, cell_id, spot_id of one patch holding it) for the painted BR1 cells that lie in a kept patch."""
    c = cells.obs[cells.obs["slide"] == "BR1"].drop_duplicates("cell_id").set_index("cell_id")
    out = [(colour, cid, c.loc[cid, "spot_id"]) for colour, cid in zip(COLOURS, truth["BR1"]["ids"][:3])
           if cid in c.index]
    assert len(out) >= 2  # (a painted cell could lie in no kept patch)
    return out


def test_patch_around_a_painted_cell_shows_it(breast):
    """patches.py cuts the patch of a spot from the recorded image/px/µm: the painted cell is where it should be."""
    _, truth, spots, cells = breast
    patch_um = 64 * 0.265625
    size = patch_size_px(patch_um, spots.uns["slides"]["BR1"]["um_per_px"])
    assert size == 64
    reader = patch_reader(spots, patch_um, out_px=size)  # no resampling: patch pixels are image pixels
    for colour, cid, sid in _painted_cells(truth, cells):
        i = spots.obs_names.get_loc(sid)
        patch = reader[i]
        x0 = int(round(spots.obs["px_x"].iloc[i] - size / 2))
        y0 = int(round(spots.obs["px_y"].iloc[i] - size / 2))
        x, y = np.round(truth["BR1"]["he"][truth["BR1"]["ids"].index(cid)]).astype(int)
        assert 0 <= x - x0 < size and 0 <= y - y0 < size
        assert tuple(patch[y - y0, x - x0]) == colour  # row = y, column = x
        assert (patch == colour).all(axis=2).sum() >= 9  # the painted 7 x 7 square, maybe cut by the border


def test_sdata_zarr_of_the_patches(breast, tmp_path):
    """The SpatialData output: full-resolution H&E, one square per patch, a table that annotates them."""
    import spatialdata
    from shapely.geometry import Point
    from spatialdata.transformations import get_transformation, get_transformation_between_coordinate_systems

    from workflow_scripts.data.sdata import write_sdata

    _, truth, spots, cells = breast
    write_sdata(spots, tmp_path / "sdata.zarr", image_um_per_px=None)
    sd = spatialdata.read_zarr(tmp_path / "sdata.zarr")
    assert set(sd.images) == {"he_BR1", "he_BR2"} and set(sd.shapes) == {"spots_BR1", "spots_BR2"}
    assert sd.images["he_BR1"].shape == (3, 480, 640)
    table = sd.tables["table"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == ["spots_BR1", "spots_BR2"] and attrs["region_key"] == "spatial_element"
    assert attrs["instance_key"] == "instance_id"
    for s in ("BR1", "BR2"):
        rows = table.obs["slide"] == s
        shapes = sd.shapes[f"spots_{s}"]
        assert len(shapes) == int(rows.sum()) == int((spots.obs["slide"] == s).sum())
        assert (table.obs.loc[rows, "spatial_element"] == f"spots_{s}").all()
        assert sorted(table.obs.loc[rows, "instance_id"]) == list(shapes.index)
    # squares of the patch side (µm), centred on the patch centre (µm in the slide's H&E frame)
    sq = sd.shapes["spots_BR1"]
    b = sq.geometry.bounds
    assert np.allclose(b["maxx"] - b["minx"], 64 * 0.265625) and np.allclose(b["maxy"] - b["miny"], 64 * 0.265625)
    # labels and composition ride along; get_values follows the table's annotation links
    reg = spatialdata.get_values(value_key="region", sdata=sd, element_name="spots_BR1", table_name="table")
    br1 = table.obs[table.obs["slide"] == "BR1"].set_index("instance_id")
    assert (reg["region"].astype(str) == br1.loc[reg.index, "region"].astype(str)).all()
    first = spots.obs_names[0]
    assert table.obs.loc[first, "region"] == spots.obs.loc[first, "region"]
    assert np.allclose(table.obsm["composition"], spots.obsm["composition"])
    # a painted cell: its patch square, mapped into the image's pixels, contains it, and the image shows it there
    M = {cs: get_transformation_between_coordinate_systems(sd, sq, sd.images["he_BR1"], cs).to_affine_matrix(
        ("x", "y"), ("x", "y")) for cs in ("BR1", "global")}
    assert np.allclose(M["BR1"], M["global"])
    M = M["BR1"]
    img = np.asarray(sd.images["he_BR1"])
    for colour, cid, sid in _painted_cells(truth, cells):
        x, y = truth["BR1"]["he"][truth["BR1"]["ids"].index(cid)]
        poly = sq.geometry.loc[int(table.obs.loc[sid, "instance_id"])]
        corners = np.asarray(poly.exterior.coords) @ M[:2, :2].T + M[:2, 2]
        assert Point(x, y).within(type(poly)(corners))
        assert tuple(img[:, int(round(y)), int(round(x))]) == colour
    # "global" puts BR2 to the right of BR1; each slide's own coordinate system starts at its origin
    assert get_transformation(sd.shapes["spots_BR1"], "global").to_affine_matrix(("x",), ("x",))[0, 1] == 0
    assert get_transformation(sd.shapes["spots_BR2"], "global").to_affine_matrix(("x",), ("x",))[0, 1] >= \
        640 * 0.265625


def test_sdata_image_is_the_block_mean_read_in_bands(tmp_path):
    from workflow_scripts.data.sdata import downsample_factor, read_slide_image

    img = np.random.default_rng(0).integers(0, 256, (100, 130, 3), dtype=np.uint8)
    write_ome_pyramid(tmp_path / "he.ome.tif", img, 0.5)
    assert downsample_factor(0.69, 2.0) == 3 and downsample_factor(3.2, 2.0) == 1 and downsample_factor(0.5, None) == 1
    k = 3
    want = img[:99, :129].reshape(33, k, 43, k, 3).astype(float).mean(axis=(1, 3))
    small_bands = read_slide_image(tmp_path / "he.ome.tif", k, band_bytes=3 * k * k * 43 * 4)  # 4 output rows
    assert small_bands.shape == (3, 33, 43)
    assert np.abs(np.moveaxis(small_bands, 0, 2) - want).max() < 1  # Pillow rounds in fixed point
    assert np.array_equal(small_bands, read_slide_image(tmp_path / "he.ome.tif", k))
    assert np.array_equal(read_slide_image(tmp_path / "he.ome.tif", 1), np.moveaxis(img, 2, 0))


def test_outputs_write_and_read_as_h5ad(breast, tmp_path):
    import anndata as ad

    _, _, spots, cells = breast
    spots.write_h5ad(tmp_path / "spots.h5ad")
    cells.write_h5ad(tmp_path / "cells.h5ad")
    s2, c2 = ad.read_h5ad(tmp_path / "spots.h5ad"), ad.read_h5ad(tmp_path / "cells.h5ad")
    validate_spots(s2, check_images=True)
    assert s2.uns["slides"]["BR1"]["um_per_px"] == spots.uns["slides"]["BR1"]["um_per_px"]
    assert (c2.obs["spot_id"].isin(s2.obs_names)).all() and c2.n_vars == s2.n_vars


def test_open_slide_reads_planar_ome_tiff(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (100, 120, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "p.ome.tif", np.moveaxis(img, 2, 0), photometric="rgb", planarconfig="separate",
                     tile=(64, 64), ome=True)
    slide = open_slide(tmp_path / "p.ome.tif")
    assert (slide.height, slide.width) == (100, 120)
    assert (slide.read_region(10, 20, 30, 40) == img[20:60, 10:40]).all()


def test_input_files_and_missing_configured_file(breast, tmp_path, caplog):
    root, _, _, _ = breast
    p = breast_params(root, ["BR1", "BR2"])
    files = xenium.input_files(p)
    assert len(files) == 2 * 8 and all(Path(f).exists() for f in files)  # 4 outs files + 4 configured files
    assert str(root / "BR2" / "he_imagealignment.csv") in files and str(root / "BR1" / "cells.zarr.zip") in files
    t = make_breast_sample(tmp_path, "BR1", 4, 100)
    with caplog.at_level("INFO", logger="workflow_scripts.data.xenium"):
        counts, cent, _ = xenium.read_outs(tmp_path / "BR1", "BR1")
    assert list(counts.var_names) == GENES and list(counts.obs_names) == t["ids"]
    assert "dropped 2 non-gene features" in caplog.text  # the negative-control probe and the blank codeword
    assert np.array_equal(counts.X.toarray(), t["counts"].to_numpy())
    (tmp_path / "BR1" / "he_imagealignment.csv").unlink()
    with pytest.raises(FileNotFoundError, match="files.alignment not found.*he_imagealignment.csv"):
        xenium.build_dataset(breast_params(tmp_path, ["BR1"]), seed=0)
    (tmp_path / "BR1" / "cells.zarr.zip").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['cells.zarr.zip'\]"):
        xenium.read_outs(tmp_path / "BR1", "BR1")


def test_wrong_alignment_direction_is_caught(tmp_path):
    make_breast_sample(tmp_path, "BR1", 3, 200)
    with pytest.raises(ValueError, match="alignment_direction"):
        xenium.build_dataset(breast_params(tmp_path, ["BR1"], alignment_direction="xenium_to_he"), seed=0)


# ----------------------------------------------------------------------------------------------------------
# patches


def test_patch_cells_cap_labels_and_composition(breast):
    root, truth, spots, cells = breast
    validate_spots(spots, source="toy breast", check_images=True)
    assert list(spots.var_names) == GENES  # controls dropped; EXTRA (only in BR2) dropped by the inner join
    assert list(spots.obs["region"].cat.categories) == CLASSES
    assert spots.uns["composition_names"] == CTYPES[:-1]
    assert spots.uns["excluded_classes"] == ["Emphysema", "NOANNOT"]
    half = 32.0  # patch = 64 H&E px
    by_spot = cells.obs.groupby("spot_id", observed=True)
    X = np.asarray(spots.X.todense())
    comp = np.asarray(spots.obsm["composition"])
    row_of = {sid: i for i, sid in enumerate(spots.obs_names)}
    n_checked = 0
    for s in ("BR1", "BR2"):
        t = truth[s]
        he = t["he"]
        sub = spots.obs[spots.obs["slide"] == s]
        for sid, row in sub.iterrows():
            cx, cy = row["px_x"], row["px_y"]
            inside = (he[:, 0] >= cx - half) & (he[:, 0] < cx + half) & (he[:, 1] >= cy - half) & (he[:, 1] < cy + half)
            assert row["n_cells_inside"] == inside.sum()
            assert row["n_cells"] == min(inside.sum(), 6)
            members = by_spot.get_group(sid)
            assert len(members) == row["n_cells"]
            assert set(members["cell_id"]) <= set(np.array(t["ids"])[inside])
            # summed counts are the counts of exactly these cells
            x = X[row_of[sid]]
            assert np.array_equal(x, t["counts"].loc[members["cell_id"], GENES].sum(axis=0).to_numpy())
            # majority region label, ties -> smallest class index
            labs = pd.Series([t["region"][c] for c in members["cell_id"]])
            vc = labs.value_counts()
            best = min(vc[vc == vc.max()].index, key=CLASSES.index)
            assert row["region"] == best and row["region_frac"] == pytest.approx(vc.max() / len(labs))
            # composition of the kept cells, NOMAP removed and renormalised
            ty = pd.Series([t["type"][c] for c in members["cell_id"]]).value_counts()
            v = np.array([ty.get(k, 0) for k in CTYPES[:-1]], dtype=float)
            v = v / v.sum() if v.sum() else v
            assert np.allclose(comp[row_of[sid]], v)
            n_checked += 1
    assert n_checked == spots.n_obs > 50
    assert (spots.obs["n_cells_inside"] > 6).any() and (spots.obs["n_cells"] <= 6).all()
    assert set(spots.obs["region"]) >= {"Severe Fibrosis", "NOANNOT", "Emphysema"}
    assert (cells.obs["region"].astype(str).to_numpy()
            == [truth[s]["region"][c] for s, c in zip(cells.obs["slide"], cells.obs["cell_id"])]).all()


def test_build_is_deterministic_for_a_seed(breast):
    root, _, spots, cells = breast
    p = breast_params(root, ["BR1", "BR2"])
    s2, c2 = xenium.build_dataset(p, seed=0)
    assert (s2.obs_names == spots.obs_names).all() and list(c2.obs_names) == list(cells.obs_names)
    s3, c3 = xenium.build_dataset(p, seed=1)
    assert list(c3.obs_names) != list(cells.obs_names)  # another random 6-of-n subset in crowded patches


def test_tile_cells_by_hand():
    xy = np.array([[0.0, 0.0], [12.0, 3.0], [7.0, 7.0], [19.9, 0.5]])
    t = tiling.tile_cells(xy, patch=10.0, stride=5.0, min_cells=1, max_cells=None)
    # x tiles start at 0, 5, 10; one row of tiles (all y < 10)
    assert t.kxy.tolist() == [[0, 0], [1, 0], [2, 0]]
    assert t.member.toarray().tolist() == [[1, 0, 1, 0], [0, 1, 1, 0], [0, 1, 0, 1]]
    assert np.allclose(t.centre, [[5, 5], [10, 5], [15, 5]])
    t2 = tiling.tile_cells(xy, patch=10.0, stride=5.0, min_cells=1, max_cells=1, rng=np.random.default_rng(0))
    assert t2.member.sum(axis=1).A1.tolist() == [1, 1, 1] and t2.n_inside.tolist() == [2, 2, 2]
    t3 = tiling.tile_cells(xy, patch=10.0, stride=5.0, min_cells=3)
    assert t3.member.shape == (0, 4)


def test_majority_and_composition_by_hand():
    import scipy.sparse as sp

    member = sp.csr_matrix(np.array([[1, 1, 1, 1, 0], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1]], dtype=float))
    codes = np.array([2, 0, 0, 2, 1])
    lab, frac = tiling.majority_label(member, codes, 3)
    assert lab.tolist() == [0, 1, 1] and np.allclose(frac, [0.5, 0.5, 1.0])  # tie 0 vs 2 -> 0; tie 2 vs 1 -> 1
    comp = tiling.composition(member, codes, 3, unmapped_index=2)
    assert np.allclose(comp, [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert np.allclose(tiling.remove_unmapped_and_renormalise([[2, 1, 1], [0, 0, 5]], 2), [[2 / 3, 1 / 3], [0, 0]])


# ----------------------------------------------------------------------------------------------------------
# lung-style sample: transcripts + registered H&E + cell table


def test_lung_style_transcripts_registered_image_and_cell_table(tmp_path):
    rng = np.random.default_rng(7)
    raw = tmp_path / "raw"
    (raw / "LU1").mkdir(parents=True)
    H, W = 300, 400
    um_px = 0.2125
    tifffile.imwrite(raw / "LU1/registered_HE.tif", np.full((H, W, 3), 200, np.uint8), photometric="rgb",
                     rowsperstrip=H)  # GEO: registered to Xenium pixels, single strip
    n = 120
    ids = [f"c{i}" for i in range(n)]
    pos_px = rng.uniform([10, 10], [W - 10, H - 10], size=(n, 2))
    truth = pd.DataFrame(0, index=ids, columns=GENES)
    rows = []
    for i, cid in enumerate(ids):
        for _ in range(rng.integers(5, 30)):
            g = GENES[rng.integers(len(GENES))]
            qv = rng.choice([35.0, 10.0], p=[0.85, 0.15])
            if qv >= 20:
                truth.loc[cid, g] += 1
            x, y = (pos_px[i] + rng.normal(0, 2, 2)) * um_px
            rows.append((cid, g, qv, x, y))
        rows.append((cid, "NegControlProbe_00042", 40.0, 0.0, 0.0))
    rows += [("UNASSIGNED", "G1", 40.0, 1.0, 1.0)] * 7
    tx = pd.DataFrame(rows, columns=["cell_id", "feature_name", "qv", "x_location", "y_location"])
    tx.insert(0, "transcript_id", np.arange(len(tx)))
    tx["overlaps_nucleus"] = 1
    tx["z_location"] = 5.0
    with gzip.open(raw / "LU1/transcripts.csv.gz", "wt") as fh:
        tx.sample(frac=1.0, random_state=0).to_csv(fh, index=False)
    fine = rng.choice(["AT1", "Basal", "Capillary"], size=n)
    region = np.where(pos_px[:, 0] < W / 2, "normal_alveoli", "Severe-Fibrosis")
    table = pd.DataFrame({"sample": "LU1", "cell_id": ids, "x_centroid": pos_px[:, 0] * um_px,
                          "y_centroid": pos_px[:, 1] * um_px, "final_CT": fine, "region": region})
    other = table.assign(sample="LU2")
    pd.concat([table.iloc[5:], other]).to_csv(raw / "cells.csv.gz", index=False)  # c0-c4 missing -> NOMAP
    params = {
        "reader": "xenium", "raw_dir": str(raw), "splits": {"test": ["LU1"]},
        "files": {"transcripts": "{sample}/transcripts.csv.gz", "outs": None,
                  "image": "{sample}/registered_HE.tif", "cell_table": "cells.csv.gz"},
        "cell_table_columns": {"cell_id": "cell_id", "sample": "sample", "cell_type": "final_CT",
                               "region": "region", "x_um": "x_centroid", "y_um": "y_centroid"},
        "annotation_classes": ["NOANNOT", "Normal Alveoli", "Severe Fibrosis"], "unannotated_class": "NOANNOT",
        "composition_classes": CTYPES, "cell_type_map": CMAP,
        "patch_um": 40.0, "stride_um": 20.0, "min_cells_per_patch": 2, "max_cells_per_patch": 200,
    }
    counts, cent = xenium.counts_from_transcripts(raw / "LU1/transcripts.csv.gz", 20)
    assert sorted(counts.var_names) == sorted(GENES)  # controls and unassigned transcripts dropped
    dense = pd.DataFrame(counts.X.toarray(), index=counts.obs_names, columns=counts.var_names)
    assert dense.loc[truth.index[truth.sum(axis=1) > 0], GENES].equals(
        truth.loc[truth.sum(axis=1) > 0].astype(np.float32))
    assert np.abs(cent.loc["c3"].to_numpy() / um_px - pos_px[3]).max() < 3  # mean of transcripts ~ centroid

    sc = xenium.read_sample(params, "LU1")
    assert sc.um_per_px == pytest.approx(um_px, rel=1e-6)  # registered image: H&E px = Xenium px
    assert sc.obs.index.isin(ids).all() and len(sc.obs) == n
    got = sc.obs.loc[ids, ["x_px", "y_px"]].to_numpy()
    assert np.allclose(got[5:], pos_px[5:], atol=1e-6)  # cell-table centroids (µm / 0.2125)
    assert np.abs(got[:5] - pos_px[:5]).max() < 3  # not in the table: mean transcript position
    assert (sc.obs.loc[["c0", "c1"], "cell_type"] == "NOMAP").all()
    assert sc.obs.loc["c7", "cell_type"] == CMAP[fine[7]]
    assert sc.obs.loc["c7", "region"] == (1 if region[7] == "normal_alveoli" else 2)
    # an image registered at another resolution: H&E px = Xenium µm / um_per_px
    half = xenium.read_sample({**params, "um_per_px": 2 * um_px}, "LU1")
    assert half.um_per_px == pytest.approx(2 * um_px)
    assert np.allclose(half.obs.loc[ids[5:], ["x_px", "y_px"]].to_numpy(), pos_px[5:] / 2)

    spots, cells = xenium.build_dataset(params, seed=0)
    validate_spots(spots, check_images=True)
    assert set(spots.obs["split"]) == {"test"} and set(spots.obs["donor"]) == {"LU1"}
    assert set(spots.obs["region"]) <= {"Normal Alveoli", "Severe Fibrosis"}
    sums = spots.obsm["composition"].sum(axis=1)
    assert np.all(np.isclose(sums, 1.0) | (sums == 0)) and spots.obsm["composition"].shape[1] == 3


# ----------------------------------------------------------------------------------------------------------
# the paper configuration


@pytest.fixture(scope="module")
def paper():
    return yaml.safe_load((REPO / "config/paper.yaml").read_text())


def test_paper_config_classes_splits_and_tasks(paper):
    ds = paper["datasets"]
    expect = {"lung": (24, [3, 16]), "breast": (14, [4]), "thymus": (11, [10])}
    for name, (n_classes, excl) in expect.items():
        d = ds[name]
        assert len(d["annotation_classes"]) == n_classes and d["excluded_classes"] == excl
        assert d["tasks"]["region"]["exclude"] == [d["annotation_classes"][i] for i in excl]
        assert d["unannotated_class"] in d["annotation_classes"]
        assert d["build_splits"] == ["test"]
        members = [s for v in d["splits"].values() for s in v]
        assert len(members) == len(set(members)), f"{name}: a sample is in two splits"
    lung = ds["lung"]
    assert len(lung["splits"]["train"]) == 16 and len(lung["splits"]["test"]) == 7
    assert ds["breast"]["splits"]["test"] == ["Sample2"]
    assert len(ds["thymus"]["splits"]["test"]) == 4
    assert lung["composition_classes"].index(lung["unmapped_class"]) == 9 and len(lung["composition_classes"]) == 10
    assert set(lung["cell_type_map"].values()) <= set(lung["composition_classes"]) - {"NOMAP"}
    assert lung["tasks"]["composition"] == {"type": "regression", "obsm": "composition"}
    assert "composition" not in ds["breast"]["tasks"] and "composition" not in ds["thymus"]["tasks"]
    assert all(d["encoders"] == {"gex": "nicheformer", "img": "uni2h"} for d in ds.values())


@pytest.mark.parametrize("name", ["lung", "breast"])
def test_ring_edges_give_8_16_to_64_neighbours_on_the_patch_grid(paper, name):
    d = paper["datasets"][name]
    s = d["stride_um"]
    g = np.stack(np.meshgrid(np.arange(40), np.arange(40)), -1).reshape(-1, 2) * s
    centre = (np.abs(g / s - 20) < 2).all(axis=1)
    edges = np.asarray(d["spatial"]["ring_edges_um"])
    assert edges[0] == 0 and (np.diff(edges) > 0).all()
    dist, _ = cKDTree(g).query(g[centre], k=500, distance_upper_bound=edges[-1] + 1)
    dist = dist[:, 1:]
    per_ring = [((dist > a) & (dist <= b)).sum(axis=1).mean() for a, b in zip(edges[:-1], edges[1:])]
    assert np.allclose(per_ring, np.arange(8, 72, 8), rtol=0.1), per_ring
