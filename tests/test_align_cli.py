"""Round trips of the align CLI (python -m workflow_scripts.methods.align) on tiny parquet embedding tables."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from workflow_scripts.methods import align
from workflow_scripts.io import embedding_frame, read_embedding, read_embedding_meta, write_embedding

torch.set_num_threads(1)


@pytest.fixture()
def tables(tmp_path):
    """GEX: spots s0..s59 (s5 has a NaN); IMG: spots s2..s64 (s0, s1 missing, s60..s64 extra)."""
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((70, 3))
    gex = lat[:60] @ rng.standard_normal((3, 6)) + 0.3 * rng.standard_normal((60, 6))
    gex[5, 2] = np.nan
    img = lat[2:65] @ rng.standard_normal((3, 8)) + 0.3 * rng.standard_normal((63, 8))
    gex_path, img_path = tmp_path / "gex.parquet", tmp_path / "img.parquet"
    write_embedding(embedding_frame(gex, [f"s{i}" for i in range(60)]), gex_path, {"encoder": "toy"})
    write_embedding(embedding_frame(img, [f"s{i}" for i in range(2, 65)]), img_path, {"encoder": "toy"})
    expected = [f"s{i}" for i in range(2, 60) if i != 5]
    return gex_path, img_path, expected


def run_cli(tmp_path, gex, img, method, params, extra=()):
    out = {k: tmp_path / f"{method}.{k}" for k in ("parquet", "pt", "tsv", "log", "npz")}
    argv = ["--method", method, "--gex", str(gex), "--img", str(img), "--seed", "1", "--params", json.dumps(params),
            "--out", str(out["parquet"]), "--model", str(out["pt"]), "--history", str(out["tsv"]),
            "--device", "cpu", "--threads", "1", "--no-progress", "--log", str(out["log"]), *extra]
    return argv, out


def test_cli_subprocess_round_trip(tmp_path, tables):
    gex, img, expected = tables
    params = {"projection_dim": 8, "max_epochs": 3, "batch_size": 16}
    argv, out = run_cli(tmp_path, gex, img, "simclr", params, ["--views", str(tmp_path / "simclr.npz")])
    proc = subprocess.run([sys.executable, "-m", "workflow_scripts.methods.align", *argv], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    z3 = read_embedding(out["parquet"])
    assert z3.index.tolist() == expected and z3.shape == (len(expected), 16)
    assert np.isfinite(z3.to_numpy()).all()
    meta = read_embedding_meta(out["parquet"])
    assert meta["method"] == "simclr" and meta["seed"] == 1 and meta["d_z3"] == 16 and meta["d_gex"] == 6
    assert 1 <= meta["best_epoch"] <= 3
    state = torch.load(out["pt"], weights_only=True)
    assert state["method"] == "simclr" and state["n_spots"] == len(expected) and "proj_img.0.weight" in state[
        "state_dict"]
    hist = pd.read_csv(out["tsv"], sep="\t")
    assert hist.columns.tolist() == ["epoch", "train_loss", "val_loss", "val_loss_smooth", "lr"] and len(hist) == 3
    views = np.load(tmp_path / "simclr.npz")
    assert views["spot_id"].tolist() == expected and views["view_img"].shape == (len(expected), 8)
    log = out["log"].read_text()
    assert "dropped 1 of 60 rows with NaN/inf" in log
    assert "2 of 59 spots dropped (absent from another table)" in log  # GEX: s0, s1 not in IMG
    assert "6 of 63 spots dropped (absent from another table)" in log  # IMG: s5 (NaN in GEX), s60..s64


@pytest.mark.parametrize("method", ["cca", "concat", "random"])
def test_cli_untrained_methods(tmp_path, tables, method):
    gex, img, expected = tables
    argv, out = run_cli(tmp_path, gex, img, method, {})
    assert align.main(argv) == 0
    z3 = read_embedding(out["parquet"])
    assert z3.index.tolist() == expected
    assert z3.shape[1] == {"cca": 12, "concat": 14, "random": 14}[method]
    hist = pd.read_csv(out["tsv"], sep="\t")
    assert hist.columns.tolist() == ["epoch", "train_loss", "val_loss", "val_loss_smooth", "lr"]
    assert len(hist) == (1 if method == "cca" else 0)
    state = torch.load(out["pt"], weights_only=True)
    assert state["method"] == method and state["seed"] == 1
    if method == "concat":
        g, i = read_embedding(gex).loc[expected], read_embedding(img).loc[expected]
        np.testing.assert_array_equal(z3.to_numpy(), np.hstack([i.to_numpy(), g.to_numpy()]))
    if method == "random":
        assert abs(float(z3.to_numpy().std()) - 1) < 0.1
        assert state["state_dict"] == {}


def test_cli_rejects_bad_params(tmp_path, tables):
    gex, img, _ = tables
    argv, _ = run_cli(tmp_path, gex, img, "simclr", {})
    argv[argv.index("--params") + 1] = "[1, 2]"
    with pytest.raises(ValueError, match="JSON object"):
        align.main(argv)
    argv[argv.index("--params") + 1] = '{"batch_size": 0}'
    with pytest.raises(ValueError, match="batch_size"):
        align.main(argv)
    with pytest.raises(SystemExit):
        align.main(["--method", "nope", "--gex", "a", "--img", "b", "--seed", "0", "--out", "o", "--model", "m",
                    "--history", "h"])


@pytest.mark.parametrize("method", ["cca", "simclr"])
def test_fit_mask_never_sees_held_out_spots(method):
    """Inductive fitting: perturbing the held-out rows changes neither the fitted state nor Z3 of the fitted rows."""
    from workflow_scripts.methods import fit_method

    rng = np.random.default_rng(3)
    lat = rng.standard_normal((80, 3))
    gex = (lat @ rng.standard_normal((3, 6)) + 0.3 * rng.standard_normal((80, 6))).astype(np.float32)
    img = (lat @ rng.standard_normal((3, 8)) + 0.3 * rng.standard_normal((80, 8))).astype(np.float32)
    mask = np.zeros(80, dtype=bool)
    mask[:50] = True
    params = {"projection_dim": 4, "max_epochs": 3, "batch_size": 16}
    a = fit_method(method, gex, img, params, 0, device="cpu", progress=False, fit_mask=mask)
    gex2, img2 = gex.copy(), img.copy()
    gex2[~mask] = 100 * rng.standard_normal(gex2[~mask].shape)
    img2[~mask] = -50.0
    b = fit_method(method, gex2, img2, params, 0, device="cpu", progress=False, fit_mask=mask)
    assert a.z3.shape == (80, b.z3.shape[1]) and a.state["n_fit"] == 50 and a.state["n_spots"] == 80
    np.testing.assert_allclose(a.z3[mask], b.z3[mask], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a.z3[~mask], b.z3[~mask])
    for k, v in a.state["state_dict"].items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(b.state["state_dict"][k]))
    # the input standardisation is estimated on (the training split of) the fitted rows only
    for k, v in a.state["input_scaling"].items():
        np.testing.assert_array_equal(v.numpy(), b.state["input_scaling"][k].numpy())
    fitted = gex[mask].astype(np.float64)
    if method == "simclr":  # trained on every fitted row
        np.testing.assert_allclose(a.state["input_scaling"]["mean_gex"].numpy(), fitted.mean(0), rtol=1e-6)


def test_cli_fit_spots_writes_mask(tmp_path, tables):
    gex, img, expected = tables
    fit = tmp_path / "fit.tsv"
    pd.DataFrame({"spot_id": expected[:30] + ["not_a_spot"]}).to_csv(fit, sep="\t", index=False)
    views = tmp_path / "cca.npz"
    argv, out = run_cli(tmp_path, gex, img, "cca", {"projection_dim": 3}, ["--views", str(views), "--fit-spots", str(fit)])
    assert align.main(argv) == 0
    z = np.load(views)
    assert z["fit_mask"].tolist() == [i in set(expected[:30]) for i in z["spot_id"]]
    assert read_embedding(out["parquet"]).shape[0] == len(expected)
    assert "1 listed spots are not in the paired embeddings" in out["log"].read_text()


def test_cli_interface_folds_trains_every_outer_fold_like_separate_runs(tmp_path, tables):
    """--interface-folds trains each outer fold's interface in one process; each equals a run with --fit-spots."""
    from workflow_scripts.evaluation.folds import FOLD_COLUMNS, INTERFACE_TASK

    gex, img, expected = tables
    fold = {s: int(s[1:]) % 3 for s in expected}  # three outer folds
    rows = pd.DataFrame({"spot_id": expected, "task": INTERFACE_TASK, "fold": [fold[s] for s in expected],
                         "group": "", "scheme": "group_donor", "outer": [fold[s] for s in expected],
                         "buffer_folds": ""})
    folds = tmp_path / "seed1.interface.tsv"
    rows[FOLD_COLUMNS].to_csv(folds, sep="\t", index=False)
    folds.with_suffix(".json").write_text("{}")
    params = {"projection_dim": 4, "max_epochs": 2, "batch_size": 16}
    base = ["--method", "simclr", "--gex", str(gex), "--img", str(img), "--seed", "1", "--params", json.dumps(params),
            "--device", "cpu", "--threads", "1", "--no-progress"]
    out_dir = tmp_path / "simclr" / "seed1"
    assert align.main([*base, "--interface-folds", str(folds), "--n-outer", "3", "--out-dir", str(out_dir),
                       "--log", str(tmp_path / "all.log")]) == 0
    for k in range(3):
        fit = pd.read_csv(out_dir / f"outer{k}.fit_spots.tsv", sep="\t")["spot_id"].tolist()
        assert fit == [s for s in expected if fold[s] != k]
        one = tmp_path / f"one{k}"
        assert align.main([*base, "--fit-spots", str(out_dir / f"outer{k}.fit_spots.tsv"), "--out", f"{one}.parquet",
                           "--model", f"{one}.pt", "--history", f"{one}.tsv", "--views", f"{one}.npz",
                           "--log", f"{one}.log"]) == 0
        np.testing.assert_array_equal(read_embedding(out_dir / f"outer{k}.parquet").to_numpy(),
                                      read_embedding(f"{one}.parquet").to_numpy())
        z = np.load(out_dir / f"outer{k}.views.npz")
        assert z["fit_mask"].tolist() == [fold[s] != k for s in z["spot_id"]]
        assert read_embedding_meta(out_dir / f"outer{k}.parquet")["outer"] == k
    # the planned number of outer folds is checked
    with pytest.raises(ValueError, match="planned 5"):
        align.main([*base, "--interface-folds", str(folds), "--n-outer", "5", "--out-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit):  # --interface-folds writes into --out-dir only
        align.main([*base, "--interface-folds", str(folds), "--out-dir", str(tmp_path / "y"), "--out", "z.parquet"])
