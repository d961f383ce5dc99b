"""Nicheformer expression encoder: exact architecture, official tokenisation, checkpoint formats, spot means."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from workflow_scripts.encoders import EncodeContext, get_encoder
from workflow_scripts.encoders import nicheformer as N
from workflow_scripts.io import read_embedding
from workflow_scripts.encoders.weights import WeightsError

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]

LAYER_KEYS = {  # nn.TransformerEncoderLayer(d, h, ff) sub-keys and shapes (docs/reference.md#nicheformer)
    "self_attn.in_proj_weight": lambda d, ff: (3 * d, d),
    "self_attn.in_proj_bias": lambda d, ff: (3 * d,),
    "self_attn.out_proj.weight": lambda d, ff: (d, d),
    "self_attn.out_proj.bias": lambda d, ff: (d,),
    "linear1.weight": lambda d, ff: (ff, d),
    "linear1.bias": lambda d, ff: (ff,),
    "linear2.weight": lambda d, ff: (d, ff),
    "linear2.bias": lambda d, ff: (d,),
    "norm1.weight": lambda d, ff: (d,),
    "norm1.bias": lambda d, ff: (d,),
    "norm2.weight": lambda d, ff: (d,),
    "norm2.bias": lambda d, ff: (d,),
}


def expected_checkpoint_shapes(d=512, ff=1024, layers=12, n_tokens=20340, context=1500, classes=164):
    """The published checkpoint's state-dict keys and shapes, written out from docs/reference.md#nicheformer."""
    shapes = {"embeddings.weight": (n_tokens + 5, d), "positional_embedding.weight": (context, d)}
    for prefix in ["encoder_layer."] + [f"encoder.layers.{i}." for i in range(layers)]:
        shapes.update({prefix + k: f(d, ff) for k, f in LAYER_KEYS.items()})
    shapes.update({
        "classifier_head.weight": (n_tokens, d), "classifier_head.bias": (n_tokens,),
        "pooler_head.weight": (d, d), "pooler_head.bias": (d,),
        "cls_head.weight": (classes, d), "cls_head.bias": (classes,),
    })
    return shapes


def test_exact_architecture_on_meta_device():
    model = N.build_nicheformer(device="meta")
    assert N.n_parameters(model) == 47_199_256  # the reference count (template layer unused)
    assert N.n_parameters(model, include_template=True) == 49_302_040
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_checkpoint_shapes()
    assert len(sd) == 164
    layer = model.encoder.layers[0]
    assert layer.norm_first is False and layer.norm1.eps == 1e-12 and layer.self_attn.num_heads == 16
    assert model.embeddings.padding_idx == 1


# ---------------------------------------------------------------------------------------- tokenisation


def test_tokenisation_of_a_hand_made_cell():
    # vocabulary G0..G5; technology mean with a NaN (-> 0 -> 1) and a 0 (-> 1)
    mean = N.clean_technology_mean(np.array([2.0, np.nan, 0.0, 8.0, 0.5, 10.0]))
    np.testing.assert_array_equal(mean, [2, 1, 1, 8, 0.5, 10])
    counts = np.array([[3, 1, 0, 4, 1, 1]], dtype=float)  # library size 10 -> x1000
    # normalised: [3000, 1000, 0, 4000, 1000, 1000] / mean = [1500, 1000, 0, 500, 2000, 100]
    # non-zero genes by descending value: G4, G0, G1, G3, G5 -> + 30; context [human 5, Xenium 9, spatial 4]
    ctx = N.context_tokens("human", "Xenium", "spatial")
    tokens = N.tokenize(sp.csr_matrix(counts), mean, ctx, max_seq_len=10)
    np.testing.assert_array_equal(tokens[0], [5, 9, 4, 34, 30, 31, 33, 35, 0, 0])
    short = N.tokenize(sp.csr_matrix(counts), mean, ctx, max_seq_len=6)  # 1500 in production: 3 context + 1497 genes
    np.testing.assert_array_equal(short[0], [5, 9, 4, 34, 30, 31])
    # ties keep vocabulary order; a zero-count cell is context only; library size is the row sum
    tie = N.tokenize(sp.csr_matrix([[0, 2, 2, 0, 0, 0], [0, 0, 0, 0, 0, 0]]), mean, ctx, max_seq_len=8)
    np.testing.assert_array_equal(tie, [[5, 9, 4, 31, 32, 0, 0, 0], [5, 9, 4, 0, 0, 0, 0, 0]])
    assert N.context_tokens("mouse", "10x 3' v3", "dissociated").tolist() == [6, 11, 3]
    with pytest.raises(ValueError, match="unknown assay"):
        N.context_tokens("human", "visium", "spatial")


