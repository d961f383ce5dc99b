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
    # the recorded chance level of each fold: ≈ 1/K for balanced classes, and the noise probe's mean is near it
    assert np.allclose(res["chance"], 0.25, atol=0.03)
    assert abs(res["value"].mean() - res["chance"].mean()) < 0.08


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
    assert (res["n_train"] + res["n_test"]).eq(100).all()
    assert res["n_classes"].eq(2).all() and res["n_classes_unseen"].eq(0).all()
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
    assert (res["n_train"] + res["n_test"]).eq(50).all()
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
    assert len(res) == 3 and res["n_test"].eq(80).all() and (res["scheme"] == "group_slide").all()
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
    assert "2 of 101 embedding rows are not among the fold table's spots" in caplog.text
    assert "1 of 100 spots have no (finite) embedding row and are left out" in caplog.text


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


# ---------------------------------------------------------------------------------------- tuned probes, shared folds
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from workflow_scripts.evaluation.probes import (  # noqa: E402
    control_embeddings,
    fit_logreg_cv_fold,
    macro_f1,
    reduce_rank,
    split_hash,
)


def test_macro_f1_over_the_fixed_class_set_hand_computation():
    y = np.array(["a", "a", "b", "b"])
    p = np.array(["a", "b", "b", "c"])
    # a: 2·1/(2+0+1) = 2/3; b: 2·1/(2+1+1) = 1/2; c (predicted, absent): 0; d (neither): left out
    assert macro_f1(y, p, ["a", "b", "c", "d"]) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert macro_f1(y, y, ["a", "b", "c"]) == pytest.approx(1.0)


def test_reduce_rank_leaves_the_logistic_probe_unchanged():
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(150, 4))
    X = Z @ rng.normal(size=(4, 30))  # a 30-d re-encoding of rank 4
    y = (Z[:, 0] + 0.5 * Z[:, 1] > 0).astype(int)
    sc = StandardScaler().fit(X[:100])
    Xtr, Xte = sc.transform(X[:100]), sc.transform(X[100:])
    Rtr, Rte, r = reduce_rank(Xtr, Xte)
    assert r == 4 and Rtr.shape == (100, 4) and Rte.shape == (50, 4)
    full = LogisticRegression(C=0.3, tol=1e-10, max_iter=10000).fit(Xtr, y[:100])
    red = LogisticRegression(C=0.3, tol=1e-10, max_iter=10000).fit(Rtr, y[:100])
    np.testing.assert_allclose(full.decision_function(Xte), red.decision_function(Rte), atol=1e-5)


def test_reduce_rank_large_data_path_keeps_full_rank_folds_unrotated():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 12))
    Xtr, Xte, r = reduce_rank(X[:150], X[150:], keep_full_rank=True)
    assert r == 12 and np.array_equal(Xtr, X[:150]) and np.array_equal(Xte, X[150:])  # the features themselves
    Z = rng.normal(size=(200, 4))
    low = Z @ rng.normal(size=(4, 30))  # rank 4 in 30 dimensions, more rows than columns: the QR route
    a = reduce_rank(low[:150], low[150:], keep_full_rank=True)
    b = reduce_rank(low[:150], low[150:])
    assert a[2] == b[2] == 4 and a[0].shape == (150, 4)
    # the same row space: equal Gram matrices of the coordinates (the bases differ by a rotation at most)
    np.testing.assert_allclose(a[0] @ a[0].T, b[0] @ b[0].T, atol=1e-8)
    np.testing.assert_allclose(a[1] @ a[0].T, b[1] @ b[0].T, atol=1e-8)


