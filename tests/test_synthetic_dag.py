"""The synthetic dataset and bring-your-own embeddings in the real Snakefile: dry-run DAGs, and one small real run
of a dataset that comes entirely from files (spots, both modalities' embeddings, a fused embedding)."""

import numpy as np
import pandas as pd
import pytest
import yaml

from workflow_utils import REPO, job_counts, snakemake, workdir

SYNTHETIC = REPO / "config/synthetic.yaml"


def dry(wd, *targets, configfile):
    r = snakemake(wd, *targets, "-n", "--quiet", "rules", configfile=configfile)
    assert r.returncode == 0, r.stdout + r.stderr
    return job_counts(r.stdout)


def test_synthetic_config_builds_the_whole_dag(tmp_path):
    c = dry(workdir(tmp_path), "all", configfile=SYNTHETIC)
    cfg = yaml.safe_load(open(SYNTHETIC))
    assert cfg["run_datasets"] == ["synthetic"]
    n_seeds = len(cfg["seeds"])
    assert c["prepare"] == 1 and c["embed"] == 2
    assert c["align"] == 11 * n_seeds  # the ten methods + tensor_fusion
    # one probe job per embedding × seed under the one protocol config/synthetic.yaml selects
    assert c["probe"] == (10 + 1 + 3) * n_seeds
    assert "align_inductive" not in c
    for rule in ("pid", "pid_truth", "figure_pid", "validation", "sis", "collect_probes", "figure_spectral"):
        assert c[rule] == 1, rule


def byo_files(root):
    """A dataset that exists only as files: spots table, GEX and IMG embeddings, one fused embedding."""
    rng = np.random.default_rng(0)
    n = 80
    ids = [f"spot{i}" for i in range(n)]
    label = rng.choice(["a", "b"], n)
    spots = pd.DataFrame({"spot_id": ids, "slide": np.repeat(["S1", "S2"], n // 2), "donor": "P1",
                          "x_um": np.tile(np.arange(n // 2) * 100.0, 2), "y_um": 0.0, "region": label})
    spots.to_csv(root / "spots.csv", index=False)
    sig = (label == "a").astype(float)[:, None]
    for name, d in (("gex", 6), ("img", 5), ("fused", 4)):
        emb = pd.DataFrame(rng.normal(size=(n, d)) + sig, index=pd.Index(ids, name="spot_id"),
                           columns=[f"{name}{j}" for j in range(d)])
        emb.to_parquet(root / f"{name}.parquet")
    cfg = {
        "run_datasets": ["mine"],
        "datasets": {"mine": {
            "reader": "precomputed", "spots_file": str(root / "spots.csv"),
            "encoders": {"gex": "precomputed", "img": "precomputed"},
            "encoder_params": {"precomputed": {"gex": {"path": str(root / "gex.parquet")},
                                               "img": {"path": str(root / "img.parquet")}}},
            "fused": {"my_fusion": str(root / "fused.parquet")},
            "min_class_size": 5,
            "tasks": {"region": {"type": "classification", "label": "region"}},
        }},
        "seeds": [0],
        "methods": ["concat"],
        "positive_controls": ["tensor_fusion"],
        "baselines": ["unimodal_gex", "unimodal_img", "random"],
        "pid": {"k": 3, "n_init": 2},
    }
    path = root / "byo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bring_your_own_dag_lists_the_files_and_scores_the_fused_embedding(tmp_path):
    wd = workdir(tmp_path)
    cfg = byo_files(tmp_path)
    c = dry(wd, "results/tables/mine/probes.tsv", "results/pid/mine.tsv", configfile=cfg)
    assert c["import_fused"] == 1 and c["embed"] == 2 and c["align"] == 2  # concat + tensor_fusion
    assert c["probe"] == (1 + 1 + 1 + 3) * 2  # concat, tensor_fusion, my_fusion, three baselines; two protocols
    # a missing embedding file is named before any job runs
    (tmp_path / "img.parquet").unlink()
    r = snakemake(wd, "results/tables/mine/probes.tsv", "-n", configfile=cfg)
    assert r.returncode != 0 and "img.parquet" in r.stdout + r.stderr


@pytest.mark.e2e
def test_bring_your_own_runs_end_to_end(tmp_path):
    wd = workdir(tmp_path)
    cfg = byo_files(tmp_path)
    targets = ["results/sis/mine.tsv", "results/tables/mine/probes_summary.tsv", "results/pid/mine.tsv",
               "results/figures/mine/pid.png", "results/mine/qc/patches.png"]
    r = snakemake(wd, *targets, "--cores", "2", "--show-failed-logs", configfile=cfg)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    probes = pd.read_csv(wd / "results/tables/mine/probes_summary.tsv", sep="\t")
    probes = probes[probes.protocol == "transductive"].set_index("embedding")
    assert {"my_fusion", "tensor_fusion", "concat", "unimodal_gex"} <= set(probes.index)
    assert probes.loc["my_fusion", "mean"] > 0.7  # the planted label signal is in the fused file
    pid = pd.read_csv(wd / "results/pid/mine.tsv", sep="\t")
    assert {"unimodal_pair", "my_fusion", "tensor_fusion"} <= set(pid["embedding"])