def test_gene_symbols_map_to_vocabulary_offline(tmp_path):
    gmap = tmp_path / "features.tsv.gz"
    pd.DataFrame([["ENSG00000000001", "AAA", "Gene Expression"], ["ENSG00000000002", "BBB", "Gene Expression"],
                  ["ENSG00000000002", "BBB-AS", "Gene Expression"], ["ENSG00000000009", "ENSA", "Gene Expression"],
                  ["ENSG00000000003", "AAA", "Gene Expression"]]).to_csv(gmap, sep="\t", header=False, index=False)
    vocab = pd.Index(["ENSG00000000002", "ENSG00000000001", "ENSG00000000009", "ENSG00000000007"])
    names = ["AAA", "BBB", "BBB-AS", "ENSA", "ENSG00000000007.4", "ZZZ"]
    ids, stats = N.map_gene_ids(names, None, N.load_gene_map(gmap))
    # first row wins for AAA; ENSA is a symbol, not an id; the version suffix is dropped
    assert ids.tolist() == ["ENSG00000000001", "ENSG00000000002", "ENSG00000000002", "ENSG00000000009",
                            "ENSG00000000007", ""]
    assert stats == {"n_genes": 6, "from_var_column": 0, "already_ensembl": 1, "from_gene_map": 4, "unmapped": 1}
    X = sp.csr_matrix(np.array([[1, 2, 3, 4, 5, 6]], dtype=np.float32))
    Xv, vstats = N.align_to_vocabulary(X, ids, vocab)
    np.testing.assert_array_equal(Xv.toarray(), [[5, 1, 4, 5]])  # BBB + BBB-AS summed, ZZZ dropped
    assert vstats["duplicates_summed"] == 1 and vstats["in_vocabulary"] == 5


def test_shipped_assets_load():
    vocab = N.load_vocabulary("resources/nicheformer/model.h5ad")
    assert len(vocab) == 20310 and len(vocab) + N.AUX_TOKENS == N.ARCH["n_tokens"]
    for name in N.TECHNOLOGY_MEANS:
        m = N.load_technology_mean(name, len(vocab), "resources/nicheformer")
        assert m.shape == (20310,) and np.isfinite(m).all() and (m != 0).all()
    gm = N.load_gene_map("resources/gene_maps/10x_GRCh38_features.tsv.gz")
    assert gm["ERBB2"] == "ENSG00000141736" and "ENSG00000141736" in vocab


# ---------------------------------------------------------------------------------------- model


