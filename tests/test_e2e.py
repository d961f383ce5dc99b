"""End to end: the real workflow on a small HER2ST subset (2 sections x 40 spots, 1 seed, 3 epochs)."""

import numpy as np
import pandas as pd
import pytest
import yaml

from workflow_utils import REPO, job_counts, snakemake, workdir

pytestmark = pytest.mark.e2e

SMALL = REPO / "tests/data/config_small.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    wd = workdir(tmp_path_factory.mktemp("e2e"))
    r = snakemake(wd, "all", "--cores", "2", "--show-failed-logs", configfile=SMALL)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    return wd


def test_sis_table_has_every_method_task_metric(run):
    from workflow_scripts.evaluation.sis import SIS_COLUMNS

    cfg = yaml.safe_load(open(REPO / "config/config.yaml"))
    sis = pd.read_csv(run / "results/sis/her2st.tsv", sep="\t")
    assert list(sis.columns) == SIS_COLUMNS
    assert set(sis["protocol"]) == {"transductive", "inductive"}
    assert set(cfg["methods"]) <= set(sis["method"])
    fused = sis[sis.method != "random"]
    assert fused["best_control"].dropna().str.match(r"control_(gex|img|concat)@").all()
    assert (fused["best_control"].dropna().str.split("@").str[1] == fused.loc[fused.best_control.notna(), "method"]).all()
    ok = fused["gain_lo"].notna()
    assert (fused.loc[ok, "gain_lo"] <= fused.loc[ok, "gain_hi"]).all()
    assert {"cluster", "dominant_celltype", "composition", "pathology"} <= set(sis["task"])
    assert set(sis.loc[sis.task == "composition", "metric"]) == {"r2"}
    assert set(sis.loc[sis.task == "cluster", "metric"]) == {"macro_f1"}
    # SIS is recomputable from the means in the same row
    ok = sis["best_unimodal_mean"] > 0
    best = np.maximum(sis["gex_mean"], sis["img_mean"])
    np.testing.assert_allclose(sis.loc[ok, "sis"], ((sis["mean"] - best) / best)[ok], rtol=1e-9)


def test_probe_tables_have_five_folds(run):
    p = pd.read_csv(run / "results/tables/her2st/probes.tsv", sep="\t")
    f = p[(p.embedding == "unimodal_gex") & (p.task == "cluster") & (p.protocol == "transductive")]
    assert sorted(f["fold"].unique()) == [0, 1, 2, 3, 4]
    assert f["value"].between(0, 1).all() and f["C"].notna().all()
    # inductive: one fold per donor (A, C) for the tasks labelled on both donors
    g = p[(p.embedding == "unimodal_gex") & (p.task == "composition") & (p.protocol == "inductive")]
    assert sorted(g["unit"].unique()) == ["g:A", "g:C"]


def test_every_probe_of_a_seed_and_protocol_used_identical_folds(run):
    p = pd.read_csv(run / "results/tables/her2st/probes.tsv", sep="\t")
    assert {"control_gex@comm", "control_img@comm", "control_concat@comm"} <= set(p["embedding"])
    n = p.groupby(["protocol", "seed", "task", "fold"])["split_hash"].nunique()
    assert (n == 1).all(), n[n > 1]


def test_inductive_interfaces_never_saw_a_held_out_donor(run):
    import anndata as ad

    from workflow_scripts.evaluation.folds import INTERFACE_TASK, read_folds

    obs = ad.read_h5ad(run / "results/her2st/spots.h5ad", backed="r").obs
    table, meta = read_folds(run / "results/her2st/folds/inductive/seed0.tsv")
    assert meta["n_outer"] == 2 and meta["donors"] == ["A", "C"]
    iface = table[table.task == INTERFACE_TASK]
    for k in range(2):
        views = np.load(run / f"results/her2st/aligned_inductive/cca/seed0/outer{k}.views.npz")
        fit_ids = views["spot_id"][views["fit_mask"]]
        held = set(iface.loc[iface.fold == k, "spot_id"])
        assert len(fit_ids) > 0 and not set(fit_ids) & held
        assert set(obs.loc[list(fit_ids), "donor"]) == {"AC"[1 - k]}
    prot = pd.read_csv(run / "results/tables/her2st/protocols.tsv", sep="\t")
    note = prot[(prot.task == "pathology") & (prot.protocol == "inductive")]["protocol_note"]
    assert note.str.contains("donor A only").all()


def test_embeddings_and_fused_tables(run):
    from workflow_scripts.io import read_embedding

    gex = read_embedding(run / "results/her2st/embeddings/gex/pca.parquet")
    img = read_embedding(run / "results/her2st/embeddings/img/morphology.parquet")
    assert gex.shape == (80, 10)
    assert img.shape[0] == 80 and img.shape[1] > 20
    z = read_embedding(run / "results/her2st/aligned/comm/seed0.parquet")
    assert z.shape[0] <= 80 and set(z.index) <= set(gex.index)
    hist = pd.read_csv(run / "results/her2st/aligned/simclr/seed0.history.tsv", sep="\t")
    assert {"epoch", "train_loss", "val_loss"} <= set(hist.columns) and len(hist) >= 1


def test_every_rule_wrote_its_log_and_figures_exist(run):
    for f in ("prepare.log", "embed_gex_pca.log", "embed_img_morphology.log", "align_comm_seed0.log", "sis.log"):
        assert (run / "logs/her2st" / f).stat().st_size > 0, f
    for f in ("probe_scores.png", "sis_heatmap.png", "spatial_rings.png", "protocols.png"):
        assert (run / "results/figures/her2st" / f).read_bytes()[:4] == b"\x89PNG"
    assert (run / "results/her2st/qc/patches.png").exists()


def test_rerun_is_a_no_op_and_figures_rebuild_alone(run):
    r = snakemake(run, "all", "-n", configfile=SMALL)
    assert "Nothing to be done" in r.stdout, r.stdout[-2000:]
    (run / "results/figures/her2st/sis_heatmap.png").unlink()
    r = snakemake(run, "all", "-n", "--quiet", "rules", configfile=SMALL)
    # the per-rule benchmark table is collected after everything `all` builds, so it follows the figure
    assert job_counts(r.stdout) == {"figure_sis_heatmap": 1, "collect_benchmarks": 1, "figure_benchmarks": 1,
                                    "all": 1}
    r = snakemake(run, "figures", "-n", "--quiet", "rules", configfile=SMALL)
    assert job_counts(r.stdout) == {"figure_sis_heatmap": 1, "figures": 1}  # no upstream job


def test_same_seed_same_results(run, tmp_path):
    """Re-running one alignment job with the same seed and parameters reproduces its fused embedding exactly."""
    import json
    import subprocess
    import sys

    from workflow_scripts.io import read_embedding, read_embedding_meta

    done = run / "results/her2st/aligned/simclr/seed0.parquet"
    params = read_embedding_meta(done)["params"]
    out = tmp_path / "z.parquet"
    r = subprocess.run(
        [sys.executable, "-m", "workflow_scripts.methods.align", "--method", "simclr",
         "--gex", str(run / "results/her2st/embeddings/gex/pca.parquet"),
         "--img", str(run / "results/her2st/embeddings/img/morphology.parquet"),
         "--seed", "0", "--params", json.dumps(params), "--out", str(out), "--model", str(tmp_path / "m.pt"),
         "--history", str(tmp_path / "h.tsv"), "--device", "cpu", "--threads", "1", "--no-progress",
         "--log", str(tmp_path / "l.log")],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    pd.testing.assert_frame_equal(read_embedding(out), read_embedding(done))
