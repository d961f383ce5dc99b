"""Tests for workflow_scripts.evaluation.probes (linear probes with CV, docs/reference.md#probes)."""

from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from workflow_scripts.data.model import validate_spots
from workflow_scripts.io import embedding_frame, write_embedding
from workflow_scripts.evaluation.probes import (
    PROBE_COLUMNS,
    clean_labels,
    cv_splits,
    fit_classifier_fold,
    main,
    run_probes,
    task_targets,
)

PARAMS = {"n_folds": 5, "cv": "kfold", "logreg_max_iter": 2000, "ridge_alphas": list(np.logspace(-3, 3, 10))}


def toy_adata(labels, n_slides=3, comp=None, extra_obs=None) -> ad.AnnData:
    """Minimal spots AnnData following workflow_scripts/data/model.py (no images)."""
    n = len(labels)
    ids = [f"s{i}" for i in range(n)]
    slide = np.array([f"S{i % n_slides}" for i in range(n)])
    obs = pd.DataFrame(
        {
            "slide": pd.Categorical(slide),
            "donor": pd.Categorical(slide),
            "x_um": np.arange(n, dtype=float) * 200.0,
            "y_um": np.zeros(n),
            "px_x": np.arange(n, dtype=float),
            "px_y": np.zeros(n),
            "split": pd.Categorical(["eval"] * n),
            "label": pd.Categorical(labels),
        },
        index=ids,
    )
    for k, v in (extra_obs or {}).items():
        obs[k] = v
    a = ad.AnnData(X=np.zeros((n, 2), dtype=np.float32), obs=obs)
    a.uns["slides"] = {s: {"image_path": "none.tif", "um_per_px": 1.0} for s in np.unique(slide)}
    if comp is not None:
        a.obsm["composition"] = comp
        a.uns["composition_names"] = [f"ct{k}" for k in range(comp.shape[1])]
    validate_spots(a, check_images=False)
    return a


def test_separable_classes_score_near_one():
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b", "c"], 60)
    centres = {"a": [8, 0, 0, 0], "b": [0, 8, 0, 0], "c": [0, 0, 8, 0]}
    X = np.stack([centres[c] for c in y]) + rng.normal(size=(len(y), 4))
    a = toy_adata(y)
    emb = embedding_frame(X, a.obs_names)
    res = run_probes(emb, a, {"t": {"type": "classification", "label": "label"}}, PARAMS, seed=0)
    assert list(res.columns) == PROBE_COLUMNS
    assert len(res) == 5 and (res["metric"] == "macro_f1").all()
    assert res["value"].min() > 0.97
    assert (res["n_train"] + res["n_test"]).eq(180).all()
    assert res["n_classes"].eq(3).all()


def test_noise_labels_score_near_chance():
    rng = np.random.default_rng(1)
    n = 400
    y = rng.choice(["a", "b", "c", "d"], size=n)
    a = toy_adata(y)
    emb = embedding_frame(rng.normal(size=(n, 8)), a.obs_names)
    res = run_probes(emb, a, {"t": {"type": "classification", "label": "label"}}, PARAMS, seed=0)
    assert 0.12 < res["value"].mean() < 0.38  # chance macro-F1 for 4 balanced classes ≈ 0.25


def test_ridge_recovers_linear_targets():
    rng = np.random.default_rng(2)
    n, d = 200, 6
    X = rng.normal(size=(n, d))
    W = rng.normal(size=(d, 3))
    Y = X @ W + 0.05 * rng.normal(size=(n, 3))
    a = toy_adata(np.repeat("x", n), comp=Y)
    emb = embedding_frame(X, a.obs_names)
    res = run_probes(emb, a, {"comp": {"type": "regression", "obsm": "composition"}}, PARAMS, seed=3)
    assert len(res) == 5 and (res["metric"] == "r2").all()
    assert res["value"].min() > 0.95
    assert res["alpha"].isin(PARAMS["ridge_alphas"]).all()
    # and a noise target is not predictable
    a.obsm["composition"] = rng.normal(size=(n, 3))
    res2 = run_probes(emb, a, {"comp": {"type": "regression", "obsm": "composition"}}, PARAMS, seed=3)
    assert res2["value"].mean() < 0.1