def test_single_C_large_data_probe_matches_the_float64_rotated_fit():
    """A single C with lbfgs on a full-rank fold: float32, unrotated; predictions as the float64 fit in the SVD
    coordinates (the same strictly convex optimum, within the L-BFGS tolerance)."""
    rng = np.random.default_rng(4)
    n, d, k = 900, 300, 3  # (rank + 1) · classes = 903 > 800: lbfgs
    y = rng.integers(0, k, n)
    X = rng.normal(size=(k, d))[y] * 0.15 + rng.normal(size=(n, d))
    labels = np.array(["a", "b", "c"])[y]
    tr, te = np.arange(700), np.arange(700, n)
    res = fit_logreg_cv_fold(X[tr], labels[tr], X[te], labels[te], ["a", "b", "c"], Cs=[1.0])
    assert res["rank"] == d and res["C"] == 1.0
    sc = StandardScaler().fit(X[tr])
    A, B, r = reduce_rank(sc.transform(X[tr]), sc.transform(X[te]))
    ref = LogisticRegression(C=1.0, max_iter=2000).fit(A, labels[tr]).predict(B)
    assert res["value"] == pytest.approx(macro_f1(labels[te], ref, ["a", "b", "c"]), abs=0.02)


def test_ridge_probe_fold_equals_scaled_ridgecv():
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score

    from workflow_scripts.evaluation.probes import DEFAULT_ALPHAS, fit_regressor_fold

    rng = np.random.default_rng(5)
    X = rng.normal(size=(160, 25)) * rng.uniform(0.1, 10, 25)
    Y = X[:, :3] @ rng.normal(size=(3, 4)) * 0.2 + rng.normal(size=(160, 4))
    res = fit_regressor_fold(X[:120], Y[:120], X[120:], Y[120:], DEFAULT_ALPHAS)
    sc = StandardScaler().fit(X[:120])
    ref = RidgeCV(alphas=DEFAULT_ALPHAS, scoring="r2").fit(sc.transform(X[:120]), Y[:120])
    assert res["alpha"] == ref.alpha_
    assert res["value"] == pytest.approx(r2_score(Y[120:], ref.predict(sc.transform(X[120:]))), abs=1e-10)


