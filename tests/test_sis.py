"""Tests for workflow_scripts.evaluation.sis (Synergistic Information Score, docs/reference.md#sis)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from workflow_scripts.evaluation.sis import SIS_COLUMNS, main, sis, sis_table


def probe_rows(dataset, embedding, task, metric, folds, seeds=(0,)):
    """Long probe rows: the same per-fold values for every seed, shifted by 0.001·seed."""
    return [dict(dataset=dataset, embedding=embedding, seed=s, task=task, metric=metric, fold=f, value=v + 0.001 * s)
            for s in seeds for f, v in enumerate(folds)]


def reference_illustration(seeds=(0,)) -> pd.DataFrame:
    """The reference's examples/example_compute_sis.py illustration (synthetic, docs/reference.md#sis)."""
    rows = []
    for emb, f1, r2 in [
        ("unimodal_gex", [0.72, 0.73, 0.71], [0.65, 0.66, 0.64]),
        ("unimodal_img", [0.68, 0.69, 0.67], [0.62, 0.63, 0.61]),
        ("comm", [0.82, 0.83, 0.81], [0.75, 0.76, 0.74]),
        ("cca", [0.75, 0.76, 0.74], [0.68, 0.69, 0.67]),
        ("concat", [0.70, 0.71, 0.69], [0.60, 0.61, 0.59]),
    ]:
        rows += probe_rows("toy", emb, "niche", "macro_f1", f1, seeds)
        rows += probe_rows("toy", emb, "composition", "r2", r2, seeds)
    return pd.DataFrame(rows)


def test_sis_function_hand_computation():
    assert sis(0.82, 0.72, 0.68) == pytest.approx((0.82 - 0.72) / 0.72)
    assert round(sis(0.82, 0.72, 0.68), 4) == 0.1389
    assert round(sis(0.75, 0.65, 0.62), 4) == 0.1538
    # best unimodal may be the image
    assert sis(0.9, 0.5, 0.6) == pytest.approx(0.5)
    assert sis(0.5, 0.6, 0.4) == pytest.approx(-1 / 6)  # worse than best unimodal → negative


def test_sis_undefined_raises():
    with pytest.raises(ValueError, match="undefined"):
        sis(0.3, 0.0, -0.1)
    with pytest.raises(ValueError, match="finite"):
        sis(np.nan, 0.5, 0.5)


def test_sis_table_matches_reference_illustration():
    t = sis_table(reference_illustration(), ["comm", "cca", "concat"])
    assert list(t.columns) == SIS_COLUMNS
    assert len(t) == 6
    row = t[(t.method == "comm") & (t.metric == "macro_f1")].iloc[0]
    assert round(row["sis"], 4) == 0.1389
    assert row["best_unimodal"] == "gex" and row["best_unimodal_mean"] == pytest.approx(0.72)
    assert row["sd"] == pytest.approx(np.std([0.82, 0.83, 0.81])) and row["n"] == 3
    assert row["img_mean"] == pytest.approx(0.68) and row["img_sd"] == pytest.approx(np.std([0.68, 0.69, 0.67]))
    r2 = t[(t.method == "comm") & (t.metric == "r2")].iloc[0]
    assert round(r2["sis"], 4) == 0.1538
    assert t[(t.method == "cca") & (t.metric == "macro_f1")]["sis"].iloc[0] == pytest.approx(0.03 / 0.72)
    neg = t[(t.method == "concat") & (t.metric == "r2")].iloc[0]
    assert neg["sis"] < 0 and neg["sis"] == pytest.approx((0.60 - 0.65) / 0.65)
    assert (t["note"] == "").all()


def test_mean_over_folds_and_seeds_first():
    df = reference_illustration(seeds=(0, 1, 2))
    t = sis_table(df, ["comm"])
    row = t[t.metric == "macro_f1"].iloc[0]
    assert row["n"] == 9
    fused = df[(df.embedding == "comm") & (df.metric == "macro_f1")]["value"]
    gex = df[(df.embedding == "unimodal_gex") & (df.metric == "macro_f1")]["value"]
    assert row["sis"] == pytest.approx((fused.mean() - gex.mean()) / gex.mean())
    assert row["sd"] == pytest.approx(np.std(fused.to_numpy()))