def test_regression_drops_nonfinite_and_zero_rows(caplog):
    rng = np.random.default_rng(3)
    n = 100
    X = rng.normal(size=(n, 4))
    Y = X[:, :2] @ np.eye(2) + 1.0
    Y[:3] = np.nan
    Y[3:7] = 0.0
    a = toy_adata(np.repeat("x", n), comp=Y)
    with caplog.at_level(logging.INFO):
        res = run_probes(embedding_frame(X, a.obs_names), a, {"comp": {"type": "regression", "obsm": "composition"}},
                         PARAMS, seed=0)
    assert (res["n_train"] + res["n_test"]).eq(n - 7).all()
    assert "dropped 3 of 100 rows with non-finite targets" in caplog.text
    assert "dropped 4 of 100 all-zero target rows" in caplog.text


def test_excluded_and_rare_classes_are_dropped_and_logged(caplog):
    rng = np.random.default_rng(4)
    y = np.array(["a"] * 50 + ["b"] * 50 + ["unknown"] * 30 + ["tiny"] * 4 + [None] * 6, dtype=object)
    a = toy_adata(y)
    X = rng.normal(size=(len(y), 4))
    X[y == "a", 0] += 6
    with caplog.at_level(logging.INFO):
        res = run_probes(embedding_frame(X, a.obs_names), a,
                         {"t": {"type": "classification", "label": "label", "exclude": ["unknown"]}},
                         PARAMS, seed=0, min_class_size=10)
    assert (res["n_train"] + res["n_test"] + res["n_dropped_test"]).eq(100).all()
    assert res["n_classes"].eq(2).all()
    assert "dropped 6 of 140 spots with no label" in caplog.text
    assert "dropped excluded class 'unknown' (30 spots)" in caplog.text
    assert "dropped rare class 'tiny' (4 spots < min_class_size 10)" in caplog.text


def test_clean_labels_unit():
    s = pd.Series(["a"] * 12 + ["b"] * 3 + ["x"] * 20 + [np.nan], index=[f"i{k}" for k in range(36)])
    out = clean_labels(s, exclude=["x"], min_class_size=10)
    assert sorted(out.unique()) == ["a"] and len(out) == 12
    out = clean_labels(s, exclude=None, min_class_size=3)
    assert sorted(out.unique()) == ["a", "b", "x"]


def test_partial_label_task_uses_labelled_subset_and_absent_column_is_skipped(caplog):
    rng = np.random.default_rng(5)
    n = 150
    y = rng.choice(["a", "b"], size=n)
    patho = np.where(np.arange(n) % 3 == 0, y, None)  # only slide S0 labelled
    a = toy_adata(y, extra_obs={"pathology": pd.Categorical(patho)})
    X = rng.normal(size=(n, 3))
    X[:, 0] += np.where(y == "a", 5, 0)
    tasks = {
        "pathology": {"type": "classification", "label": "pathology", "exclude": ["undetermined"]},
        "missing": {"type": "classification", "label": "not_a_column"},
    }
    with caplog.at_level(logging.INFO):
        res = run_probes(embedding_frame(X, a.obs_names), a, tasks, PARAMS, seed=0)
    assert set(res["task"]) == {"pathology"}
    assert (res["n_train"] + res["n_test"] + res["n_dropped_test"]).eq(50).all()
    assert "obs has no column 'not_a_column'; task skipped" in caplog.text
    # a single remaining class: skipped
    assert task_targets(a, "one", {"type": "classification", "label": "label", "exclude": ["a"]}) is None


def test_invalid_spec_raises():
    a = toy_adata(["a", "b"] * 20)
    emb = embedding_frame(np.zeros((40, 2)), a.obs_names)
    with pytest.raises(ValueError, match="task 'bad'"):
        run_probes(emb, a, {"bad": {"type": "clustering", "label": "label"}}, PARAMS, seed=0)
    with pytest.raises(ValueError, match="needs the key 'obsm'"):
        run_probes(emb, a, {"bad": {"type": "regression"}}, PARAMS, seed=0)
    with pytest.raises(ValueError, match="probe.cv"):
        cv_splits(40, None, {"cv": "loo"}, 0)


