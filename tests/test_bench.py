"""The benchmark command (workflow_scripts/bench) at small sizes: the fast paths agree with the naive ones; the job
benchmark collection; the GPU check script in its CPU/tiny mode."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from workflow_scripts.bench import jobs
from workflow_scripts.bench.run import PROBE_PARAMS, SPATIAL_PARAMS, TASKS, naive_ring_fit, naive_ring_pairs
from workflow_scripts.bench.synthetic import LUNG_RING_EDGES_UM, scaled, synthetic_dataset
from workflow_scripts.evaluation.spatial_probe import ring_pairs, ring_problems, run_spatial_probe

from workflow_utils import REPO


@pytest.fixture(scope="module")
def small():
    # 7 slides of ~70 patches on the 54.4 µm grid; regions large enough for the rings to carry signal
    d = synthetic_dataset(seed=1, signal=1.0, regions_per_slide=4, **scaled(0.007, d_img=24, d_gex=12))
    return d, d.anndata()


def test_synthetic_data_has_the_planted_structure(small):
    d, a = small
    assert len(d.obs) == 497 and d.img.shape == (497, 24) and d.gex.shape == (497, 12)
    assert d.img.dtype == np.float32 and np.allclose(d.composition.sum(1), 1)
    xy = d.obs[["x_um", "y_um"]].to_numpy()
    assert np.allclose(np.unique(np.diff(np.unique(xy[:, 0]))), 54.4)   # the patch grid
    # regions are spatially coherent: most grid neighbours share the region
    pr = ring_pairs(a, [0, 60])[0]
    lab = d.obs["region"].to_numpy()
    assert (lab[pr[0]] == lab[pr[1]]).mean() > 0.7
    # the IMG embedding carries the region (class means differ by far more than their spread)
    means = pd.DataFrame(d.img).groupby(lab).mean().to_numpy()
    assert np.linalg.norm(means - means.mean(0), axis=1).mean() > 0.5
    assert synthetic_dataset(seed=1, **scaled(0.007)).img.shape[1] == round(1536 * 0.007 ** 0.5)


def test_kd_tree_rings_equal_all_pairs_distances(small):
    _, a = small
    fast = ring_pairs(a, LUNG_RING_EDGES_UM)
    naive = naive_ring_pairs(a, LUNG_RING_EDGES_UM, block=50)  # several row blocks per slide
    assert len(fast) == len(naive) == 8
    for (c1, n1), (c2, n2) in zip(fast, naive):
        assert len(c1) > 0
        np.testing.assert_array_equal(c1, c2)
        np.testing.assert_array_equal(n1, n2)


def test_fast_ring_probes_agree_with_one_cold_default_fit_per_ring_and_repeat(small):
    d, a = small
    emb = d.frame("img")
    edges, sparams = LUNG_RING_EDGES_UM[:5], {**SPATIAL_PARAMS, "n_repeats": 3}
    res = run_spatial_probe(emb, a, TASKS, edges, PROBE_PARAMS, sparams, seed=0)
    assert set(res["metric"]) == {"macro_f1", "r2"} and len(res) == 2 * 4 * 3
    diffs = {"macro_f1": [], "r2": []}
    for prob in ring_problems(emb, a, TASKS, edges, sparams, seed=0):
        for r in range(len(prob.splits)):
            v = naive_ring_fit(prob, r, 2000, PROBE_PARAMS["ridge_alphas"], 0)
            fast = res.loc[(res.task == prob.task) & (res.ring == prob.ring) & (res["repeat"] == r), "value"]
            diffs[prob.metric].append(abs(float(fast.iloc[0]) - v))
    # ridge: the same alpha by the same leave-one-out criterion, float32 features
    assert max(diffs["r2"]) < 1e-4
    # logistic regression: the same strictly convex optimum, reached within the L-BFGS tolerance from another
    # start and in float32; macro-F1 over ~100 test spots moves by a few predictions at most
    assert np.mean(diffs["macro_f1"]) < 0.01 and max(diffs["macro_f1"]) < 0.05


def test_bench_cli_prints_every_stage(tmp_path, capsys):
    from workflow_scripts.bench.run import main

    out = tmp_path / "bench.tsv"
    df = main(["--scale", "0.005", "--stages", "rings,ring_probes,probes", "--naive-fits", "2", "--threads", "1",
               "--logreg-cs", "1.0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "machine:" in printed and "ring_probes" in printed
    t = pd.read_csv(out, sep="\t")
    assert list(t["stage"]) == ["data", "rings", "rings", "ring_probes", "ring_probes", "probes", "probes"]
    assert t.loc[1:, "wall_s"].gt(0).all() and t["peak_rss_gib"].gt(0).all()
    assert t.loc[2, "agree"] == "same pairs" and t.loc[[2, 4, 6], "ratio"].gt(0).all()
    # the workflow's single-C probe (float32, unrotated full-rank folds, ridge leave-one-out) against the naive
    # float64 fits on the same folds: R² equal to rounding, macro-F1 within the solver tolerance
    f1_diff, r2_diff = (float(x) for x in re.findall(r"max \|Δ\| ([0-9.]+)", t.loc[6, "agree"]))
    assert r2_diff < 1e-4 and f1_diff < 0.05
    assert "4 of 10 folds timed" in t.loc[6, "variant"]
    assert df.shape[0] == 7
    with pytest.raises(SystemExit):
        main(["--stages", "nope"])


def write_bench(path, s, rss, cpu):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                    f"{s}\t0:00:{int(s):02d}\t{rss}\t1\t1\t1\t0\t0\t50\t{cpu}\n")


def test_job_benchmarks_collected_and_summarised(tmp_path):
    root = tmp_path / "results/benchmarks"
    write_bench(root / "her2st/probe/cca_seed0.tsv", 2.0, 300.0, 1.5)
    write_bench(root / "her2st/probe/cca_seed1.tsv", 4.0, 500.0, 3.5)
    write_bench(root / "her2st/prepare.tsv", 30.0, 900.0, 28.0)
    write_bench(root / "other/prepare.tsv", 1.0, 1.0, 1.0)
    (root / "her2st/umap_coords.tsv").write_text("s\th:m:s\tmax_rss\n0.5\t0:00:00\tNA\n")  # short job: NA
    df = jobs.collect(root, ["her2st"])
    assert set(df["dataset"]) == {"her2st"} and len(df) == 4
    row = df[(df.rule == "probe") & (df.wildcards == "cca_seed1")].iloc[0]
    assert row["s"] == 4.0 and row["max_rss"] == 500.0 and row["cpu_time"] == 3.5
    assert np.isnan(df.loc[df.rule == "umap_coords", "max_rss"]).all()
    s = jobs.summarise(df)
    assert list(s["rule"]) == ["prepare", "probe", "umap_coords"]  # by total time
    p = s.set_index("rule").loc["probe"]
    assert p["jobs"] == 2 and p["s_total"] == 6.0 and p["s_mean"] == 3.0 and p["max_rss_max"] == 500.0
    out = tmp_path / "t.tsv"
    jobs.main(["collect", "--root", str(root), "--datasets", "her2st", "--out", str(out),
               "--summary", str(tmp_path / "s.tsv")])
    jobs.main(["figure", "--summary", str(tmp_path / "s.tsv"), "--out", str(tmp_path / "b.png")])
    assert (tmp_path / "b.png").stat().st_size > 5_000
    assert jobs.collect(tmp_path / "none").empty
    with pytest.raises(ValueError, match="expected"):
        jobs.parse_path(root / "a/b/c/d.tsv", root)


def test_gpu_check_script_runs_on_cpu_tiny(tmp_path):
    out = tmp_path / "gpu.tsv"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), "--device", "cpu", "--tiny", "--out", str(out),
                        "--timeout", "300"], capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    t = pd.read_csv(out, sep="\t")
    assert set(t["check"]) == {"uni2h", "nicheformer", "train", "mlm"}
    assert (t["status"] == "ok").all()
    items = set(t["item"])
    assert {"patches/s bf16", "cells/s fp32", "uni2h cosine bf16 vs fp32 (mean)", "comm epochs/s",
            "optimiser steps/s"} <= items
    assert sum(i.endswith("epochs/s") and "bf16" not in i for i in items) == 8  # every trained method
    assert {"comm bf16 epochs/s", "dcca bf16 epochs/s"} <= set(items)  # training.precision: bf16


def test_every_rule_that_does_real_work_declares_a_benchmark_file():
    """Rules that run a stage (not the local collect/figure/download rules) write results/benchmarks/... files,
    in the layout the collector parses (results/benchmarks/<dataset>/<rule>[/<wildcards>].tsv)."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    light = re.compile(r"^(collect_|figure_|download|fetch_|manual_|all$|figures$|analysis$)")
    missing, wrong = [], []
    for smk in sorted((repo / "rules").glob("*.smk")):
        text = smk.read_text()
        for m in re.finditer(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", text, re.S | re.M):
            name, body = m.group(1), m.group(2)
            if light.match(name) or "shell:" not in body:
                continue
            b = re.search(r'    benchmark:\n        "([^"]+)"', body)
            if not b:
                missing.append(f"{smk.name}:{name}")
            elif not b.group(1).startswith(f"results/benchmarks/{{dataset}}/{name}"):
                wrong.append(f"{smk.name}:{name}: {b.group(1)}")
    assert not missing, f"rules without benchmark: {missing}"
    assert not wrong, wrong
