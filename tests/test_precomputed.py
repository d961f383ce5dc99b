"""Bring your own embeddings: the precomputed reader, the precomputed encoder and fused embeddings from files."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from workflow_scripts.data import model
from workflow_scripts.data.precomputed import input_files, read_precomputed
from workflow_scripts.encoders import EncodeContext, get_encoder
from workflow_scripts.encoders.embed import embed
from workflow_scripts.encoders.embed import main as embed_main
from workflow_scripts.io import read_embedding, read_embedding_file
from workflow_scripts.methods.imported import main as import_main


@pytest.fixture
def spots_table(tmp_path):
    rng = np.random.default_rng(0)
    n = 30
    df = pd.DataFrame({
        "barcode": [f"s{i}" for i in range(n)],
        "slide": np.repeat(["A", "B"], n // 2),
        "x_um": rng.uniform(0, 1000, n), "y_um": rng.uniform(0, 1000, n),
        "region": rng.choice(["tumour", "stroma"], n),
        "comp_t": rng.uniform(size=n), "comp_b": rng.uniform(size=n),
    })
    path = tmp_path / "spots.tsv"
    df.to_csv(path, sep="\t", index=False)
    return path, df


def test_reader_builds_the_data_model_from_a_table(spots_table):
    path, df = spots_table
    params = {"reader": "precomputed", "spots_file": str(path), "columns": {"spot_id": "barcode"},
              "obsm": {"composition": "comp_*"}}
    a = read_precomputed(params)
    model.validate_spots(a, "test", check_images=True)
    assert list(a.obs_names) == df["barcode"].tolist() and a.n_vars == 0
    assert (a.obs["donor"].astype(str) == a.obs["slide"].astype(str)).all()  # no donor column: slide
    assert a.uns["composition_names"] == ["comp_t", "comp_b"]
    np.testing.assert_allclose(a.obsm["composition"][:, 0], df["comp_t"])
    assert "comp_t" not in a.obs and str(a.obs["region"].dtype) == "category"
    np.testing.assert_allclose(a.obs["px_x"], a.obs["x_um"])
    assert not model.has_images(a)
    assert input_files(params) == [str(path)]


def test_reader_names_a_missing_column(spots_table):
    path, _ = spots_table
    with pytest.raises(ValueError, match=r"spot_id"):
        read_precomputed({"spots_file": str(path)})
    with pytest.raises(ValueError, match="px_x"):
        read_precomputed({"spots_file": str(path), "columns": {"spot_id": "barcode"},
                          "images": {"A": {"path": "a.png", "um_per_px": 1.0}}})


def test_reader_keeps_an_h5ads_counts_and_obsm(tmp_path, tiny_spots):
    a = tiny_spots.copy()
    a.obsm["my_emb"] = np.arange(a.n_obs * 3, dtype=float).reshape(-1, 3)
    a.uns.pop("slides")
    a.write_h5ad(tmp_path / "mine.h5ad")
    b = read_precomputed({"spots_file": str(tmp_path / "mine.h5ad")})
    assert b.n_vars == a.n_vars and "my_emb" in b.obsm and "composition" in b.obsm
    assert list(b.obs_names) == list(a.obs_names)


def test_encoder_reads_a_file_per_modality_and_matches_spots(tmp_path, tiny_spots, caplog):
    ids = list(tiny_spots.obs_names)
    gex = pd.DataFrame(np.random.default_rng(0).normal(size=(len(ids) + 2, 4)), columns=list("abcd"))
    gex.insert(0, "spot_id", ids[:-1] + ["extra1", "extra2", "extra3"])  # one spot missing, three unknown rows
    gex.to_csv(tmp_path / "gex.csv", index=False)
    img = ad.AnnData(X=np.zeros((len(ids), 1)), obsm={"X_uni": np.ones((len(ids), 6))})
    img.obs_names = ids
    img.write_h5ad(tmp_path / "img.h5ad")
    params = {"gex": {"path": str(tmp_path / "gex.csv")}, "img": {"path": str(tmp_path / "img.h5ad"), "key": "X_uni"}}
    assert get_encoder("precomputed").modality == "any"
    g = embed("precomputed", tiny_spots, params, EncodeContext(extra={"modality": "gex"}))
    assert g.shape == (len(ids) - 1, 4) and list(g.index) == ids[:-1]
    np.testing.assert_allclose(g.iloc[0].to_numpy(), gex.iloc[0, 1:].to_numpy(dtype=np.float32))
    assert g.attrs["n_rows_unused"] == 3 and g.attrs["n_spots_missing"] == 1
    i = embed("precomputed", tiny_spots, params, EncodeContext(extra={"modality": "img"}))
    assert i.shape == (len(ids), 6)
    with pytest.raises(ValueError, match="encoder_params.precomputed.gex"):
        embed("precomputed", tiny_spots, {"img": {"obsm": "x"}}, EncodeContext(extra={"modality": "gex"}))


def test_embed_cli_needs_the_modality_of_an_any_modality_encoder(tmp_path, tiny_spots):
    tiny_spots.obsm["e"] = np.ones((tiny_spots.n_obs, 2))
    tiny_spots.write_h5ad(tmp_path / "spots.h5ad")
    args = ["--encoder", "precomputed", "--dataset", str(tmp_path / "spots.h5ad"), "--out", str(tmp_path / "o.parquet"),
            "--params", '{"img": {"obsm": "e"}}']
    with pytest.raises(SystemExit, match="--modality"):
        embed_main(args)
    embed_main(args + ["--modality", "img"])
    assert read_embedding(tmp_path / "o.parquet").shape == (tiny_spots.n_obs, 2)


def test_read_embedding_file_errors_name_the_file(tmp_path):
    pd.DataFrame({"id": ["a"], "x": [1.0]}).to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(ValueError, match="spot_id"):
        read_embedding_file(tmp_path / "e.csv")
    pd.DataFrame({"spot_id": ["a", "a"], "x": [1.0, 2.0]}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(ValueError, match="duplicated"):
        read_embedding_file(tmp_path / "d.csv")
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        read_embedding_file(tmp_path / "nope.parquet")
    (tmp_path / "e.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="file type"):
        read_embedding_file(tmp_path / "e.npy")


def test_import_fused_keeps_the_dataset_spots(tmp_path, tiny_spots):
    tiny_spots.write_h5ad(tmp_path / "spots.h5ad")
    ids = list(tiny_spots.obs_names)
    df = pd.DataFrame(np.arange(len(ids) * 2, dtype=float).reshape(-1, 2), index=pd.Index(ids, name="spot_id"))
    df.columns = ["u", "v"]
    df.iloc[2, 0] = np.nan
    df.to_parquet(tmp_path / "fused.parquet")
    out = tmp_path / "imported.parquet"
    import_main(["--input", str(tmp_path / "fused.parquet"), "--spots", str(tmp_path / "spots.h5ad"), "--name", "mine",
                 "--out", str(out)])
    back = read_embedding(out)
    assert list(back.index) == ids and back.shape == (len(ids), 2) and np.isnan(back.iloc[2, 0])
    pd.DataFrame({"spot_id": ["zz"], "u": [1.0]}).to_csv(tmp_path / "bad.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="no spot id in common"):
        import_main(["--input", str(tmp_path / "bad.tsv"), "--spots", str(tmp_path / "spots.h5ad"), "--name", "m",
                     "--out", str(out)])
    pd.DataFrame({"spot_id": ids, "u": np.nan}).to_csv(tmp_path / "nan.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="every one of its .* rows .* NaN/inf"):
        import_main(["--input", str(tmp_path / "nan.tsv"), "--spots", str(tmp_path / "spots.h5ad"), "--name", "m",
                     "--out", str(out)])
