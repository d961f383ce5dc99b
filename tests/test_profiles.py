"""Fast checks of the Snakemake profiles, no SLURM needed (tests/test_slurm.py runs them on a real SLURM).

The sbatch requests are built with the SLURM plugin's own functions (snakemake-executor-plugin-slurm 2.8.0,
pinned in pyproject.toml) from the profile's resources, the way the plugin combines them for a job.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import yaml

from workflow_utils import REPO, snakemake, workdir

PROFILES = REPO / "profiles"
SLURM = PROFILES / "slurm" / "profile.yaml"
LOCAL = PROFILES / "local" / "profile.yaml"
# Rules that can use a GPU: embedding extraction, alignment training, encoder post-training.
GPU_RULES = ("embed", "align", "posttrain_nicheformer")
# sbatch options the plugin manages itself and rejects inside slurm_extra (plugin >= 1.9), GPU flags among them.
MANAGED = re.compile(r"(^|\s)(--gres|--gpus|-G|--partition|-p|--mem|--mem-per-cpu|--time|-t|--account|-A|"
                     r"--cpus-per-task|-c|--cpus-per-gpu|--ntasks|-n|--nodes|-N|--output|-o|--job-name|-J)(=|\s|$)")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def rule_declarations() -> dict[str, dict]:
    """Per rule in rules/*.smk: literal ``mem_mb``, whether it declares ``gpu``, its ``group``."""
    out = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        parts = re.split(r"^rule (\w+):\s*$", smk.read_text(), flags=re.M)
        for name, body in zip(parts[1::2], parts[2::2]):
            mem = re.search(r"^\s+mem_mb=(\d+)", body, flags=re.M)
            group = re.search(r"^\s+group:\s*\n\s+\"(\w+)\"", body, flags=re.M)
            out[name] = {"mem_mb": int(mem.group(1)) if mem else None,
                         "gpu": bool(re.search(r"^\s+gpu=", body, flags=re.M)),
                         "group": group.group(1) if group else None}
    return out


def evaluate(value, attempt=1, threads=1):
    """A profile resource value as Snakemake evaluates it (Python expression, else the string itself)."""
    if not isinstance(value, str):
        return value
    try:
        return eval(value, {"attempt": attempt, "threads": threads})  # noqa: S307 - the repo's own profile
    except (NameError, SyntaxError):
        return value


def test_profile_files_and_no_default_profile():
    assert SLURM.is_file() and LOCAL.is_file()
    # profiles/default would be loaded implicitly on top of --profile profiles/slurm and win per key
    assert not (PROFILES / "default").exists()
    assert not (REPO / "workflow" / "profiles" / "default").exists()
    for d in ("slurm", "local"):  # one profile file per folder: Snakemake >= 9.19 reads profile.yaml
        assert not (PROFILES / d / "config.yaml").exists()


def test_slurm_profile_settings():
    p = load(SLURM)
    assert p["executor"] == "slurm"
    assert int(p["jobs"]) >= 1 and p["retries"] >= 1 and p["latency-wait"] >= 30
    assert p["rerun-incomplete"] is True and p["keep-going"] is True
    assert p["slurm-logdir"] == "logs/slurm"
    assert (SLURM.parent / p["slurm-partition-config"]).is_file()
    # settings for the test cluster (no accounting database) must stay out of the production profile
    for k in ("slurm-status-command", "slurm-no-account", "slurm-init-seconds-before-status-checks"):
        assert k not in p, k
    # site defaults in one place: runtime and memory for rules that declare none
    assert {"runtime", "mem_mb"} <= set(p["default-resources"])


def test_no_slurm_extra_with_gpu_or_managed_flags():
    p = load(SLURM)
    scopes = [p.get("default-resources") or {}] + list((p.get("set-resources") or {}).values())
    for res in scopes:
        extra = res.get("slurm_extra")
        assert extra is None or not MANAGED.search(str(extra)), extra


def test_memory_scales_with_attempt_and_matches_the_rules():
    p, decl = load(SLURM), rule_declarations()
    for rule, res in p["set-resources"].items():
        mem = res.get("mem_mb")
        assert mem is not None, f"{rule}: set-resources must give mem_mb scaled by attempt"
        assert evaluate(mem, attempt=2) == 2 * evaluate(mem, attempt=1), rule
        if rule in decl and decl[rule]["mem_mb"] is not None:
            assert evaluate(mem, attempt=1) == decl[rule]["mem_mb"], (
                f"profiles/slurm set-resources {rule}.mem_mb must start at the rule's mem_mb "
                f"({decl[rule]['mem_mb']}) so that the cluster's first attempt asks for what the rule declares")
    for rule, d in decl.items():  # every rule with its own mem_mb gets the attempt scaling
        if d["mem_mb"] is not None:
            assert rule in p["set-resources"], f"add {rule} to set-resources in {SLURM}"
    assert evaluate(p["default-resources"]["mem_mb"], attempt=3) == 3 * evaluate(p["default-resources"]["mem_mb"])


def test_every_gpu_rule_is_mapped():
    p, decl = load(SLURM), rule_declarations()
    gpu_declaring = {r for r, d in decl.items() if d["gpu"]}
    assert {"embed", "align"} <= gpu_declaring
    for rule in gpu_declaring | set(GPU_RULES):
        assert "cpus_per_gpu" in p["set-resources"].get(rule, {}), f"GPU rule {rule} is not mapped in {SLURM}"


def test_small_gpu_jobs_are_batched_on_one_gpu():
    p, decl = load(SLURM), rule_declarations()
    groups = {decl["align"]["group"]} | set((p.get("groups") or {}).values())
    assert None not in groups
    for group in groups:  # every group has several jobs per SLURM submission
        assert int(p["group-components"][group]) > 1, group
    # gpu counted per submission, at most 1: a group's GPU jobs run in series on one GPU
    assert p["set-resource-scopes"]["gpu"] == "local" and p["resources"]["gpu"] == 1


class _Resources(dict):
    __getattr__ = dict.__getitem__


class _Job:
    """The part of a Snakemake job the plugin's submit functions read."""

    def __init__(self, name, resources, threads):
        self.name, self.resources, self.threads = name, _Resources(resources), threads
        self.wildcards = {}

    def is_group(self):
        return False


def plugin_request(rule: str, gpu: int, threads: int, attempt: int = 1) -> tuple[str, str]:
    """(partition, sbatch line) the SLURM plugin builds for a job of ``rule`` declaring ``gpu`` and ``threads``."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    from snakemake_executor_plugin_slurm.partitions import get_best_partition, read_partition_file
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    p = load(SLURM)
    res = {k: evaluate(v, attempt, threads) for k, v in p["default-resources"].items()}
    res.update(gpu=gpu, runtime=60)
    res.update({k: evaluate(v, attempt, threads) for k, v in p["set-resources"].get(rule, {}).items()})
    job = _Job(rule, res, threads)
    partitions = read_partition_file(SLURM.parent / p["slurm-partition-config"])
    partition = get_best_partition(partitions, job, logging.getLogger("plugin"))
    params = {"run_uuid": "x", "slurm_logfile": f"logs/slurm/rule_{rule}/%j.log", "comment_str": f"rule_{rule}",
              "account": "", "partition": f" -p {partition}", "workdir": "/wd"}
    return partition, get_submit_command(job, params) + set_gres_string(job)


@pytest.mark.parametrize("rule", sorted(set(GPU_RULES) | {r for r, d in rule_declarations().items() if d["gpu"]}))
def test_gpu_jobs_go_to_a_gpu_partition_with_a_gpu_request(rule):
    parts = load(SLURM.parent / load(SLURM)["slurm-partition-config"])["partitions"]
    model = load(SLURM)["set-resources"][rule].get("gpu_model")
    partition, line = plugin_request(rule, gpu=1, threads=4)
    assert parts[partition].get("max_gpu", 0) >= 1, line
    assert re.search(rf"--gpus={model + ':' if model else ''}1(\s|$)", line), line
    assert "--cpus-per-gpu=4" in line and "--cpus-per-task" not in line, line
    assert "--mem " + str(evaluate(load(SLURM)["set-resources"][rule]["mem_mb"])) in line
    _, retry = plugin_request(rule, gpu=1, threads=4, attempt=2)
    assert "--mem " + str(2 * evaluate(load(SLURM)["set-resources"][rule]["mem_mb"])) in retry


@pytest.mark.parametrize("rule", ("embed", "align", "probe", "prepare", "random_baseline"))
def test_jobs_without_gpu_go_to_a_cpu_partition_without_gpu_request(rule):
    """Also the GPU-capable rules when a job declares gpu=0 (offline encoders, cca, concat)."""
    parts = load(SLURM.parent / load(SLURM)["slurm-partition-config"])["partitions"]
    partition, line = plugin_request(rule, gpu=0, threads=2)
    assert not parts[partition].get("max_gpu"), line
    assert "--gpus" not in line and "--gres" not in line and "--cpus-per-gpu" not in line, line
    assert "--cpus-per-task=2" in line


def test_local_profile():
    p = load(LOCAL)
    assert "executor" not in p and p["cores"] == "all"
    assert p["rerun-incomplete"] is True  # after `snakemake --unlock`, a crashed run resumes with the same command
    assert int(p["resources"]["gpu"]) >= 1  # GPU rules declare gpu=1; 0 would make them unschedulable


@pytest.mark.parametrize("profile", ["slurm", "local"])
def test_profiles_load_alone(tmp_path, profile):
    """Snakemake reads the profile and no other (an implicit profiles/default would be reported here)."""
    wd = workdir(tmp_path)
    r = snakemake(wd, "--profile", str(PROFILES / profile), "-n", "--quiet", "rules", "all",
                  configfile=REPO / "tests/data/config_small.yaml")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert re.search(rf"Using profile \S*profiles/{profile} for setting default command line arguments", out), out[:500]
    assert "workflow specific profile" not in out