def test_tuned_probe_records_C_and_scores_unseen_classes_as_errors(monkeypatch):
    rng = np.random.default_rng(1)
    n = 120
    y = np.repeat(["a", "b", "c"], n // 3)
    X = rng.normal(size=(n, 5)) + np.where(y == "a", 3.0, 0.0)[:, None] * np.eye(5)[0]
    tr = y != "c"  # class c never in the training part
    res = fit_logreg_cv_fold(X[tr], y[tr], X[~tr | (np.arange(n) % 4 == 0)], y[~tr | (np.arange(n) % 4 == 0)],
                             ["a", "b", "c"], Cs=[0.01, 1.0], inner_folds=3, random_state=0)
    assert res["C"] in (0.01, 1.0) and res["n_classes"] == 3 and res["n_classes_unseen"] == 1
    assert res["n_classes_test"] == 3 and res["rank"] == 5 and res["dim"] == 5
    # one C in the grid: the probe is a plain standardised logistic regression at that C, with no inner CV
    import workflow_scripts.evaluation.probes as probes_mod

    def no_inner_cv(*a, **k):
        raise AssertionError("a single C needs no inner cross-validation")

    monkeypatch.setattr(probes_mod, "LogisticRegressionCV", no_inner_cv)
    one = fit_logreg_cv_fold(X[:90], y[:90], X[90:], y[90:], ["a", "b", "c"], Cs=[0.5], inner_folds=2)
    sc = StandardScaler().fit(X[:90])
    ref = LogisticRegression(C=0.5, max_iter=2000).fit(sc.transform(X[:90]), y[:90]).predict(sc.transform(X[90:]))
    assert one["C"] == 0.5 and one["value"] == pytest.approx(macro_f1(y[90:], ref, ["a", "b", "c"]))
    assert fit_logreg_cv_fold(X[:5], y[:5], X[5:], y[5:], ["a"], Cs=[1.0]) is None  # < 10 training rows


def _write_case(tmp_path, n=90, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(["a", "b", "c"], n // 3)
    comp = rng.dirichlet(np.ones(3), size=n)
    a = toy_adata(y, comp=comp)
    a.write_h5ad(tmp_path / "spots.h5ad")
    sig = np.eye(6)[np.searchsorted(["a", "b", "c"], y)][:, :6]
    gex = rng.normal(size=(n, 6)) + 1.5 * sig
    img = rng.normal(size=(n, 4)) * [1.0, 10.0, 0.01, 100.0]
    fused = np.hstack([gex, img]) @ rng.normal(size=(10, 16))
    for name, x in (("gex", gex), ("img", img), ("fused", fused)):
        write_embedding(embedding_frame(x, a.obs_names), tmp_path / f"{name}.parquet")
    return a, y


def test_every_probe_of_a_dataset_seed_and_protocol_uses_identical_folds(tmp_path):
    from workflow_scripts.evaluation import folds as F

    a, _ = _write_case(tmp_path)
    tasks = {"t": {"type": "classification", "label": "label"}, "comp": {"type": "regression", "obsm": "composition"}}
    params = {**PARAMS, "logreg_Cs": [0.1, 1.0], "inner_folds": 2}
    F.main(["make", "--spots", str(tmp_path / "spots.h5ad"), "--protocol", "transductive", "--seed", "1",
            "--tasks", json.dumps(tasks), "--params", json.dumps(params), "--out", str(tmp_path / "folds.tsv")])
    outs = []
    for name, extra in (("unimodal_gex", []), ("unimodal_img", []),
                        ("fused", ["--controls", "gex", "img", "concat", "--controls-gex", str(tmp_path / "gex.parquet"),
                                   "--controls-img", str(tmp_path / "img.parquet")])):
        emb = {"unimodal_gex": "gex", "unimodal_img": "img"}.get(name, name)
        out = tmp_path / f"{name}.tsv"
        main(["--embedding", str(tmp_path / f"{emb}.parquet"), "--spots", str(tmp_path / "spots.h5ad"),
              "--dataset", "toy", "--name", name, "--seed", "1", "--tasks", json.dumps(tasks),
              "--params", json.dumps(params), "--folds", str(tmp_path / "folds.tsv"), *extra, "--out", str(out),
              "--log", str(tmp_path / f"{name}.log")])
        outs.append(pd.read_csv(out, sep="\t"))
    df = pd.concat(outs, ignore_index=True)
    assert set(df["embedding"]) == {"unimodal_gex", "unimodal_img", "fused", "control_gex@fused",
                                    "control_img@fused", "control_concat@fused"}
    assert (df["dim"][df.embedding.str.startswith("control")] == 16).all()
    per_split = df.groupby(["task", "fold"])["split_hash"].nunique()
    assert (per_split == 1).all() and len(per_split) == 10
    table, _ = F.read_folds(tmp_path / "folds.tsv")
    for (task, fold), h in df.groupby(["task", "fold"])["split_hash"].first().items():
        tr, te, _ = F.split_ids(table[table.task == task], fold)
        assert h == split_hash(tr, te)


def test_probe_uses_the_embedding_of_each_folds_outer_interface():
    """Inductive: fold k is scored with the embedding of interface k (informative for outer 1, noise for 0)."""
    from workflow_scripts.evaluation import folds as F

    rng = np.random.default_rng(2)
    n = 160
    y = np.tile(np.repeat(["a", "b"], 20), 4)
    a = toy_adata(y, n_slides=2)  # slides S0, S1 = donors S0, S1
    obs = a.obs[["slide", "donor", "x_um", "y_um"]]
    table, meta = F.make_folds(obs, {"t": a.obs_names}, "inductive", 5, 0, n_outer=2)
    good = rng.normal(size=(n, 3)) + np.where(y == "a", 4.0, 0.0)[:, None]
    noise = rng.normal(size=(n, 3))
    embs = {0: embedding_frame(noise, a.obs_names), 1: embedding_frame(good, a.obs_names)}
    res = run_probes(embs, a, {"t": {"type": "classification", "label": "label"}},
                     {**PARAMS, "logreg_Cs": [1.0], "inner_folds": 2}, 0, folds=table, meta=meta)
    r = res.set_index("fold")
    assert r.loc[1, "outer"] == 1 and r.loc[1, "value"] > 0.9 and r.loc[0, "value"] < 0.75
    assert set(res["protocol"]) == {"inductive"} and set(res["unit"]) == {"g:S0", "g:S1"}
    with pytest.raises(ValueError, match="no embedding was given"):
        run_probes({0: embs[0]}, a, {"t": {"type": "classification", "label": "label"}}, PARAMS, 0, folds=table,
                   meta=meta)


def _reencoding_gain(Cs):
    from workflow_scripts.evaluation.sis import sis_table

    rng = np.random.default_rng(7)
    n = 300
    y = rng.choice(["a", "b", "c"], size=n)
    gex = 0.4 * rng.normal(size=(3, 8))[np.searchsorted(["a", "b", "c"], y)] + rng.normal(size=(n, 8))
    img = rng.normal(size=(n, 5))
    a = toy_adata(y)
    g, i = embedding_frame(gex, a.obs_names), embedding_frame(img, a.obs_names)
    tasks = {"t": {"type": "classification", "label": "label"}}
    params = {**PARAMS, "logreg_Cs": Cs, "inner_folds": 3}
    rows = []
    for seed in (0, 1, 2):
        ctrl = control_embeddings(g, i, 128, seed, ["gex"], {None: None})["gex"][None]
        for name, e in (("unimodal_gex", g), ("unimodal_img", i), ("control_gex@x", ctrl)):
            df = run_probes(e, a, tasks, params, seed)
            df.insert(0, "embedding", name)
            df.insert(0, "seed", seed)
            df.insert(0, "dataset", "toy")
            rows.append(df)
    return sis_table(pd.concat(rows, ignore_index=True), ["control_gex@x"], n_boot=2000).iloc[0]


def test_random_reencoding_of_one_modality_gives_a_gain_whose_interval_contains_0():
    """A random linear re-encoding of GEX (8 → 128 dimensions) carries the same information as GEX: with C tuned on
    each fold's training part its gain over the best unimodal embedding has a 95 % interval (3 seeds × 5 folds)
    containing 0. At a fixed C = 0.01 the same probe credits the re-encoding with a gain whose interval excludes 0."""
    r = _reencoding_gain(list(np.logspace(-3, 1, 5)))
    assert r["best_unimodal"] == "gex"
    assert r["gain_lo"] <= 0 <= r["gain_hi"] and r["gain_excludes_0"] is False and abs(r["gain"]) < 0.02
    fixed = _reencoding_gain([0.01])
    assert fixed["gain_excludes_0"] is True and fixed["gain_lo"] > 0.01


def test_nonlinear_option_adds_a_paired_ceiling_that_reads_an_interaction():
    """XOR of two features: the linear probe stays near chance, the non-linear ceiling (same folds) does not."""
    rng = np.random.default_rng(0)
    n = 300
    X = rng.normal(size=(n, 2))
    y = np.where((X[:, 0] > 0) ^ (X[:, 1] > 0), "a", "b")
    a = toy_adata(y)
    emb = embedding_frame(X, a.obs_names)
    task = {"t": {"type": "classification", "label": "label"}}
    res = run_probes(emb, a, task, {**PARAMS, "nonlinear": {"hidden": 16, "alphas": [1e-3]}}, seed=0)
    lin, nl = res[res.metric == "macro_f1"], res[res.metric == "macro_f1_nonlinear"]
    assert len(lin) == len(nl) == 5
    assert (lin["split_hash"].to_numpy() == nl["split_hash"].to_numpy()).all()  # paired fold by fold
    assert lin["value"].mean() < 0.7 and nl["value"].mean() > 0.85
    assert np.allclose(nl["chance"], lin["chance"])
    assert set(run_probes(emb, a, task, PARAMS, seed=0).metric) == {"macro_f1"}  # off by default
