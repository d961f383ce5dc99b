"""Tests for workflow_scripts.evaluation.spatial_probe: neighbour rings in µm within slides.

Reference behaviour and the fix: docs/reference.md#spatial-rings, docs/reference.md#flaw-14.
"""

from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from workflow_scripts.data.model import validate_spots
from workflow_scripts.io import embedding_frame, write_embedding
from workflow_scripts.evaluation.spatial_probe import SPATIAL_COLUMNS, main, ring_pairs, ring_targets, run_spatial_probe
from workflow_scripts.evaluation.probes import clean_labels

EDGES = [0, 210, 300, 420, 600, 850, 1100]  # config default for the 200 µm legacy-ST grid
PARAMS = {"n_folds": 5, "cv": "kfold", "logreg_max_iter": 500, "ridge_alphas": [0.1, 1.0, 10.0]}
SPARAMS = {"n_repeats": 3, "test_size": 0.2, "min_spots": 20}
STRIPES = np.array(list("AABBCCDDEEFFGG"))  # label by column: stripes two columns wide


def grid_adata(n=14, slide_labels=("stripes", "Z")) -> ad.AnnData:
    """Square grids (200 µm pitch), one per slide, all slides sharing the same coordinate frame.

    Slide S0 has stripe labels by column; a slide with label spec "Z" is labelled "Z" everywhere
    (so any cross-slide neighbour would show up as a "Z" vote).
    """
    frames = []
    for k, spec in enumerate(slide_labels):
        row, col = np.divmod(np.arange(n * n), n)
        lab = STRIPES[col] if spec == "stripes" else np.repeat(spec, n * n)
        frames.append(pd.DataFrame({
            "slide": f"S{k}", "donor": f"D{k}", "x_um": col * 200.0, "y_um": row * 200.0,
            "px_x": col * 10.0, "px_y": row * 10.0, "split": "eval", "label": lab, "row": row, "col": col,
        }, index=[f"S{k}_{r}x{c}" for r, c in zip(row, col)]))
    obs = pd.concat(frames)
    for c in ("slide", "donor", "split", "label"):
        obs[c] = obs[c].astype("category")
    a = ad.AnnData(X=np.zeros((len(obs), 1), dtype=np.float32), obs=obs)
    a.uns["slides"] = {f"S{k}": {"image_path": "none.tif", "um_per_px": 20.0} for k in range(len(slide_labels))}
    validate_spots(a, check_images=False)
    return a


def test_ring_neighbour_counts_match_square_grid_geometry():
    a = grid_adata(slide_labels=("stripes",))
    pairs = ring_pairs(a, EDGES)
    names = list(a.obs_names)
    centre = names.index("S0_7x7")  # ≥ 5 spots from every border: all rings complete
    counts = [int((ci == centre).sum()) for ci, _ in pairs]
    # distances on the grid are 200·sqrt(i²+j²): (0,210]: 1 → 4; (210,300]: √2 → 4; (300,420]: 2 → 4;
    # (420,600]: √5, √8, 3 → 8+4+4; (600,850]: √10, √13, 4, √17, √18 → 8+8+4+8+4; (850,1100]: √20, 5, √26, √29 → 8+12+8+8
    assert counts == [4, 4, 4, 16, 32, 36]
    corner = names.index("S0_0x0")
    assert int((pairs[0][0] == corner).sum()) == 2
    interior = [names.index(f"S0_{r}x{c}") for r in range(1, 13) for c in range(1, 13)]
    assert all(int((pairs[0][0] == i).sum()) == 4 for i in interior)
    # never a self pair, all distances inside the ring
    xy = a.obs[["x_um", "y_um"]].to_numpy()
    for b, (ci, nj) in enumerate(pairs):
        assert not np.any(ci == nj)
        d = np.linalg.norm(xy[ci] - xy[nj], axis=1)
        assert np.all((d > EDGES[b]) & (d <= EDGES[b + 1]))


