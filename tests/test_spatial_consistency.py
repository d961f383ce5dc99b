"""Spatial consistency: close-vs-far spot pairs within slides (workflow_scripts/evaluation/spatial_consistency.py)."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import pdist

from workflow_scripts.evaluation import spatial_consistency as sc
from workflow_scripts.io import embedding_frame, write_embedding


def grid_slides(n_slides=3, side=12, pitch=200.0):
    coords, slides = [], []
    for s in range(n_slides):
        g = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2) * pitch
        coords.append(g + 17.0 * s)  # each slide in its own frame
        slides += [f"S{s}"] * len(g)
    return np.vstack(coords), np.array(slides)


def smooth_embedding(coords, d=12, seed=0):
    """An embedding that varies smoothly with position (length scale ~1 mm) plus a little noise."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((2, d // 2)) / 1000.0
    e = np.hstack([np.sin(coords @ w), np.cos(coords @ w)])
    return e + 0.05 * rng.standard_normal(e.shape)


def test_smooth_embedding_separates_close_from_far_pairs():
    coords, slides = grid_slides()
    df = sc.spatial_consistency(smooth_embedding(coords), coords, slides, {}, seed=0)
    auc = df.loc[df.metric == "roc_auc", "value"]
    assert len(auc) == 3 and auc.min() > 0.9
    assert df.loc[df.metric == "accuracy", "value"].mean() > 0.8
    assert (df["cv"] == "group_slide").all()


def test_random_embedding_is_at_chance():
    coords, slides = grid_slides()
    e = np.random.default_rng(1).standard_normal((len(coords), 12))
    df = sc.spatial_consistency(e, coords, slides, {}, seed=0)
    assert abs(df.loc[df.metric == "roc_auc", "value"].mean() - 0.5) < 0.06


def test_pairs_are_within_slide_balanced_and_respect_distances():
    from scipy.spatial.distance import cdist

    coords, slides = grid_slides()
    pairs, y, ps = sc.sample_pairs(coords, slides, {"k": 4, "far_percentile": 80}, seed=3)
    kth = np.empty(len(coords))  # distance of each spot to its 4th nearest spot of the same slide
    for s in np.unique(slides):
        i = np.flatnonzero(slides == s)
        kth[i] = np.sort(cdist(coords[i], coords[i]), axis=1)[:, 4]
    assert (slides[pairs[:, 0]] == ps).all() and (slides[pairs[:, 1]] == ps).all()
    assert (pairs[:, 0] < pairs[:, 1]).all()
    assert len(np.unique(pairs, axis=0)) == len(pairs)
    for s in np.unique(ps):
        assert (y[ps == s] == 1).sum() == (y[ps == s] == 0).sum()  # balanced per slide
        idx = np.flatnonzero(slides == s)
        thr = np.percentile(pdist(coords[idx]), 80)
        d = np.linalg.norm(coords[pairs[:, 0]] - coords[pairs[:, 1]], axis=1)
        close = (ps == s) & (y == 1)
        # a close pair is among the 4 nearest of one of its spots; on a 200 µm grid mostly the axis neighbours
        assert (d[close] <= np.maximum(kth[pairs[close, 0]], kth[pairs[close, 1]]) + 1e-9).all()
        assert np.median(d[close]) == 200.0
        assert (d[(ps == s) & (y == 0)] > thr).all()


def test_knn_pairs_on_a_grid_by_hand():
    coords = np.array([[0, 0], [1, 0], [2, 0], [10, 0]], dtype=float)
    pairs = sc.knn_pairs(coords, 1)
    # nearest of 0 is 1, of 1 is 0 or 2, of 2 is 1, of 3 is 2 → {(0,1), (1,2) or dup, (2,3)}
    assert {tuple(p) for p in pairs} >= {(0, 1), (2, 3)}
    assert all(p[0] < p[1] for p in pairs)


def test_folds_are_grouped_by_slide():
    coords, slides = grid_slides(n_slides=4, side=8)
    df = sc.spatial_consistency(smooth_embedding(coords), coords, slides, {"n_folds": 2}, seed=0)
    per_fold = df.groupby("fold")["test_slides"].first().str.split(",")
    seen = [s for fold in per_fold for s in fold]
    assert len(seen) == len(set(seen)) == 4  # every slide is in exactly one test fold


def test_single_slide_falls_back_to_stratified_folds():
    coords, slides = grid_slides(n_slides=1)
    df = sc.spatial_consistency(smooth_embedding(coords), coords, slides, {}, seed=0)
    assert (df["cv"] == "stratified_pairs").all() and df["fold"].nunique() == 5


def test_pair_features_by_hand():
    e = np.array([[1.0, 2.0], [3.0, -1.0]])
    f = sc.pair_features(e, np.array([[0, 1]]), ["absdiff", "product", "cosine", "sqdist"],
                         np.random.default_rng(0))
    np.testing.assert_allclose(f[0], [2.0, 3.0, 3.0, -2.0, 1 / (np.sqrt(5) * np.sqrt(10)), 13.0])


def test_bad_params_are_named():
    coords, slides = grid_slides(n_slides=2, side=4)
    with pytest.raises(ValueError, match="far_percentile"):
        sc.spatial_consistency(np.zeros((len(coords), 2)), coords, slides, {"far_percentile": 120})
    with pytest.raises(ValueError, match="pair_features"):
        sc.check_params({"pair_features": ["dot"]})


def test_cli_on_a_spots_file(tmp_path):
    coords, slides = grid_slides(n_slides=2, side=8)
    ids = [f"spot{i}" for i in range(len(coords))]
    obs = pd.DataFrame({"slide": pd.Categorical(slides), "x_um": coords[:, 0], "y_um": coords[:, 1]},
                       index=pd.Index(ids))
    ad.AnnData(X=np.zeros((len(ids), 1), dtype=np.float32), obs=obs).write_h5ad(tmp_path / "spots.h5ad")
    emb = embedding_frame(smooth_embedding(coords), ids).iloc[:-3]  # 3 spots without embedding: dropped, logged
    write_embedding(emb, tmp_path / "e.parquet")
    out = tmp_path / "sc.tsv"
    sc.main(["--embedding", str(tmp_path / "e.parquet"), "--spots", str(tmp_path / "spots.h5ad"), "--dataset", "toy",
             "--name", "smooth", "--seed", "0", "--out", str(out), "--log", str(tmp_path / "log.txt")])
    t = pd.read_csv(out, sep="\t")
    assert list(t.columns[:3]) == ["dataset", "embedding", "seed"]
    assert set(t["metric"]) == {"f1", "accuracy", "roc_auc"}
    assert t.loc[t.metric == "roc_auc", "value"].min() > 0.9
    assert "3 spots without an embedding row" in (tmp_path / "log.txt").read_text()
