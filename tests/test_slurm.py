"""The SLURM profile against a real single-node SLURM on localhost (munged, slurmctld, slurmd; two fake GPUs).

Runs ``snakemake --profile profiles/slurm`` (plus a test-only overlay for a cluster without accounting) and
checks, from slurmctld's own records (``scontrol show job``) and the plugin's sbatch calls, that
(a) every non-local job ran as a SLURM job, (b) jobs that declare a GPU went to a GPU partition with a GPU
request and all others to a CPU partition without one, (c) the real workflow's outputs equal a local run's.

Skipped, with the reason, without root or without the Debian packages (``apt-get install -y slurm-wlm munge``,
which .ci/run does); set CELLSYNERGY_REQUIRE_SLURM=1 to make that a failure instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from pandas.testing import assert_frame_equal

from slurm.local_cluster import ClusterSpec, LocalSlurm, missing_prerequisites
from slurm.snakemake_log import parse_job_blocks, parse_submissions, run_id
from workflow_utils import REPO, workdir

pytestmark = pytest.mark.slurm

PROFILE = REPO / "profiles" / "slurm"
LOCAL_PROFILE = REPO / "profiles" / "local"
SMALL = REPO / "tests" / "data" / "config_small.yaml"

# Test-only settings for a cluster without slurmdbd: job states come from squeue (MinJobAge=3600 keeps them
# there), no account lookup, and a short first status check. The production profile is used unchanged.
OVERLAY = {
    "slurm-status-command": "squeue",
    "slurm-no-account": True,
    "slurm-init-seconds-before-status-checks": 1,
}


def _profile() -> dict:
    return yaml.safe_load((PROFILE / "profile.yaml").read_text())


def _partitions() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(CPU partitions, GPU partitions) named in the profile's partition file."""
    parts = yaml.safe_load((PROFILE / _profile()["slurm-partition-config"]).read_text())["partitions"]
    cpu = tuple(p for p, lim in parts.items() if not (lim or {}).get("max_gpu"))
    gpu = tuple(p for p, lim in parts.items() if (lim or {}).get("max_gpu"))
    return cpu, gpu


def _gpu_model() -> str | None:
    models = {r.get("gpu_model") for r in _profile().get("set-resources", {}).values()} - {None}
    assert len(models) <= 1, f"the test cluster has one GPU type; the profile names {models}"
    return models.pop() if models else None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running local SLURM shaped like the profile's partitions; stopped whatever the tests' outcome."""
    reason = missing_prerequisites()
    if reason:
        if os.environ.get("CELLSYNERGY_REQUIRE_SLURM") == "1":
            pytest.fail(f"CELLSYNERGY_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="snakemake-executor-plugin-slurm not installed")
    cpu, gpu = _partitions()
    cluster = LocalSlurm(ClusterSpec(cpu_partitions=cpu, gpu_partitions=gpu, gpu_type=_gpu_model() or "a100"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop(keep_logs_in=tmp_path_factory.mktemp("slurm_daemon_logs"))


@pytest.fixture(scope="module")
def overlay(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("slurm_test_profile")
    (d / "profile.yaml").write_text(yaml.safe_dump(OVERLAY))
    return d


def run_on_slurm(cluster, overlay, wd, *args, snakefile=REPO / "Snakefile", timeout=900):
    """``snakemake --profile profiles/slurm --profile <overlay> --verbose`` in ``wd``; returns (process, seconds)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(wd),
           "--profile", str(PROFILE), "--profile", str(overlay), "--verbose", *args]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=wd, env=dict(cluster.env, PYTHONUNBUFFERED="1"), capture_output=True, text=True,
                       timeout=timeout)
    (wd / "snakemake_slurm.log").write_text(r.stdout + r.stderr)
    return r, time.monotonic() - t0


def job_records(cluster, text):
    """scontrol records of this run's jobs by SLURM job id, and the run's sbatch submissions."""
    uuid = run_id(text)
    assert uuid, "no 'SLURM run ID' in the snakemake output"
    jobs = {j["JobId"]: j for j in cluster.jobs() if j.get("JobName") == uuid}
    subs = parse_submissions(text)
    assert subs and all(s.slurm_jobid for s in subs), "every sbatch call must have been answered with a job id"
    return jobs, subs


