"""Tests for workflow_scripts.evaluation.tables (collect / summarise) and workflow_scripts.figures.evaluation (CLIs)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from workflow_scripts.evaluation import tables
from workflow_scripts.figures import evaluation as figures
from workflow_scripts.evaluation.probes import PROBE_COLUMNS
from workflow_scripts.evaluation.sis import sis_table
from workflow_scripts.evaluation.spatial_probe import SPATIAL_COLUMNS

EMBEDDINGS = ["cca", "dcca", "comm", "simclr", "byol", "simsiam", "barlow_twins", "vicreg", "dim", "concat",
              "unimodal_gex", "unimodal_img", "random"]
FUSED = [e for e in EMBEDDINGS if not e.startswith("unimodal") and e != "random"]
TASKS = [("cluster", "classification", "macro_f1"), ("dominant_celltype", "classification", "macro_f1"),
         ("composition", "regression", "r2")]


def toy_probe_tables(seeds=(0, 1, 2), n_folds=5, protocols=("transductive",)) -> list[pd.DataFrame]:
    """One long probe table per protocol × embedding × seed (with the method's controls), with the CLI's leading
    columns."""
    rng = np.random.default_rng(0)
    base = {e: 0.35 + 0.4 * rng.random() for e in EMBEDDINGS}
    base["random"] = 0.15
    out = []
    for prot in protocols:
        for e in EMBEDDINGS:
            names = [e] + ([f"control_{k}@{e}" for k in ("gex", "img", "concat")] if e in FUSED else [])
            for s in seeds:
                rows = []
                for name in names:
                    b = base[e] - (0.03 if name != e else 0.0)
                    for task, ttype, metric in TASKS:
                        for f in range(n_folds):
                            rows.append(dict(dataset="toy", embedding=name, seed=s, protocol=prot, task=task,
                                             task_type=ttype, metric=metric, fold=f,
                                             value=b + 0.03 * rng.normal(), n_train=80, n_test=20, n_buffer=0,
                                             n_classes=4 if metric == "macro_f1" else np.nan,
                                             n_classes_test=4 if metric == "macro_f1" else np.nan,
                                             n_classes_unseen=0 if metric == "macro_f1" else np.nan,
                                             C=1.0 if metric == "macro_f1" else np.nan,
                                             alpha=np.nan if metric == "macro_f1" else 1.0, dim=16, rank=16,
                                             outer=-1, scheme="kfold", unit=f"s{s}:f{f}", split_hash="0"))
                out.append(pd.DataFrame(rows, columns=["dataset", "embedding", "seed", *PROBE_COLUMNS]))
    return out


def toy_spatial_table(seeds=(0, 1)) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    edges = [0, 210, 300, 420, 600, 850, 1100]
    rows = []
    for k, e in enumerate(EMBEDDINGS):
        for s in seeds:
            for task in ("cluster", "dominant_celltype"):
                for b in range(6):
                    for r in range(3):
                        rows.append(dict(dataset="toy", embedding=e, seed=s, task=task, ring=b, inner_um=edges[b],
                                         outer_um=edges[b + 1], repeat=r, metric="macro_f1",
                                         value=0.75 - 0.06 * b - 0.02 * k + 0.02 * rng.normal(),
                                         n_spots=300, mean_neighbours=[4, 4, 4, 16, 32, 36][b]))
    return pd.DataFrame(rows, columns=["dataset", "embedding", "seed", *SPATIAL_COLUMNS])


def test_collect_and_summarise_probe_tables(tmp_path):
    paths = []
    for i, df in enumerate(toy_probe_tables()):
        p = tmp_path / f"p{i}.tsv"
        df.to_csv(p, sep="\t", index=False)
        paths.append(p)
    empty = tmp_path / "empty.tsv"
    toy_probe_tables()[0].iloc[:0].to_csv(empty, sep="\t", index=False)
    allp = tmp_path / "all.tsv"
    tables.main(["collect", "--inputs", *map(str, paths), str(empty), "--out", str(allp), "--log", str(tmp_path / "c.log")])
    df = pd.read_csv(allp, sep="\t")
    n_emb = len(EMBEDDINGS) + 3 * len(FUSED)
    assert len(df) == n_emb * 3 * 3 * 5
    summ = tmp_path / "summary.tsv"
    tables.main(["summarise", "--input", str(allp), "--out", str(summ), "--bootstrap", '{"n_boot": 500}',
                 "--log", str(tmp_path / "s.log")])
    s = pd.read_csv(summ, sep="\t")
    assert list(s.columns) == [*tables.PROBE_BY, "mean", "sd", "n", "lo", "hi", "n_units"]
    assert len(s) == n_emb * 3 and s["n"].eq(15).all() and s["n_units"].eq(15).all()
    g = df[(df.embedding == "comm") & (df.task == "cluster")]["value"].to_numpy()
    row = s[(s.embedding == "comm") & (s.task == "cluster")].iloc[0]
    assert row["mean"] == pytest.approx(g.mean()) and row["sd"] == pytest.approx(np.std(g))
    assert row["lo"] < row["mean"] < row["hi"] and row["hi"] - row["lo"] < 4 * np.std(g) / np.sqrt(15) * 1.5


def test_collect_rejects_mismatched_columns(tmp_path):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    toy_probe_tables()[0].to_csv(a, sep="\t", index=False)
    toy_spatial_table().to_csv(b, sep="\t", index=False)
    with pytest.raises(ValueError, match="differ"):
        tables.collect([a, b])
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        tables.collect([tmp_path / "nope.tsv"])


def test_summarise_spatial_defaults():
    s = tables.summarise(toy_spatial_table())
    assert list(s.columns) == [*tables.SPATIAL_BY, "mean", "sd", "n", "n_spots", "mean_neighbours"]
    assert len(s) == len(EMBEDDINGS) * 2 * 6 and s["n"].eq(6).all()
    assert s.loc[s.ring == 3, "mean_neighbours"].eq(16).all()


def _png_ok(path):
    data = path.read_bytes()
    assert len(data) > 10_000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure_clis_write_pngs(tmp_path):
    from workflow_scripts.evaluation.sis import protocols_table

    probes = pd.concat(toy_probe_tables(protocols=("transductive", "inductive")), ignore_index=True)
    probes.to_csv(tmp_path / "probes_long.tsv", sep="\t", index=False)
    tables.summarise(probes, n_boot=200).to_csv(tmp_path / "probes_summary.tsv", sep="\t", index=False)
    fused = [e for e in EMBEDDINGS if not e.startswith("unimodal")]
    st = sis_table(probes, fused, n_boot=200)
    st.to_csv(tmp_path / "sis.tsv", sep="\t", index=False)
    protocols_table(st, probes, n_boot=200).to_csv(tmp_path / "protocols.tsv", sep="\t", index=False)
    sp = toy_spatial_table()
    tables.summarise(sp).to_csv(tmp_path / "spatial_summary.tsv", sep="\t", index=False)
    log = str(tmp_path / "f.log")
    for src in ("probes_summary.tsv", "probes_long.tsv"):
        out = tmp_path / f"scores_{src}.png"
        figures.main(["probe_scores", "--probes", str(tmp_path / src), "--out", str(out), "--log", log])
        _png_ok(out)
    figures.main(["sis_heatmap", "--sis", str(tmp_path / "sis.tsv"), "--out", str(tmp_path / "sis.png"), "--log", log])
    _png_ok(tmp_path / "sis.png")
    figures.main(["protocols", "--protocols", str(tmp_path / "protocols.tsv"), "--out", str(tmp_path / "prot.png"),
                  "--log", log])
    _png_ok(tmp_path / "prot.png")
    figures.main(["spatial_rings", "--spatial", str(tmp_path / "spatial_summary.tsv"),
                  "--out", str(tmp_path / "rings.png"), "--log", log])
    _png_ok(tmp_path / "rings.png")


def test_figures_reject_empty_tables(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        figures.plot_sis_heatmap(pd.DataFrame(columns=["dataset", "method", "task", "metric", "sis"]), tmp_path / "x.png")
    with pytest.raises(ValueError, match="neither"):
        figures.as_summary(pd.DataFrame({"a": [1]}))


def test_family_colouring():
    assert figures.family("cca") == figures.family("dcca") == "spectral"
    assert figures.family("comm") == "non-spectral" and figures.family("concat") == "concat"
    assert figures.family("unimodal_gex") == "baseline" and figures.family("control_img@comm") == "baseline"
    # one style per control kind, shared by every figure
    assert set(figures.CONTROL_STYLES) == {"gex", "img", "concat"}
    assert [h.get_color() for h in figures.control_handles()] == [c for _, c, _ in figures.CONTROL_STYLES.values()]


def test_interval_error_bars_use_the_bootstrap_interval():
    row = pd.Series({"mean": 0.5, "sd": 0.2, "lo": 0.45, "hi": 0.6})
    assert figures._interval_err(0.5, row) == pytest.approx((0.05, 0.1))
    assert figures._interval_err(0.5, pd.Series({"mean": 0.5, "sd": 0.2})) == (0.2, 0.2)
