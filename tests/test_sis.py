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
