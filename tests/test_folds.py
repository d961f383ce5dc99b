"""Tests for workflow_scripts.evaluation.folds: shared fold tables, donor folds, spatial blocks and buffers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.model_selection import KFold

from workflow_scripts.evaluation import folds as F
from workflow_utils import REPO


def grid_obs(donors=("A", "B", "C"), slides_per_donor=1, nx=12, ny=10, pitch=200.0) -> pd.DataFrame:
    """Spots on a square grid (µm), one or more slides per donor."""
    rows = []
    for d in donors:
        for s in range(slides_per_donor):
            slide = f"{d}{s + 1}"
            for i in range(nx):
                for j in range(ny):
                    rows.append(dict(spot=f"{slide}_{i}x{j}", slide=slide, donor=d, x_um=pitch * i + 37.0,
                                     y_um=pitch * j - 11.0))
    return pd.DataFrame(rows).set_index("spot")


def test_kfold_assignment_is_the_reference_kfold():
    fold = F.kfold_assignment(23, 5, seed=4)
    for k, (_, te) in enumerate(KFold(5, shuffle=True, random_state=4).split(np.zeros(23))):
        assert set(np.flatnonzero(fold == k)) == set(te)
    with pytest.raises(ValueError):
        F.kfold_assignment(3, 5, 0)


def test_group_assignment_keeps_groups_whole():
    g = np.array(list("CABACB"))
    np.testing.assert_array_equal(F.group_assignment(g, 5, 0), [2, 0, 1, 0, 2, 1])  # one sorted group per fold
    g = np.repeat([f"d{i}" for i in range(7)], 4)
    fold = F.group_assignment(g, 3, seed=1)
    assert fold.max() == 2
    for d in np.unique(g):
        assert len(set(fold[g == d])) == 1
    with pytest.raises(ValueError, match="2 groups"):
        F.group_assignment(np.repeat("x", 5), 3, 0)


def test_spatial_blocks_hand_example():
    x = np.array([0.0, 99.0, 100.0, 250.0, 1000.0, 1050.0])
    y = np.array([0.0, 0.0, 0.0, 120.0, 500.0, 600.0])
    s = np.array(["S1", "S1", "S1", "S1", "S2", "S2"])
    b = F.spatial_blocks(x, y, s, 100.0)
    # S1 anchored at (0, 0); S2 anchored at its own minimum (1000, 500)
    assert list(b) == ["S1:0,0", "S1:0,0", "S1:1,0", "S1:2,1", "S2:0,0", "S2:0,1"]
    with pytest.raises(ValueError):
        F.spatial_blocks(x, y, s, 0)


def test_block_assignment_keeps_blocks_whole_and_balances():
    blocks = np.repeat([f"b{i}" for i in range(10)], [5, 5, 5, 5, 5, 5, 5, 5, 5, 5])
    fold = F.block_assignment(blocks, 5, seed=3)
    for b in np.unique(blocks):
        assert len(set(fold[blocks == b])) == 1
    assert np.bincount(fold).tolist() == [10] * 5
    assert not np.array_equal(fold, F.block_assignment(blocks, 5, seed=4))
    np.testing.assert_array_equal(fold, F.block_assignment(blocks, 5, seed=3))


def test_buffer_excludes_overlapping_and_adjacent_patches_only():
    # a 7 x 1 row of spots at 100 µm pitch, patches of 100 µm: test spot in the middle (x = 300)
    x = np.arange(7) * 100.0
    y = np.zeros(7)
    s = np.repeat("S", 7)
    test = x == 300
    # buffer 100 µm: centres closer than 100 + 100 = 200 µm (Chebyshev) are buffer spots → x = 200, 400
    np.testing.assert_array_equal(F.buffer_mask(x, y, s, test, 100.0, 100.0), (x == 200) | (x == 400))
    assert F.buffer_mask(x, y, s, test, 100.0, 100.0).tolist() == [False, False, True, False, True, False, False]
    # a buffer of 150 µm reaches 100 and 500 too (distance 200 < 250), not 0 and 600 (300)
    assert F.buffer_mask(x, y, s, test, 100.0, 150.0).tolist() == [False, True, True, False, True, True, False]
    # another slide at the same coordinates is never a buffer
    s2 = np.array(["S", "S", "S", "S", "T", "T", "T"])
    assert F.buffer_mask(x, y, s2, test, 100.0, 100.0).tolist() == [False, False, True, False, False, False, False]
    # overlapping tiles: 108.8 µm patches on a 54.4 µm stride, one patch of buffer → 3 tiles on each side
    xs = np.arange(9) * 54.4
    m = F.buffer_mask(xs, np.zeros(9), np.repeat("S", 9), np.arange(9) == 4, 108.8, 108.8)
    assert m.tolist() == [False, True, True, True, False, True, True, True, False]


def test_transductive_folds_match_kfold_per_task():
    obs = grid_obs(donors=("A", "B"))
    spots = {"t1": obs.index[::2], "t2": obs.index}
    table, meta = F.make_folds(obs, spots, "transductive", 5, seed=2)
    assert list(table.columns) == F.FOLD_COLUMNS
    t1 = table[table.task == "t1"]
    ref = F.kfold_assignment(len(spots["t1"]), 5, 2)
    np.testing.assert_array_equal(t1["fold"].to_numpy(), ref)
    assert (t1["outer"] == -1).all() and (t1["buffer_folds"] == "").all() and (t1["scheme"] == "kfold").all()
    assert meta["tasks"]["t1"]["folds"]["0"]["unit"] == "s2:f0"
    assert F.INTERFACE_TASK not in set(table.task)


def held_out(table: pd.DataFrame, obs: pd.DataFrame, task: str, fold: int) -> set:
    tf = table[table.task == task]
    _, te, _ = F.split_ids(tf, fold)
    return set(obs.loc[te, "donor"])


def test_inductive_never_fits_on_a_held_out_donor():
    """No interface and no probe of a fold is fit on a spot of a donor held out in that fold (indices)."""
    obs = grid_obs(donors=("A", "B", "C", "D"))
    labelled_everywhere = obs.index[::3]
    one_donor = obs.index[obs.donor == "B"]
    table, meta = F.make_folds(obs, {"multi": labelled_everywhere, "single": one_donor}, "inductive", 3, seed=0,
                               patch_um=200.0, n_outer=3)
    assert meta["n_outer"] == 3
    iface = table[table.task == F.INTERFACE_TASK]
    for k in range(3):
        fit = F.fit_spot_ids(table, k)
        out_donors = set(obs.loc[iface.loc[iface.fold == k, "spot_id"], "donor"])
        assert out_donors and not out_donors & set(obs.loc[fit, "donor"])
        assert len(fit) + int((iface.fold == k).sum()) == len(obs)
        # the donor task: probe training spots never come from a held-out donor, and its embedding is outer k
        tf = table[table.task == "multi"]
        tr, te, buf = F.split_ids(tf, k)
        assert len(buf) == 0 and (tf.loc[tf.fold == k, "outer"] == k).all()
        assert not set(obs.loc[tr, "donor"]) & set(obs.loc[te, "donor"])
        assert set(obs.loc[te, "donor"]) <= out_donors
    # the one-donor task: spatial blocks within donor B, scored with the interface trained without B
    single = table[table.task == "single"]
    b_outer = int(single["outer"].iloc[0])
    assert (single["outer"] == b_outer).all() and (single["scheme"] == "spatial_block").all()
    assert "B" not in set(obs.loc[F.fit_spot_ids(table, b_outer), "donor"])
    assert "donor B only" in meta["tasks"]["single"]["note"]
    pos = obs.loc[single["spot_id"]]
    for k in sorted(set(single.fold)):
        tr, te, buf = F.split_ids(single, k)
        assert not set(tr) & (set(te) | set(buf))
        # every training patch keeps a gap of at least one patch (200 µm) from every test patch
        a, b = obs.loc[tr, ["x_um", "y_um"]].to_numpy(), obs.loc[te, ["x_um", "y_um"]].to_numpy()
        cheb = np.abs(a[:, None, :] - b[None, :, :]).max(axis=2)
        assert cheb.min() >= 400.0 - 1e-9
        assert len(buf) > 0
    assert len(pos) == len(one_donor)


def test_one_donor_dataset_uses_spatial_blocks_for_interface_and_tasks():
    obs = grid_obs(donors=("Z",), nx=20, ny=16)
    table, meta = F.make_folds(obs, {"t": obs.index}, "inductive", 4, seed=1, patch_um=100.0, buffer_um=100.0,
                               block_um=500.0, n_outer=4)
    iface = table[table.task == F.INTERFACE_TASK]
    assert meta["interface"]["scheme"] == "spatial_block" and set(iface.fold) == {0, 1, 2, 3}
    t = table[table.task == "t"].set_index("spot_id")
    i = iface.set_index("spot_id")
    pd.testing.assert_series_equal(t["fold"], i["fold"])
    pd.testing.assert_series_equal(t["buffer_folds"], i["buffer_folds"])
    fit = set(F.fit_spot_ids(table, 2))
    assert not fit & set(i.index[i.fold == 2]) and not fit & set(i.index[i.buffer_folds.str.contains("2")])


def test_n_outer_mismatch_names_the_config_keys():
    obs = grid_obs(donors=("A", "B"))
    with pytest.raises(ValueError, match="planned 3"):
        F.make_folds(obs, {"t": obs.index}, "inductive", 5, 0, n_outer=3)
    assert F.n_outer_folds(3, 5) == 3 and F.n_outer_folds(7, 5) == 5 and F.n_outer_folds(1, 5) == 5


def test_config_donors_from_the_configs(tmp_path):
    cfg = yaml.safe_load(open(REPO / "config/config.yaml"))["datasets"]["her2st"]
    cfg["resource_dir"] = str(REPO / "resources/her2st")
    assert F.config_donors(cfg) == ["A", "B", "C"]
    small = yaml.safe_load(open(REPO / "tests/data/config_small.yaml"))["datasets"]["her2st"]
    small["resource_dir"] = str(REPO / "resources/her2st")
    assert F.config_donors(small) == ["A", "C"]
    xen = {"reader": "xenium", "splits": {"test": ["s1", "s2", "s3"]}, "build_splits": ["test"],
           "donors": {"s2": "s1"}}
    assert F.config_donors(xen) == ["s1", "s3"]


def test_cli_make_and_fit_spots(tmp_path, tiny_spots):
    tiny_spots.write_h5ad(tmp_path / "spots.h5ad")
    tasks = {"cluster": {"type": "classification", "label": "cluster"},
             "comp": {"type": "regression", "obsm": "composition"}}
    out = tmp_path / "folds" / "seed0.tsv"
    F.main(["make", "--spots", str(tmp_path / "spots.h5ad"), "--protocol", "inductive", "--seed", "0",
            "--tasks", json.dumps(tasks), "--params", json.dumps({"n_folds": 5}), "--min-class-size", "3",
            "--patch-um", "200", "--n-outer", "2", "--out", str(out), "--log", str(tmp_path / "f.log")])
    table, meta = F.read_folds(out)
    assert meta["tasks"]["cluster"]["classes"] == ["a", "b"] and meta["n_outer"] == 2
    assert set(table.task) == {F.INTERFACE_TASK, "cluster", "comp"}
    fit = tmp_path / "fit.tsv"
    F.main(["fit-spots", "--folds", str(out), "--outer", "1", "--out", str(fit), "--log", str(tmp_path / "g.log")])
    ids = pd.read_csv(fit, sep="\t")["spot_id"]
    assert len(ids) == 36 and set(tiny_spots.obs.loc[ids, "donor"]) == {"DS1"}
    assert "interface outer fold 1" in (tmp_path / "f.log").read_text()


def test_interface_only_table_equals_the_interface_rows_of_the_full_table(tmp_path, tiny_spots):
    """align_inductive reads the interface-only file; the probes read the full table: their outer folds agree."""
    tiny_spots.write_h5ad(tmp_path / "spots.h5ad")
    tasks = {"cluster": {"type": "classification", "label": "cluster"}}
    common = ["--spots", str(tmp_path / "spots.h5ad"), "--protocol", "inductive", "--seed", "3",
              "--params", json.dumps({"n_folds": 5}), "--patch-um", "200", "--n-outer", "2"]
    F.main(["make", *common, "--tasks", json.dumps(tasks), "--min-class-size", "3", "--out", str(tmp_path / "full.tsv")])
    F.main(["make", *common, "--interface-only", "--out", str(tmp_path / "iface.tsv")])
    full, _ = F.read_folds(tmp_path / "full.tsv")
    iface, meta = F.read_folds(tmp_path / "iface.tsv")
    assert set(iface.task) == {F.INTERFACE_TASK} and meta["tasks"] == {}
    pd.testing.assert_frame_equal(full[full.task == F.INTERFACE_TASK].reset_index(drop=True), iface)
    with pytest.raises(ValueError, match="--tasks is required"):
        F.main(["make", *common, "--out", str(tmp_path / "y.tsv")])
    with pytest.raises(ValueError, match="--interface-only needs --protocol inductive"):
        F.main(["make", *[c if c != "inductive" else "transductive" for c in common], "--interface-only",
                "--out", str(tmp_path / "x.tsv")])