def test_nonpositive_unimodal_gives_nan_and_note(caplog):
    rows = probe_rows("toy", "unimodal_gex", "comp", "r2", [-0.1, -0.2, 0.0])
    rows += probe_rows("toy", "unimodal_img", "comp", "r2", [-0.3, -0.1, -0.2])
    rows += probe_rows("toy", "random", "comp", "r2", [-0.5, -0.4, -0.6])
    with caplog.at_level(logging.WARNING):
        t = sis_table(pd.DataFrame(rows), ["random"])
    assert np.isnan(t["sis"].iloc[0]) and "undefined" in t["note"].iloc[0]
    assert t["mean"].iloc[0] == pytest.approx(-0.5)
    assert "SIS not computed" in caplog.text


def test_missing_embeddings():
    df = reference_illustration()
    with pytest.raises(ValueError, match="no rows for embeddings"):
        sis_table(df, ["vicreg"])
    # method present for one task only → NaN with note for the other
    part = df[~((df.embedding == "cca") & (df.metric == "r2"))]
    t = sis_table(part, ["cca"])
    row = t[t.metric == "r2"].iloc[0]
    assert np.isnan(row["sis"]) and row["note"] == "no probe scores for cca" and row["n"] == 0


def test_cli(tmp_path):
    p = tmp_path / "probes.tsv"
    reference_illustration(seeds=(0, 1)).to_csv(p, sep="\t", index=False)
    out = tmp_path / "sis.tsv"
    main(["--probes", str(p), "--methods", json.dumps(["comm", "cca"]), "--out", str(out),
          "--log", str(tmp_path / "sis.log")])
    t = pd.read_csv(out, sep="\t", keep_default_na=False, na_values=[""])
    assert list(t.columns) == SIS_COLUMNS and len(t) == 4
    assert set(t["method"]) == {"comm", "cca"}
    assert (t["sis"] > 0).all()


# ---------------------------------------------------------------------------------------- gains, controls, intervals
def paired_rows(values: dict, units=None, protocol="transductive", task="t", metric="macro_f1", seeds=(0,)):
    """Probe rows with explicit per-fold values per embedding (the same cells for every embedding)."""
    rows = []
    for emb, vals in values.items():
        for s in seeds:
            for f, v in enumerate(vals):
                rows.append(dict(dataset="toy", embedding=emb, seed=s, protocol=protocol, task=task, metric=metric,
                                 fold=f, value=v, unit=(units[f] if units else f"s{s}:f{f}")))
    return rows


def test_gain_sis_and_best_control_hand_computation():
    vals = {
        "unimodal_gex": [0.60, 0.62, 0.58, 0.61, 0.59],   # mean 0.60
        "unimodal_img": [0.40, 0.41, 0.39, 0.40, 0.40],   # mean 0.40
        "m": [0.70, 0.71, 0.69, 0.70, 0.70],              # mean 0.70
        "control_gex@m": [0.66, 0.67, 0.65, 0.66, 0.66],  # mean 0.66 (best control)
        "control_img@m": [0.45, 0.45, 0.45, 0.45, 0.45],
        "control_concat@m": [0.64, 0.64, 0.64, 0.64, 0.64],
    }
    t = sis_table(pd.DataFrame(paired_rows(vals)), ["m"], n_boot=500)
    assert list(t.columns) == SIS_COLUMNS and len(t) == 1
    r = t.iloc[0]
    assert r["gain"] == pytest.approx(0.10) and r["sis"] == pytest.approx(0.10 / 0.60)
    assert r["best_control"] == "control_gex@m" and r["best_control_mean"] == pytest.approx(0.66)
    assert r["gain_ctrl"] == pytest.approx(0.04) and r["sis_ctrl"] == pytest.approx(0.04 / 0.66)
    # every fold is +0.10 over GEX (± 0.01): the paired interval is tight around the gain and excludes 0
    assert 0.09 <= r["gain_lo"] <= 0.10 <= r["gain_hi"] <= 0.11
    assert r["gain_excludes_0"] is True and r["sis_excludes_0"] is True and r["gain_ctrl_excludes_0"] is True
    assert r["mean_lo"] <= 0.70 <= r["mean_hi"] and r["n_units"] == 5
    assert r["sis_lo"] == pytest.approx(r["gain_lo"] / 0.60, abs=0.01)