def test_ring_targets_are_hand_computed_majorities_within_slide():
    a = grid_adata()  # S0 stripes, S1 all "Z" at the same coordinates
    labels = clean_labels(a.obs["label"], min_class_size=10)
    centres = ["S0_5x1", "S0_5x2", "S0_5x3", "S0_0x0", "S1_5x5"]
    rings = ring_targets(a, labels, EDGES[:4], centres)
    t0, n0 = rings[0]
    # (0,210]: left/right/up/down. col1 (A): A,B,A,A → A; col2 (B): A,B,B,B → B; col3 (B): B,C,B,B → B
    assert t0.loc["S0_5x1"] == "A" and t0.loc["S0_5x2"] == "B" and t0.loc["S0_5x3"] == "B"
    assert n0.loc["S0_5x1"] == 4 and n0.loc["S0_0x0"] == 2 and t0.loc["S0_0x0"] == "A"
    t1, _ = rings[1]
    # (210,300]: the 4 diagonals. col1: A,A,B,B → tie → "A"; col3: B,B,C,C → tie → "B" (smallest label)
    assert t1.loc["S0_5x1"] == "A" and t1.loc["S0_5x3"] == "B"
    t2, _ = rings[2]
    # (300,420]: ±2 steps. col2: (col0 A, col4 C, col2 B, col2 B) → B; col3: (col1 A, col5 C, B, B) → B
    assert t2.loc["S0_5x2"] == "B" and t2.loc["S0_5x3"] == "B"
    # the "Z" slide shares the frame but never votes for S0 spots, and vice versa
    for t, _ in rings:
        s0 = t[t.index.str.startswith("S0_")]
        assert not (s0 == "Z").any()
        assert (t[t.index.str.startswith("S1_")] == "Z").all()
    pairs = ring_pairs(a, EDGES)
    slide = a.obs["slide"].astype(str).to_numpy()
    for ci, nj in pairs:
        assert np.array_equal(slide[ci], slide[nj])


def test_excluded_and_missing_labels_cast_no_vote():
    a = grid_adata(slide_labels=("stripes",))
    lab = a.obs["label"].astype(str).to_numpy().copy()
    # the spot right of S0_5x1 (col 2, label B) becomes excluded; the one below becomes NaN
    names = list(a.obs_names)
    lab[names.index("S0_5x2")] = "unknown"
    lab = pd.Series(lab, index=a.obs_names, dtype=object)
    lab.loc["S0_6x1"] = None
    labels = clean_labels(lab, exclude=["unknown"], min_class_size=10)
    t, n = ring_targets(a, labels, EDGES[:2], ["S0_5x1"])[0]
    assert n.loc["S0_5x1"] == 2 and t.loc["S0_5x1"] == "A"


def test_regression_ring_target_is_neighbour_mean():
    a = grid_adata(slide_labels=("stripes",))
    comp = np.stack([a.obs["col"].to_numpy(float), a.obs["row"].to_numpy(float)], axis=1)
    targets = pd.DataFrame(comp, index=a.obs_names)
    t, n = ring_targets(a, targets, EDGES[:2], ["S0_5x1", "S0_0x0"])[0]
    assert np.allclose(t.loc["S0_5x1"].to_numpy(), [1.0, 5.0])  # symmetric neighbours → own position
    assert np.allclose(t.loc["S0_0x0"].to_numpy(), [0.5, 0.5])  # (1,0) and (0,1)