def test_group_slide_never_splits_a_slide(caplog):
    rng = np.random.default_rng(6)
    n = 240
    groups = np.array([f"S{i % 3}" for i in range(n)])
    with caplog.at_level(logging.INFO):
        splits = cv_splits(n, groups, {"cv": "group_slide", "n_folds": 5}, seed=0)
    assert len(splits) == 3 and "only 3 slides; group_slide uses 3 folds" in caplog.text
    for tr, te in splits:
        assert not set(groups[tr]) & set(groups[te])
    assert sorted(np.concatenate([te for _, te in splits]).tolist()) == list(range(n))
    # through run_probes: 3 folds, each test fold = one slide (80 spots)
    y = rng.choice(["a", "b"], size=n)
    a = toy_adata(y, n_slides=3)
    res = run_probes(embedding_frame(rng.normal(size=(n, 3)), a.obs_names), a,
                     {"t": {"type": "classification", "label": "label"}}, {**PARAMS, "cv": "group_slide"}, seed=0)
    assert len(res) == 3 and (res["n_test"] + res["n_dropped_test"]).eq(80).all()
    # one slide only: no folds
    assert cv_splits(50, np.repeat("S0", 50), {"cv": "group_slide"}, 0) == []


def test_kfold_is_seeded():
    s0 = cv_splits(50, None, PARAMS, seed=0)
    s0b = cv_splits(50, None, PARAMS, seed=0)
    s1 = cv_splits(50, None, PARAMS, seed=1)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(s0, s0b))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(s0, s1))


def test_common_class_filter_counts_dropped_test_rows():
    rng = np.random.default_rng(7)
    Xtr, Xte = rng.normal(size=(40, 2)), rng.normal(size=(12, 2))
    ytr = np.array(["a", "b"] * 20)
    yte = np.array(["a", "b"] * 5 + ["c", "c"])
    res = fit_classifier_fold(Xtr, ytr, Xte, yte, 200, 0)
    assert res["n_dropped_test"] == 2 and res["n_test"] == 10 and res["n_classes"] == 2
    assert fit_classifier_fold(Xtr, ytr, Xte[:4], yte[:4], 200, 0) is None  # < 5 test rows


def test_embedding_matching_drops_nan_and_unknown_rows(caplog):
    rng = np.random.default_rng(8)
    y = np.repeat(["a", "b"], 50)
    a = toy_adata(y)
    X = rng.normal(size=(100, 3))
    X[y == "a", 0] += 5
    X[0] = np.nan
    emb = embedding_frame(np.vstack([X, np.ones((2, 3))]), list(a.obs_names) + ["zz1", "zz2"])
    with caplog.at_level(logging.INFO):
        res = run_probes(emb, a, {"t": {"type": "classification", "label": "label"}}, PARAMS, seed=0)
    assert (res["n_train"] + res["n_test"]).eq(99).all()
    assert "dropped 1 of 102 rows with NaN/inf" in caplog.text
    assert "2 embedding rows not in the AnnData, 1 AnnData spots without embedding" in caplog.text


def test_cli_writes_long_table(tmp_path):
    rng = np.random.default_rng(9)
    y = np.repeat(["a", "b"], 40)
    comp = rng.dirichlet(np.ones(3), size=80)
    a = toy_adata(y, comp=comp)
    a.write_h5ad(tmp_path / "spots.h5ad")
    X = rng.normal(size=(80, 4))
    X[:, 0] += np.where(y == "a", 4, 0)
    write_embedding(embedding_frame(X, a.obs_names), tmp_path / "e.parquet", {"name": "toy"})
    tasks = {"t": {"type": "classification", "label": "label"}, "comp": {"type": "regression", "obsm": "composition"}}
    out = tmp_path / "out" / "p.tsv"
    main(["--embedding", str(tmp_path / "e.parquet"), "--spots", str(tmp_path / "spots.h5ad"), "--dataset", "toy",
          "--name", "emb1", "--seed", "2", "--tasks", json.dumps(tasks), "--params", json.dumps(PARAMS),
          "--out", str(out), "--log", str(tmp_path / "p.log")])
    df = pd.read_csv(out, sep="\t")
    assert list(df.columns) == ["dataset", "embedding", "seed", *PROBE_COLUMNS]
    assert set(df["task"]) == {"t", "comp"} and len(df) == 10
    assert (df["seed"] == 2).all() and (df["embedding"] == "emb1").all()
    assert df.loc[df.task == "t", "value"].mean() > 0.9
    assert (tmp_path / "p.log").read_text().count("fold") >= 10
