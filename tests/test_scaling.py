"""Data-scaling experiment, offline mode (workflow_scripts/analysis/scaling.py) on a tiny synthetic dataset."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from workflow_scripts.analysis import scaling
from workflow_scripts.encoders import EncodeContext
from workflow_scripts.encoders.pca import encode_pca
from workflow_scripts.io import embedding_frame, write_embedding

COMM = {"embed_dim": 8, "n_heads": 2, "n_layers": 1, "batch_size": 32, "max_epochs": 2, "early_stopping_patience": 2}
PROBE = {"n_folds": 3, "cv": "kfold", "logreg_max_iter": 300}
TASKS = {"cluster": {"type": "classification", "label": "cluster"},
         "composition": {"type": "regression", "obsm": "composition"}}


@pytest.fixture(scope="module")
def toy():
    """3 slides x 8 x 8 spots; two expression programs (left/right half) and a matching image signal."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    for s in range(3):
        for i in range(8):
            for j in range(8):
                rows.append(dict(spot=f"S{s}_{i}_{j}", slide=f"S{s}", x_um=200.0 * i, y_um=200.0 * j,
                                 cluster="left" if i < 4 else "right"))
    obs = pd.DataFrame(rows).set_index("spot")
    obs["slide"] = obs["slide"].astype("category")
    left = (obs["cluster"] == "left").to_numpy()
    rate = np.full((len(obs), 60), 2.0)
    rate[left, :10] = 12.0
    rate[~left, 10:20] = 12.0
    X = rng.poisson(rate).astype(np.float32)
    a = ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"G{k}" for k in range(60)]))
    comp = np.where(left[:, None], [0.7, 0.3], [0.2, 0.8]) + 0.05 * rng.random((len(obs), 2))
    a.obsm["composition"] = comp / comp.sum(axis=1, keepdims=True)
    img = np.hstack([left[:, None] * 1.0, rng.standard_normal((len(obs), 4))]) + 0.3 * rng.standard_normal((len(obs), 5))
    return a, embedding_frame(img, a.obs_names)


def test_fraction_subsets_are_nested_seeded_and_sized():
    subs = [scaling.fraction_subset(1000, f, seed=3) for f in scaling.FRACTIONS]
    assert [len(s) for s in subs] == [10, 32, 100, 316, 1000]
    for small, big in zip(subs, subs[1:]):
        assert set(small) <= set(big)
    np.testing.assert_array_equal(subs[2], scaling.fraction_subset(1000, 0.1, seed=3))
    assert not np.array_equal(subs[2], scaling.fraction_subset(1000, 0.1, seed=4))
    assert len(scaling.fraction_subset(50, 0.01, seed=0, min_items=5)) == 5
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="scaling.fractions"):
            scaling.fraction_subset(10, bad, 0)


def test_fraction_pca_on_all_spots_equals_the_pca_encoder(toy):
    a, _ = toy
    params = {"n_top_genes": 40, "n_comps": 5}
    ref = encode_pca(a, params, EncodeContext(seed=0)).to_numpy()
    got = scaling.FractionPCA(params, seed=0).fit(a.X, a.var_names).transform(a.X)
    np.testing.assert_allclose(np.abs(got), np.abs(ref), atol=2e-3)


def test_fraction_pca_is_fitted_on_the_subset_only(toy):
    a, _ = toy
    X = a.X.toarray()
    sub = np.arange(0, 40)
    X[:, 59] = 0
    X[100:, 59] = np.random.default_rng(1).poisson(50, size=len(X) - 100)  # only outside the subset
    enc = scaling.FractionPCA({"n_top_genes": 40, "n_comps": 5}, seed=0).fit(sp.csr_matrix(X[sub]), a.var_names)
    assert 59 not in set(enc.genes_)  # undetected in the fit spots: dropped
    z = enc.transform(sp.csr_matrix(X))
    assert z.shape == (len(X), 5) and np.isfinite(z).all()
    np.testing.assert_allclose(z[sub].mean(axis=0), 0, atol=1e-4)  # centred on the fit spots