def test_run_spatial_probe_scores_and_skips(caplog):
    rng = np.random.default_rng(0)
    a = grid_adata(slide_labels=("stripes", "stripes"))
    own = pd.get_dummies(a.obs["label"]).to_numpy(float)
    emb = embedding_frame(3 * own + 0.3 * rng.normal(size=own.shape), a.obs_names)
    tasks = {"stripe": {"type": "classification", "label": "label"}}
    edges = [0, 210, 300, 5000]
    with caplog.at_level(logging.INFO):
        res = run_spatial_probe(emb, a, tasks, edges, PARAMS, {**SPARAMS, "min_spots": 20}, seed=0)
    assert list(res.columns) == SPATIAL_COLUMNS
    assert sorted(res["ring"].unique()) == [0, 1, 2] and len(res) == 9
    r0 = res[res.ring == 0]
    assert r0["n_spots"].eq(2 * 14 * 14).all()
    assert np.isclose(r0["mean_neighbours"].iloc[0], (4 * 14 * 14 - 4 * 14) / (14 * 14))
    assert r0["value"].mean() > 0.85        # ring-0 majority ≈ own stripe
    assert r0["inner_um"].eq(0).all() and r0["outer_um"].eq(210).all()
    # the huge last ring's majority hardly depends on the spot's own stripe
    assert res[res.ring == 2]["value"].mean() < r0["value"].mean()
    # min_spots above the number of spots: every ring skipped, logged
    with caplog.at_level(logging.INFO):
        res2 = run_spatial_probe(emb, a, tasks, edges, PARAMS, {**SPARAMS, "min_spots": 10_000}, seed=0)
    assert res2.empty and "< min_spots 10000; ring skipped" in caplog.text
    # deterministic for a seed
    res3 = run_spatial_probe(emb, a, tasks, edges, PARAMS, SPARAMS, seed=0)
    assert np.array_equal(res3["value"].to_numpy(), res["value"].to_numpy())


def test_bad_edges_and_missing_coordinates_raise():
    a = grid_adata(slide_labels=("stripes",))
    with pytest.raises(ValueError, match="ring_edges_um"):
        ring_pairs(a, [0, 300, 200])
    b = a.copy()
    del b.obs["x_um"]
    with pytest.raises(KeyError, match="x_um"):
        ring_pairs(b, EDGES)


def test_cli_writes_table(tmp_path):
    rng = np.random.default_rng(1)
    a = grid_adata(n=8, slide_labels=("stripes",))
    a.obs["label"] = pd.Categorical(np.where(a.obs["col"] < 4, "L", "R"))
    a.write_h5ad(tmp_path / "spots.h5ad")
    X = np.stack([a.obs["col"].to_numpy(float), rng.normal(size=a.n_obs)], axis=1)
    write_embedding(embedding_frame(X, a.obs_names), tmp_path / "e.parquet")
    out = tmp_path / "sp.tsv"
    main(["--embedding", str(tmp_path / "e.parquet"), "--spots", str(tmp_path / "spots.h5ad"), "--dataset", "toy",
          "--name", "emb", "--seed", "0", "--tasks", json.dumps({"lr": {"type": "classification", "label": "label"}}),
          "--ring-edges-um", json.dumps([0, 210, 300]), "--params", json.dumps(PARAMS),
          "--spatial-params", json.dumps(SPARAMS), "--out", str(out), "--log", str(tmp_path / "sp.log")])
    df = pd.read_csv(out, sep="\t")
    assert list(df.columns) == ["dataset", "embedding", "seed", *SPATIAL_COLUMNS]
    assert len(df) == 6 and df.loc[df.ring == 0, "value"].mean() > 0.8
    assert "ring 1" in (tmp_path / "sp.log").read_text()


def test_unstratifiable_split_falls_back_with_log(caplog):
    from workflow_scripts.evaluation.spatial_probe import ring_splits

    y = np.array(["a"] * 20 + ["b"])  # "b" has one member: stratification impossible
    with caplog.at_level(logging.INFO):
        (tr, te), = ring_splits(len(y), y, n_repeats=1, test_size=0.2, seed=0, what="ring x")
    assert len(tr) + len(te) == 21 and "unstratified split used" in caplog.text
    (tr2, te2), = ring_splits(len(y), None, n_repeats=1, test_size=0.2, seed=0, what="ring x")
    assert np.array_equal(np.sort(te), np.sort(te2))  # same seed → the same unstratified split