def test_padding_handling_matches_its_definition():
    torch.manual_seed(0)
    model = N.build_nicheformer(arch={"n_tokens": 70, "context_length": 24}, tiny=True).eval()
    cell = torch.tensor([[5, 9, 4, 40, 33, 61, 35]])
    padded = torch.cat([cell, torch.full((1, 9), N.PAD_TOKEN)], dim=1)
    raw_padded = torch.cat([cell, torch.zeros((1, 17), dtype=torch.long)], dim=1)  # id 0 = raw padding
    with torch.no_grad():
        alone = model.embed(cell, exclude_padding=True)
        # gene-token mean is independent of how much padding follows (padding keys are masked)
        torch.testing.assert_close(model.embed(padded, exclude_padding=True), alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.embed(raw_padded, exclude_padding=True), alone, atol=1e-5, rtol=1e-5)
        # the reference mean includes padding positions, so it changes with the padded length
        ref16, ref24 = model.embed(padded, exclude_padding=False), model.embed(raw_padded, exclude_padding=False)
        assert not torch.allclose(ref16, ref24, atol=1e-4)
        # ... and equals the plain mean of the non-context outputs of the full sequence
        h = model.dropout(model.embeddings(padded) + model.positional_embedding(torch.arange(16)))
        for layer in model.encoder.layers:
            h = layer(h, src_key_padding_mask=padded == N.PAD_TOKEN)
        torch.testing.assert_close(ref16, h[:, 3:].mean(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone, h[:, 3:7].mean(1), atol=1e-5, rtol=1e-5)
        first = model.embed(cell, layer=0)
    assert not torch.allclose(first, alone)


# ---------------------------------------------------------------------------------------- round trips

TINY = {"dim_model": 16, "nheads": 2, "dim_feedforward": 32, "nlayers": 2, "n_tokens": 40, "context_length": 12}


@pytest.fixture
def tiny_assets(tmp_path):
    """A 10-gene vocabulary, its technology mean, a symbol map, spots and cells that use them."""
    ens = [f"ENSG{i:011d}" for i in range(10)]
    (tmp_path / "vocab.txt").write_text("\n".join(ens) + "\n")
    mean = np.linspace(1.0, 3.0, 10)
    mean[7] = np.nan
    np.save(tmp_path / "tiny_mean.npy", mean)
    pd.DataFrame({"id": ens, "sym": [f"S{i}" for i in range(10)], "t": "Gene Expression"}).to_csv(
        tmp_path / "map.tsv", sep="\t", header=False, index=False)
    rng = np.random.default_rng(0)
    genes = [f"S{i}" for i in range(10)] + ["NOTINVOCAB"]
    spots = ad.AnnData(X=sp.csr_matrix(rng.poisson(3, (3, 11)).astype(np.float32)),
                       obs=pd.DataFrame(index=["a", "b", "c"]), var=pd.DataFrame(index=genes))
    cx = rng.poisson(2, (5, 11)).astype(np.float32)
    cx[3] = 0  # a zero-count cell (dropped)
    cx[1, :10] = 0  # counts only outside the vocabulary (dropped)
    cx[1, 10] = 4
    cells = ad.AnnData(X=sp.csr_matrix(cx), obs=pd.DataFrame({"spot_id": ["a", "a", "b", "b", "a"]},
                       index=[f"c{i}" for i in range(5)]), var=pd.DataFrame(index=genes))
    params = {"vocabulary": str(tmp_path / "vocab.txt"), "technology_mean": str(tmp_path / "tiny_mean.npy"),
              "gene_map": str(tmp_path / "map.tsv"), "max_seq_len": 12, "assay": "cosmx"}
    return dict(spots=spots, cells=cells, params=params, mean=N.clean_technology_mean(mean), dir=tmp_path)


def _expected_spot_means(model, assets, exclude_padding=False):
    X = assets["cells"].X.toarray()[:, :10]  # symbols S0..S9 are vocabulary genes 0..9 in order
    toks = N.tokenize(sp.csr_matrix(X), assets["mean"], N.context_tokens("human", "cosmx", "spatial"), 12)
    with torch.no_grad():
        per_cell = {i: model.embed(torch.from_numpy(toks[i : i + 1]), exclude_padding=exclude_padding)[0].numpy()
                    for i in range(5)}
    return {"a": (per_cell[0] + per_cell[4]) / 2, "b": per_cell[2]}  # c1 (no vocabulary gene), c3 (zero) dropped


def _lightning_ckpt(model, path):
    """A checkpoint laid out as PyTorch Lightning writes it, including a class this test environment cannot
    import afterwards (as pytorch_lightning's AttributeDict would be) and the old ``pos`` buffer."""
    mod = types.ModuleType("fake_lightning_utils")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__ = "fake_lightning_utils"
    AttributeDict.__qualname__ = "AttributeDict"
    mod.AttributeDict = AttributeDict
    sys.modules["fake_lightning_utils"] = mod
    try:
        sd = dict(model.state_dict())
        sd["pos"] = torch.arange(TINY["context_length"])
        hp = AttributeDict(**TINY, dropout=0.0, batch_first=True, masking_p=0.15, lr=7e-4, learnable_pe=True,
                           specie=True, assay=True, modality=True)
        torch.save({"state_dict": sd, "hyper_parameters": hp, "epoch": 1, "global_step": 265000,
                    "pytorch-lightning_version": "2.1.0", "optimizer_states": [], "lr_schedulers": []}, path)
    finally:
        del sys.modules["fake_lightning_utils"]


def test_lightning_ckpt_round_trip_with_cells(tiny_assets, tmp_path):
    torch.manual_seed(1)
    model = N.build_nicheformer(arch=TINY).eval()
    ckpt = tmp_path / "nicheformer.ckpt"
    _lightning_ckpt(model, ckpt)
    ctx = EncodeContext(device="cpu", batch_size=2, extra={"cells": tiny_assets["cells"]})
    # no arch given: the architecture comes from the checkpoint's hyper_parameters
    df = get_encoder("nicheformer").fn(tiny_assets["spots"], {**tiny_assets["params"], "weights": str(ckpt)}, ctx)
    exp = _expected_spot_means(model, tiny_assets)
    assert df.shape == (3, 16)
    np.testing.assert_allclose(df.loc["a"].to_numpy(), exp["a"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(df.loc["b"].to_numpy(), exp["b"], rtol=1e-4, atol=1e-5)
    assert df.loc["c"].isna().all()  # spot without cells
    # the padding-free option: mean over gene tokens only -> different numbers, same plumbing
    alt = get_encoder("nicheformer").fn(
        tiny_assets["spots"], {**tiny_assets["params"], "weights": str(ckpt), "exclude_padding": True}, ctx)
    exp_alt = _expected_spot_means(model, tiny_assets, exclude_padding=True)
    np.testing.assert_allclose(alt.loc["b"].to_numpy(), exp_alt["b"], rtol=1e-4, atol=1e-5)
    assert not np.allclose(alt.loc["b"].to_numpy(), df.loc["b"].to_numpy(), atol=1e-4)
    _, report = N.load_nicheformer(ckpt)
    assert report["format"] == "lightning_ckpt" and report["ignored"] == ["pos"]
    assert report["missing"] == [] and report["unexpected"] == []


def official_get_embeddings(model, tokens: torch.Tensor) -> torch.Tensor:
    """``Nicheformer.get_embeddings(layer=-1, with_context=False)`` as the official code computes it
    (theislab/nicheformer ``src/nicheformer/models/_nicheformer.py`` and ``complete_masking`` with p = 0 in
    ``models/_utils.py``), written out here step by step with the model's own weights: raw padding 0 -> 1, token
    embedding plus the positional embedding of positions 0 .. context_length - 1, every encoder layer with the
    padding mask, the 3 context positions dropped, and a plain mean over all remaining positions, padding included.
    ``tokens``: (n_cells, context_length) int64, right-padded with 0."""
    ids = torch.where(tokens == 0, torch.ones_like(tokens), tokens)
    pad = ids == 1
    h = model.embeddings(ids) + model.positional_embedding(torch.arange(model.hparams["context_length"]))
    for layer in model.encoder.layers:
        h = layer(h, src_key_padding_mask=pad, is_causal=False)
    return h[:, 3:, :].mean(dim=1)


def test_default_embedding_is_the_official_get_embeddings(tiny_assets, tmp_path):
    """The default parameters (and the paper config) reproduce the official embedding: padding in the mean."""
    import yaml

    torch.manual_seed(4)
    model = N.build_nicheformer(arch=TINY).eval()
    ckpt = tmp_path / "nicheformer.ckpt"
    _lightning_ckpt(model, ckpt)
    params = {**tiny_assets["params"], "weights": str(ckpt)}
    assert params["max_seq_len"] == TINY["context_length"] and "exclude_padding" not in params
    ctx = EncodeContext(device="cpu", batch_size=2, extra={"cells": tiny_assets["cells"]})
    df = get_encoder("nicheformer").fn(tiny_assets["spots"], params, ctx)
    X = tiny_assets["cells"].X.toarray()[:, :10]  # symbols S0..S9 = vocabulary genes 0..9
    tokens = N.tokenize(sp.csr_matrix(X), tiny_assets["mean"], N.context_tokens("human", "cosmx", "spatial"),
                        TINY["context_length"])
    with torch.no_grad():
        cell = official_get_embeddings(model, torch.from_numpy(tokens)).numpy()
    assert np.abs(df.loc["a"].to_numpy() - (cell[0] + cell[4]) / 2).max() <= 1e-6
    assert np.abs(df.loc["b"].to_numpy() - cell[2]).max() <= 1e-6
    # the paper configuration keeps that default for every dataset
    paper = yaml.safe_load(open(REPO / "config/paper.yaml"))
    nf = {**N.DEFAULTS, **paper["encoders"]["nicheformer"]}
    assert nf["exclude_padding"] is False and nf["max_seq_len"] == N.ARCH["context_length"]
    for name, block in paper["datasets"].items():
        assert "exclude_padding" not in ((block.get("encoder_params") or {}).get("nicheformer") or {}), name


def test_safetensors_release_round_trip_via_cli(tiny_assets, tmp_path):
    from safetensors.torch import save_file

    from workflow_scripts.encoders.embed import main as embed_main

    torch.manual_seed(2)
    model = N.build_nicheformer(arch=TINY).eval()
    wdir = tmp_path / "hf"
    wdir.mkdir()
    # HF layout: keys under "nicheformer.", a persistent pos buffer, MLM head only, config.json next to it
    sd = {("nicheformer." + k): v.contiguous() for k, v in model.state_dict().items()
          if not k.startswith(("classifier_head", "pooler_head", "cls_head"))}
    sd["nicheformer.pos"] = torch.arange(TINY["context_length"])
    sd["classifier_head.weight"] = model.classifier_head.weight.detach().contiguous()
    sd["classifier_head.bias"] = model.classifier_head.bias.detach().contiguous()
    save_file(sd, str(wdir / "model.safetensors"))
    (wdir / "config.json").write_text(json.dumps({**TINY, "model_type": "nicheformer", "learnable_pe": True}))
    spots_path, cells_path, out = tmp_path / "spots.h5ad", tmp_path / "cells.h5ad", tmp_path / "emb.parquet"
    tiny_assets["spots"].write_h5ad(spots_path)
    tiny_assets["cells"].write_h5ad(cells_path)
    embed_main(["--encoder", "nicheformer", "--dataset", str(spots_path), "--cells", str(cells_path),
                "--out", str(out), "--weights", str(wdir), "--params", json.dumps(tiny_assets["params"]),
                "--device", "cpu", "--batch-size", "3", "--num-workers", "2", "--log", str(tmp_path / "e.log")])
    df = read_embedding(out)
    exp = _expected_spot_means(model, tiny_assets)
    np.testing.assert_allclose(df.loc["a"].to_numpy(), exp["a"], rtol=1e-4, atol=1e-5)
    log = (tmp_path / "e.log").read_text()
    assert "1 of 5 cells have zero counts" in log and "1 cells have counts only in genes outside" in log
    assert "via gene map 10" in log and "1 of 3 spots have no embeddable cell" in log
    _, report = N.load_nicheformer(wdir, device="meta")
    assert report["format"] == "safetensors"
    assert sorted(report["missing"]) == ["cls_head.bias", "cls_head.weight", "pooler_head.bias", "pooler_head.weight"]


def test_bad_checkpoints_fail_with_instructions(tiny_assets, tmp_path):
    torch.manual_seed(3)
    model = N.build_nicheformer(arch=TINY)
    sd = dict(model.state_dict())
    del sd["encoder.layers.1.linear2.weight"]
    torch.save({"state_dict": sd, "hyper_parameters": {**TINY}}, tmp_path / "a.ckpt")
    with pytest.raises(WeightsError, match="encoder.layers.1.linear2.weight") as e:
        N.load_nicheformer(tmp_path / "a.ckpt")
    assert "aletlvl/Nicheformer" in str(e.value)
    torch.save({"state_dict": dict(model.state_dict()), "hyper_parameters": {**TINY, "nlayers": 3}}, tmp_path / "b.ckpt")
    with pytest.raises(WeightsError, match="nlayers=3 but tensors imply 2"):
        N.load_nicheformer(tmp_path / "b.ckpt")
    with pytest.raises(WeightsError, match="weights.nicheformer.path"):
        get_encoder("nicheformer").fn(tiny_assets["spots"], {**tiny_assets["params"], "weights": None},
                                      EncodeContext(device="cpu"))
    torch.save({"state_dict": dict(model.state_dict()), "hyper_parameters": {**TINY}}, tmp_path / "c.ckpt")
    with pytest.raises(WeightsError, match="trained with"):  # explicit arch that contradicts the file
        N.load_nicheformer(tmp_path / "c.ckpt", arch={"dim_model": 32})


def test_a_cell_in_overlapping_patches_is_embedded_once(tiny_assets, tmp_path, caplog, monkeypatch):
    """Cell-level data list (cell, patch) pairs; a shared cell is run through the model once and counts in both."""
    import logging

    torch.manual_seed(1)
    model = N.build_nicheformer(arch=TINY).eval()
    ckpt = tmp_path / "nicheformer.ckpt"
    _lightning_ckpt(model, ckpt)
    cells = tiny_assets["cells"]
    # cell c2 (spot b) also lies in patch c: one more (cell, patch) row with the same cell_id and counts
    dup = ad.concat([cells, cells[["c2"]]], index_unique="-")
    dup.obs_names = [f"r{i}" for i in range(dup.n_obs)]
    dup.obs["spot_id"] = ["a", "a", "b", "b", "a", "c"]
    dup.obs["cell_id"] = ["c0", "c1", "c2", "c3", "c4", "c2"]
    seen = []
    real = N.iter_cell_embeddings

    def spy(model, ds, rows, *a, **k):
        seen.extend(np.asarray(rows).tolist())
        yield from real(model, ds, rows, *a, **k)

    monkeypatch.setattr(N, "iter_cell_embeddings", spy)
    caplog.set_level(logging.INFO)
    ctx = EncodeContext(device="cpu", batch_size=2, extra={"cells": dup})
    df = get_encoder("nicheformer").fn(tiny_assets["spots"], {**tiny_assets["params"], "weights": str(ckpt)}, ctx)
    exp = _expected_spot_means(model, tiny_assets)
    assert sorted(seen) == [0, 2, 4]  # c2 embedded once; c1 (no vocabulary gene) and c3 (zero) dropped
    np.testing.assert_allclose(df.loc["a"].to_numpy(), exp["a"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(df.loc["b"].to_numpy(), exp["b"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(df.loc["c"].to_numpy(), exp["b"], rtol=1e-4, atol=1e-5)  # the same cell
    assert "share 3 distinct cells" in caplog.text
