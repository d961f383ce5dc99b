"""Figures of the analyses (workflow_scripts/figures/analysis.py): summaries by hand, PNGs written, UMAP seeded."""

import numpy as np
import pandas as pd
import pytest

from workflow_scripts.analysis import umap as umap_mod
from workflow_scripts.figures import analysis as fa
from workflow_scripts.io import embedding_frame


def test_scaling_summary_by_hand():
    rows = []
    for seed, vals in ((0, [0.6, 0.8]), (1, [0.9, 0.9])):
        for fold, v in enumerate(vals):
            rows.append(dict(mode="offline", config="pca", fraction=0.1, seed=seed, n_fit=10, embedding="gex",
                             task="t", metric="macro_f1", fold=fold, value=v))
    s = fa.scaling_summary(pd.DataFrame(rows))
    assert len(s) == 1
    assert s["mean"].iloc[0] == pytest.approx(0.8)   # mean of the seed means 0.7 and 0.9
    assert s["sd"].iloc[0] == pytest.approx(0.1)     # sd over seeds, not over folds
    one = fa.scaling_summary(pd.DataFrame(rows[:2]))
    assert one["sd"].iloc[0] == pytest.approx(0.1)   # one seed: sd over folds


def test_read_histories_parses_method_and_seed(tmp_path):
    paths = []
    for m, s, n in (("cca", 0, 1), ("comm", 2, 3), ("concat", 0, 0)):
        p = tmp_path / "results/toy/aligned" / m / f"seed{s}.history.tsv"
        p.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"epoch": range(1, n + 1), "train_loss": np.linspace(1, 0.5, n), "val_loss": np.linspace(1.1, 0.6, n),
                      "val_loss_smooth": np.linspace(1.1, 0.7, n), "lr": 1e-4},
                     columns=["epoch", "train_loss", "val_loss", "val_loss_smooth", "lr"]).to_csv(p, sep="\t", index=False)
        paths.append(p)
    h = fa.read_histories(paths)
    assert sorted(set(zip(h["method"], h["seed"]))) == [("cca", 0), ("comm", 2)]  # concat: header only
    assert len(h) == 4
    fa.plot_training_curves(h, tmp_path / "tc.png")
    assert (tmp_path / "tc.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="history path"):
        fa.read_histories([tmp_path / "other.tsv"])


def test_spectral_and_spatial_figures_are_written(tmp_path):
    rows = []
    for src, k in (("unimodal", 2), ("cca", 3)):
        for seed in (0, 1):
            for r in range(1, 9):
                rows.append(dict(dataset="toy", source=src, seed=seed, rank=r, singular_value=0.9 / r,
                                 null_median=0.2, null_lo=0.15, null_hi=0.3, p_value=0.01, significant=r <= k,
                                 n_significant=k))
    fa.plot_spectral(pd.DataFrame(rows), tmp_path / "spec.png")
    sc = pd.DataFrame([dict(embedding=e, metric=m, mean=0.6, sd=0.05) for e in ("unimodal_gex", "comm", "random")
                       for m in ("roc_auc", "f1", "accuracy")])
    fa.plot_spatial_consistency(sc, tmp_path / "sc.png")
    assert (tmp_path / "spec.png").stat().st_size > 10_000 and (tmp_path / "sc.png").stat().st_size > 10_000


def test_umap_is_deterministic_and_separates_clusters():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 1, (60, 6)), rng.normal(8, 1, (60, 6))])
    e = embedding_frame(x, [f"s{i}" for i in range(120)])
    a = umap_mod.umap_coords(e, {"n_neighbors": 10, "random_state": 3})
    b = umap_mod.umap_coords(e, {"n_neighbors": 10, "random_state": 3})
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy())
    c0, c1 = a.iloc[:60].mean().to_numpy(), a.iloc[60:].mean().to_numpy()
    spread = a.iloc[:60].std().mean()
    assert np.linalg.norm(c0 - c1) > 3 * spread


def test_umap_cli_fits_several_embeddings_in_one_process_as_each_alone(tmp_path):
    import json

    from workflow_scripts.io import write_embedding

    rng = np.random.default_rng(1)
    paths = []
    for k in range(2):
        x = np.vstack([rng.normal(0, 1, (40, 5 + k)), rng.normal(6, 1, (40, 5 + k))])
        paths.append(tmp_path / f"e{k}.parquet")
        write_embedding(embedding_frame(x, [f"s{i}" for i in range(80)]), paths[-1])
    params = json.dumps({"n_neighbors": 10, "random_state": 3})
    both, alone = tmp_path / "both.tsv", tmp_path / "alone.tsv"
    umap_mod.main(["--embedding", *map(str, paths), "--names", "a", "b", "--params", params, "--out", str(both)])
    umap_mod.main(["--embedding", str(paths[1]), "--params", params, "--out", str(alone)])
    t, t1 = pd.read_csv(both, sep="\t"), pd.read_csv(alone, sep="\t")
    assert list(t.columns) == ["embedding", "spot_id", "umap1", "umap2"] and list(t["embedding"].unique()) == ["a", "b"]
    assert (t1["embedding"] == "e1").all()                 # default name: the file name
    b = t[t["embedding"] == "b"].reset_index(drop=True)
    pd.testing.assert_frame_equal(b.drop(columns="embedding"), t1.drop(columns="embedding"))  # batch changes nothing
    with pytest.raises(SystemExit):  # one name per embedding
        umap_mod.main(["--embedding", *map(str, paths), "--names", "a", "--params", params, "--out", str(both)])
    # the figure takes the combined table: one panel per embedding
    import anndata as ad

    spots = tmp_path / "spots.h5ad"
    obs = pd.DataFrame({"slide": ["S0"] * 40 + ["S1"] * 40}, index=[f"s{i}" for i in range(80)])
    ad.AnnData(obs=obs).write_h5ad(spots)
    fa.main(["umap", "--coords", str(both), "--spots", str(spots), "--colour", "slide", "--out", str(tmp_path / "u.png")])
    assert (tmp_path / "u.png").stat().st_size > 5_000