def test_ring_splits_folds_groups_and_seeds():
    from workflow_scripts.evaluation.spatial_probe import ring_splits, split_random_state

    n = 60
    y = np.array(list("ab") * 30)
    folds = np.repeat([0.0, 1.0, 2.0], 20)
    folds[:5] = np.nan                                   # no fold: in no split
    sp = ring_splits(n, y, folds=folds)
    assert len(sp) == 3
    for k, (tr, te) in enumerate(sp):
        assert np.array_equal(np.sort(te), np.flatnonzero(folds == k))
        assert not set(tr) & set(te) and not set(range(5)) & set(tr)
    groups = np.repeat(list("PQRSTU"), 10)
    sp = ring_splits(n, y, groups=groups, n_folds=4, seed=3)
    assert len(sp) == 4
    for tr, te in sp:
        assert not set(groups[tr]) & set(groups[te])      # no group on both sides
    assert sorted(np.concatenate([te for _, te in sp])) == list(range(n))
    assert ring_splits(n, y, groups=np.repeat("P", n)) == []  # one group: no grouped split
    # repeated hold-out: the splits of seeds 0 and 1 are independent draws (the reference's seed + repeat
    # gave seed 1 repeats 0-3 equal to seed 0 repeats 1-4)
    s0 = [set(te) for _, te in ring_splits(n, y, n_repeats=5, seed=0)]
    s1 = [set(te) for _, te in ring_splits(n, y, n_repeats=5, seed=1)]
    assert not any(a == b for a in s0 for b in s1)
    assert len({split_random_state(s, r) for s in range(3) for r in range(5)}) == 15
    assert [set(te) for _, te in ring_splits(n, y, n_repeats=5, seed=0)] == s0  # deterministic


def test_spatial_probe_follows_grouped_cv_and_given_folds():
    from workflow_scripts.evaluation.spatial_probe import cv_groups, ring_problems

    rng = np.random.default_rng(0)
    a = grid_adata(slide_labels=("stripes", "stripes", "stripes"))
    own = pd.get_dummies(a.obs["label"]).to_numpy(float)
    emb = embedding_frame(3 * own + 0.3 * rng.normal(size=own.shape), a.obs_names)
    tasks = {"stripe": {"type": "classification", "label": "label"}}
    edges = [0, 210, 300]
    slide = a.obs["slide"].astype(str).to_numpy()
    groups = cv_groups(a, "group_slide")
    probs = list(ring_problems(emb, a, tasks, edges, SPARAMS, seed=0, groups=groups, n_folds=5))
    assert len(probs) == 2
    for p in probs:
        assert len(p.splits) == 3                          # 3 slides < 5 folds
        for tr, te in p.splits:
            assert len(set(slide[tr]) & set(slide[te])) == 0
    res = run_spatial_probe(emb, a, tasks, edges, {**PARAMS, "cv": "group_slide"}, SPARAMS, seed=0)
    assert sorted(res["repeat"].unique()) == [0, 1, 2] and res.loc[res.ring == 0, "value"].min() > 0.8
    folds = pd.Series(np.where(a.obs["row"].to_numpy() < 7, 0, 1), index=a.obs_names)
    res = run_spatial_probe(emb, a, tasks, edges, PARAMS, SPARAMS, seed=0, folds={"stripe": folds})
    assert sorted(res["repeat"].unique()) == [0, 1]
    with pytest.raises(KeyError, match="no fold assignment for task"):
        run_spatial_probe(emb, a, tasks, edges, PARAMS, SPARAMS, seed=0, folds={"other": folds})
    with pytest.raises(ValueError, match="probe.cv"):
        run_spatial_probe(emb, a, tasks, edges, {**PARAMS, "cv": "blocks"}, SPARAMS, seed=0)