def test_offline_scaling_runs_and_subsamples(toy, tmp_path):
    a, img = toy
    params = {"subsample": ["gex_encoder", "alignment"], "pca": {"n_top_genes": 40, "n_comps": 5}, "min_spots": 10}
    table, n_fit = scaling.offline_scaling(a, img, 0.25, 0, params, TASKS, PROBE, COMM, min_class_size=3, device="cpu")
    assert n_fit == 48
    assert set(table["embedding"]) == {"gex", "concat", "comm"}
    assert set(table["task"]) == {"cluster", "composition"}
    f1 = table[(table.metric == "macro_f1")].groupby("embedding")["value"].mean()
    assert f1["gex"] > 0.9 and f1["concat"] > 0.9  # the programs are easy to separate

    # the CLI writes the same kind of table with the leading columns
    a.write_h5ad(tmp_path / "spots.h5ad")
    write_embedding(img, tmp_path / "img.parquet")
    out = tmp_path / "offline.tsv"
    scaling.main(["offline", "--spots", str(tmp_path / "spots.h5ad"), "--img", str(tmp_path / "img.parquet"),
                  "--dataset", "toy", "--fraction", "0.1", "--seed", "1", "--params", json.dumps(params),
                  "--tasks", json.dumps(TASKS), "--probe-params", json.dumps(PROBE), "--comm-params", json.dumps(COMM),
                  "--min-class-size", "3", "--device", "cpu", "--out", str(out), "--log", str(tmp_path / "log.txt")])
    t = pd.read_csv(out, sep="\t")
    assert list(t.columns[: len(scaling.LEAD_COLUMNS)]) == scaling.LEAD_COLUMNS
    assert (t["n_fit"] == 20).all() and (t["fraction"] == 0.1).all() and (t["mode"] == "offline").all()
    assert "CoMM: trained on 20 of 192 spots" in (tmp_path / "log.txt").read_text()


def test_offline_scaling_alignment_only_needs_frozen_gex(toy):
    a, img = toy
    with pytest.raises(ValueError, match="precomputed GEX"):
        scaling.offline_scaling(a, img, 0.5, 0, {"subsample": ["alignment"]}, TASKS, PROBE, COMM, 3, None, "cpu")
    with pytest.raises(ValueError, match="unknown stage"):
        scaling.offline_scaling(a, img, 0.5, 0, {"subsample": ["encoder"]}, TASKS, PROBE, COMM, 3, None, "cpu")


def test_evaluate_cli_reads_n_fit_from_history(toy, tmp_path):
    a, img = toy
    a.write_h5ad(tmp_path / "spots.h5ad")
    write_embedding(img, tmp_path / "img.parquet")
    gex = scaling.FractionPCA({"n_top_genes": 40, "n_comps": 4}).fit(a.X, a.var_names).transform(a.X)
    write_embedding(embedding_frame(gex, a.obs_names), tmp_path / "gex.parquet")
    pd.DataFrame({"n_cells": [123], "epoch": [0]}).to_csv(tmp_path / "h.tsv", sep="\t", index=False)
    out = tmp_path / "eval.tsv"
    scaling.main(["evaluate", "--spots", str(tmp_path / "spots.h5ad"), "--gex", str(tmp_path / "gex.parquet"),
                  "--img", str(tmp_path / "img.parquet"), "--dataset", "toy", "--config", "cfg2", "--fraction", "0.0316",
                  "--seed", "0", "--history", str(tmp_path / "h.tsv"), "--tasks", json.dumps(TASKS),
                  "--probe-params", json.dumps(PROBE), "--comm-params", json.dumps(COMM), "--min-class-size", "3",
                  "--device", "cpu", "--out", str(out)])
    t = pd.read_csv(out, sep="\t")
    assert (t["n_fit"] == 123).all() and (t["config"] == "cfg2").all() and (t["mode"] == "posttrain").all()
    assert set(t["embedding"]) == {"gex", "concat", "comm"}