def check_gpu_routing(subs, jobs, blocks, gpu_partitions, cpu_partitions, gpu_model):
    """(b): a submission whose jobs declare a GPU went to a GPU partition with a GPU request; others not.

    Returns {submission line: declared GPUs} for the report.
    """
    seen = {}
    for s in subs:
        declared = max(blocks[t].gpu for t in s.targets)
        job = jobs[s.slurm_jobid]
        gpu_flags = [a for a in s.argv if a.startswith(("--gpus", "--gres", "-G"))]
        if declared:
            want = f"--gpus={gpu_model}:1" if gpu_model else "--gpus=1"
            assert gpu_flags == [want], (s.line, declared)
            assert job["Partition"] in gpu_partitions, (s.line, job["Partition"])
            assert re.fullmatch(r"gres:gpu:(\w+:)?1", job.get("TresPerJob", "")), job.get("TresPerJob")
            assert s.option("--cpus-per-gpu") is not None, s.line  # the profile's cpus_per_gpu for GPU rules
        else:
            # with a gpu_model in the profile, gpu=0 jobs of GPU rules carry --gpus=<model>:0 (no GPU; see README)
            allowed = [f"--gpus={gpu_model}:0"] if gpu_model else []
            assert all(f in allowed for f in gpu_flags), (s.line, "CPU job with a GPU request")
            assert job["Partition"] in cpu_partitions, (s.line, job["Partition"])
            assert not re.search(r"gpu:(\w+:)?[1-9]", job.get("TresPerJob", "")), job.get("TresPerJob")
        seen[s.line] = declared
    return seen


# ---------------------------------------------------------------------------------------------------------------
# 1. The profile's sbatch lines, on a toy workflow whose rules carry the real GPU rules' names

TOY_SNAKEFILE = r'''
JOBINFO = 'echo "$SLURM_JOB_ID $SLURM_JOB_PARTITION ${{SLURM_GPUS_ON_NODE:-0}}" > {output}'

localrules: all

rule all:
    input: "out/probe.txt", "out/embed_0.txt", "out/embed_1.txt", "out/posttrain.txt", "out/flaky.txt",
           expand("out/align_{m}.txt", m=["cca", "simclr", "vicreg"])

rule probe:
    output: "out/probe.txt"
    resources: mem_mb=4000, runtime=5
    shell: JOBINFO

rule embed:
    output: "out/embed_{g}.txt"
    threads: 2
    resources: gpu=lambda wc: int(wc.g), mem_mb=16000, runtime=10
    shell: JOBINFO

rule align:
    output: "out/align_{m}.txt"
    resources: gpu=lambda wc: 0 if wc.m == "cca" else 1, mem_mb=8000, runtime=20
    group: "align"
    shell: JOBINFO

rule posttrain_nicheformer:
    output: "out/posttrain.txt"
    threads: 2
    resources: gpu=1, mem_mb=32000, runtime=30
    shell: JOBINFO

rule flaky:
    """Fails on its first attempt: the retry must get twice the memory."""
    output: "out/flaky.txt"
    resources: attempt_no=lambda wc, attempt: attempt
    shell: "test {resources.attempt_no} -gt 1 && " + JOBINFO
'''


def test_profile_sbatch_requests_on_real_slurm(slurm, overlay, tmp_path):
    wd = tmp_path / "toy"
    wd.mkdir()
    (wd / "Snakefile").write_text(TOY_SNAKEFILE)
    r, secs = run_on_slurm(slurm, overlay, wd, "all", snakefile=wd / "Snakefile", timeout=600)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-6000:]
    jobs, subs = job_records(slurm, text)
    blocks = parse_job_blocks(text)
    cpu_parts, gpu_parts = _partitions()

    # (a) every output was written inside a SLURM job that slurmctld recorded as COMPLETED
    for f in sorted((wd / "out").glob("*.txt")):
        jobid, partition, gpus_on_node = f.read_text().split()
        assert jobs[jobid]["JobState"] == "COMPLETED", (f.name, jobs[jobid])
        assert jobs[jobid]["Partition"] == partition
    by_target = {t: s for s in subs for t in s.targets}
    assert set(by_target) == {k for k, b in blocks.items() if not b.local}

    # (b) GPU jobs: GPU partition, --gpus, --cpus-per-gpu; CPU jobs: CPU partition, no GPU request
    check_gpu_routing(subs, jobs, blocks, gpu_parts, cpu_parts, _gpu_model())
    for name, want in {"embed_0": "0", "embed_1": "1", "posttrain": "1", "probe": "0", "align_simclr": "1"}.items():
        assert (wd / "out" / f"{name}.txt").read_text().split()[2] == want, name  # SLURM_GPUS_ON_NODE in the job

    def sub_of(rule, **wc):
        return by_target[(rule, tuple(sorted(wc.items())))]

    assert sub_of("embed", g="1").option("--cpus-per-gpu") == "2"  # = the rule's threads
    assert sub_of("embed", g="0").option("--cpus-per-task") == "2"
    assert sub_of("embed", g="0").option("--mem") == "16000"  # profile: 16000 * attempt
    assert sub_of("probe").option("-p") in cpu_parts

    # many small GPU jobs: the three align jobs share one allocation with ONE GPU; the GPU jobs run in series
    group = sub_of("align", m="simclr")
    assert sub_of("align", m="cca") is group is sub_of("align", m="vicreg")
    assert group.option("--gpus") == (f"{_gpu_model()}:1" if _gpu_model() else "1")
    assert int(group.option("-t")) >= 2 * 20
    assert "/group_align_" in group.output_pattern

    # retries: attempt 1 failed with --mem 2000, attempt 2 succeeded with --mem 4000 (default mem_mb 2000 * attempt)
    flaky = [s for s in subs if s.targets == [("flaky", ())]]
    assert [s.option("--mem") for s in flaky] == ["2000", "4000"]
    assert [jobs[s.slurm_jobid]["JobState"] for s in flaky] == ["FAILED", "COMPLETED"]

    # per-rule log folders, kept after success
    assert list((wd / "logs/slurm/rule_probe").glob("*.log"))
    assert list((wd / "logs/slurm/rule_embed/1").glob("*.log"))
    print(f"\ntoy workflow on SLURM: {len(subs)} submissions in {secs:.0f} s")
    for s in subs:
        print("  ", re.sub(r"--job-name \S+ ", "", s.line))