def test_unpaired_noise_gives_an_interval_containing_zero_and_results_are_deterministic():
    rng = np.random.default_rng(3)
    base = rng.normal(0.6, 0.05, 15)
    vals = {"unimodal_gex": base, "unimodal_img": base - 0.2, "m": base + rng.normal(0, 0.02, 15)}
    df = pd.DataFrame(paired_rows(vals))
    t = sis_table(df, ["m"], n_boot=1000, seed=5)
    r = t.iloc[0]
    assert r["gain_lo"] < 0 < r["gain_hi"] and r["gain_excludes_0"] is False
    assert r["best_control"] == "" and np.isnan(r["gain_ctrl"])  # no controls probed
    pd.testing.assert_frame_equal(t, sis_table(df, ["m"], n_boot=1000, seed=5))
    assert not t.equals(sis_table(df, ["m"], n_boot=1000, seed=6))


def test_grouped_units_resample_whole_donors():
    """Three donors × three seeds: nine cells but only three units, so the interval is wider than if the nine
    cells were independent."""
    rng = np.random.default_rng(0)
    donor_effect = np.repeat([0.05, -0.04, 0.0], 3)
    vals = {"unimodal_gex": 0.5 + rng.normal(0, 0.005, 9), "unimodal_img": np.full(9, 0.3),
            "m": 0.52 + donor_effect + rng.normal(0, 0.005, 9)}
    grouped = sis_table(pd.DataFrame(paired_rows(vals, units=[f"g:{d}" for d in "AAABBBCCC"])), ["m"]).iloc[0]
    cells = sis_table(pd.DataFrame(paired_rows(vals)), ["m"]).iloc[0]
    assert grouped["n_units"] == 3 and cells["n_units"] == 9
    assert grouped["gain_hi"] - grouped["gain_lo"] > cells["gain_hi"] - cells["gain_lo"]


def test_protocols_table_side_by_side():
    from workflow_scripts.evaluation.sis import PROTOCOL_COLUMNS, protocols_table

    vals = {"unimodal_gex": [0.6] * 5, "unimodal_img": [0.4] * 5, "m": [0.7, 0.71, 0.69, 0.7, 0.7]}
    rows = paired_rows(vals) + paired_rows({k: [v - 0.05 for v in x] for k, x in vals.items()}, protocol="inductive")
    probes = pd.DataFrame(rows)
    t = sis_table(probes, ["m"], n_boot=300)
    assert set(t["protocol"]) == {"transductive", "inductive"}
    p = protocols_table(t, probes, n_boot=300)
    assert list(p.columns) == PROTOCOL_COLUMNS
    assert p["method"].tolist() == ["m", "m", "unimodal_gex", "unimodal_gex", "unimodal_img", "unimodal_img"]
    assert p["protocol"].tolist()[:2] == ["transductive", "inductive"]
    m = p[p.method == "m"].set_index("protocol")
    assert m.loc["transductive", "score"] == pytest.approx(0.70) and m.loc["inductive", "score"] == pytest.approx(0.65)
    assert m.loc["inductive", "gain"] == pytest.approx(0.10)
    g = p[p.method == "unimodal_gex"].set_index("protocol")
    assert g.loc["inductive", "score"] == pytest.approx(0.55) and np.isnan(g.loc["inductive", "gain"])


def test_chance_corrected_columns_hand_computation():
    """chance 0.25 (four balanced classes): cc = (score − 0.25) / 0.75; R² rows keep chance 0."""
    vals = {"unimodal_gex": [0.40] * 5, "unimodal_img": [0.30] * 5, "m": [0.55, 0.56, 0.54, 0.55, 0.55]}
    df = pd.DataFrame(paired_rows(vals))
    df["chance"] = 0.25
    r = sis_table(df, ["m"], n_boot=300).iloc[0]
    assert r["chance"] == pytest.approx(0.25)
    assert r["mean_cc"] == pytest.approx((0.55 - 0.25) / 0.75)
    assert r["best_unimodal_cc"] == pytest.approx((0.40 - 0.25) / 0.75)
    assert r["gain_cc"] == pytest.approx(0.15 / 0.75)
    assert r["gain_cc_lo"] == pytest.approx(r["gain_lo"] / 0.75) and r["gain_cc_hi"] == pytest.approx(r["gain_hi"] / 0.75)
    df["metric"] = "r2"
    r2 = sis_table(df, ["m"], n_boot=300).iloc[0]
    assert r2["chance"] == 0.0 and r2["mean_cc"] == pytest.approx(0.55) and r2["gain_cc"] == pytest.approx(0.15)
    no_chance = sis_table(df.drop(columns="chance").assign(metric="macro_f1"), ["m"], n_boot=300).iloc[0]
    assert np.isnan(no_chance["chance"]) and np.isnan(no_chance["mean_cc"])