# ---------------------------------------------------------------------------------------------------------------
# 2. The real workflow on the small configuration: SLURM run == local run

# One trainable (GPU) method and cca (an align job that declares gpu=0), plus the two unimodal baselines SIS needs.
OVERRIDES = ("methods=[cca,simclr]", "baselines=[unimodal_gex,unimodal_img]")
TARGETS = ("results/sis/her2st.tsv", "results/figures/her2st/sis_heatmap.png", "results/her2st/qc/patches.png")


def run_locally(wd):
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(wd),
           "--profile", str(LOCAL_PROFILE), *TARGETS, "--config", *OVERRIDES, "--configfile", str(SMALL)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=wd, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return r, time.monotonic() - t0


def compare_results(a: Path, b: Path) -> tuple[list[str], list[str]]:
    """Assert that every parquet and TSV result under ``a/results`` equals its twin under ``b``.

    Same seed, same threads, same machine: the tables are expected to be identical; a difference within
    rtol 1e-6 is tolerated (and reported) so that a BLAS that reorders a sum does not fail the test.
    Returns (compared paths, paths that were equal only within the tolerance).
    """
    compared, inexact = [], []
    for f in sorted((a / "results").rglob("*")):
        rel = f.relative_to(a)
        if f.suffix not in (".parquet", ".tsv"):
            continue
        if rel.parts[1] == "benchmarks" or f.name.startswith("benchmarks"):
            continue  # time and memory of the jobs, not results
        twin = b / rel
        assert twin.exists(), f"{rel} is missing from the local run"
        if f.suffix == ".parquet":
            left, right = pd.read_parquet(f), pd.read_parquet(twin)
        else:
            left, right = pd.read_csv(f, sep="\t"), pd.read_csv(twin, sep="\t")
            timing = [c for c in left.columns if re.search(r"(^|_)(time|seconds|elapsed|duration)(_|$)", c)]
            left, right = left.drop(columns=timing), right.drop(columns=timing)
        try:
            assert_frame_equal(left, right, check_exact=True, obj=str(rel))
        except AssertionError:
            assert_frame_equal(left, right, check_exact=False, rtol=1e-6, atol=1e-9, obj=str(rel))
            inexact.append(str(rel))
        compared.append(str(rel))
    return compared, inexact


def test_workflow_on_real_slurm_matches_local_run(slurm, overlay, tmp_path):
    (tmp_path / "slurm_run").mkdir()
    wd = workdir(tmp_path / "slurm_run")
    r, secs = run_on_slurm(slurm, overlay, wd, *TARGETS, "--config", *OVERRIDES, "--configfile", str(SMALL))
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-8000:]
    jobs, subs = job_records(slurm, text)
    blocks = parse_job_blocks(text)
    cpu_parts, gpu_parts = _partitions()

    # (a) every job of a non-local rule ran as a SLURM job that completed; local rules are the Snakefile's localrules
    remote = {k for k, b in blocks.items() if not b.local}
    ran = {t for s in subs for t in s.targets}
    assert ran == remote
    assert all(jobs[s.slurm_jobid]["JobState"] == "COMPLETED" for s in subs)
    assert {"prepare", "embed", "align", "probe"} <= {rule for rule, _ in remote}

    # (b) GPU requests follow the amounts the rules declare (embed with pca/morphology: 0; align simclr: 1)
    seen = check_gpu_routing(subs, jobs, blocks, gpu_parts, cpu_parts, _gpu_model())
    assert any(seen.values()) and not all(seen.values()), "need both GPU and CPU submissions"
    assert any(b.rule == "embed" for b in blocks.values())

    # (c) the same outputs as a local run with the same seed
    (tmp_path / "local_run").mkdir()
    wd_local = workdir(tmp_path / "local_run")
    rl, secs_local = run_locally(wd_local)
    assert rl.returncode == 0, (rl.stdout + rl.stderr)[-6000:]
    compared, inexact = compare_results(wd, wd_local)
    assert any(c.endswith(".parquet") and "/aligned/simclr/" in c for c in compared), compared
    assert any(c.startswith("results/sis/") for c in compared), compared
    print(f"\nworkflow on SLURM: {len(subs)} submissions in {secs:.0f} s; local run {secs_local:.0f} s; "
          f"{len(compared)} result tables equal ({len(compared) - len(inexact)} exactly; within rtol 1e-6: {inexact})")
    for s in subs:
        print("  ", re.sub(r"--job-name \S+ ", "", s.line))
