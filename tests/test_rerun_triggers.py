"""Changing one config key reruns exactly the jobs whose outputs depend on it (Snakemake's params trigger).

A completed small run is simulated once per module: every output of `all` (small config) is created empty and
`snakemake --touch --forceall` records the provenance metadata (params, code, input) of each job as a real run
would, without computing anything. Each test then changes one key in a second config file and reads, from a dry
run, which jobs Snakemake plans and why: the changed rule must be planned because its params changed, and
nothing upstream of it may be.
"""

from __future__ import annotations

import re

import pytest
import yaml

from workflow_utils import REPO, job_counts, snakemake, workdir

pytestmark = pytest.mark.e2e  # runs the workflow (with --touch): about 40 s on 2 cores

SMALL = REPO / "tests/data/config_small.yaml"
UPSTREAM = {"prepare", "qc_patches", "embed", "align", "align_inductive", "interface_folds", "random_baseline"}
EVALUATION_ONLY = {"folds", "probe", "spatial_probe", "pid", "collect_probes", "collect_spatial", "sis",
                   "figure_probe_scores", "figure_sis_heatmap", "figure_spatial_rings", "figure_protocols",
                   "figure_pid", "collect_benchmarks", "figure_benchmarks", "all"}
BENCHMARKS = {"collect_benchmarks", "figure_benchmarks"}  # the per-rule benchmark table follows every rerun


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A working directory in which `all` of the small config is complete, with provenance metadata."""
    wd = workdir(tmp_path_factory.mktemp("triggers"))
    r = snakemake(wd, "all", "--summary", configfile=SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [ln.split("\t") for ln in r.stdout.splitlines()[1:] if "\t" in ln]
    assert len(rows) > 50
    for row in rows:
        f = wd / row[0]
        if f.suffix in (".zarr", ""):  # directory() outputs: sdata.zarr, aligned_inductive/<method>/seed<s>
            f.mkdir(parents=True, exist_ok=True)
            continue
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
    r = snakemake(wd, "all", "--touch", "--forceall", "--cores", "1", configfile=SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    r = snakemake(wd, "all", "-n", configfile=SMALL)
    assert "Nothing to be done" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert "missing provenance" not in r.stdout + r.stderr
    return wd


def planned(wd, change: dict, name: str):
    """(job counts, rules whose reason is a params change) of a dry run of `all` with ``change`` merged in."""
    extra = wd / f"{name}.yaml"
    extra.write_text(yaml.safe_dump(change))
    r = snakemake(wd, "all", "-n", "--quiet", "rules", "reason", "--configfile", str(SMALL), str(extra))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    m = re.search(r"params have changed since last execution:\s*\n\s*(.+)", out)
    changed = set(m.group(1).replace(" ", "").split(",")) if m else set()
    return job_counts(r.stdout), changed


@pytest.mark.parametrize(
    "name, change, expected_changed",
    [
        # the class set is fixed in the fold tables (folds), which the probes then read
        ("min_class_size", {"datasets": {"her2st": {"min_class_size": 4}}}, {"folds", "spatial_probe", "pid"}),
        ("ring_edges", {"datasets": {"her2st": {"spatial": {"ring_edges_um": [0, 250, 500, 900]}}}},
         {"spatial_probe"}),
        ("task_exclude", {"datasets": {"her2st": {"tasks": {"pathology": {
            "type": "classification", "label": "pathology", "exclude": ["undetermined", "invasive cancer"]}}}}},
         {"folds", "pid"}),
        ("probe", {"probe": {"logreg_max_iter": 500}}, {"probe", "spatial_probe"}),
    ],
)
def test_evaluation_settings_rerun_only_evaluation_jobs(done, name, change, expected_changed):
    counts, changed = planned(done, change, name)
    assert changed == expected_changed
    assert set(counts) <= EVALUATION_ONLY, set(counts) - EVALUATION_ONLY
    assert not UPSTREAM & set(counts)


def test_analysis_setting_reruns_only_that_analysis(done):
    counts, changed = planned(done, {"spatial_consistency": {"k": 3}}, "sc")
    assert changed == {"spatial_consistency"}
    assert set(counts) == {"spatial_consistency", "collect_spatial_consistency", "figure_spatial_consistency", "all"} | BENCHMARKS
    assert counts["spatial_consistency"] == 13


def test_gex_encoder_setting_reruns_the_gex_embedding_and_everything_after(done):
    counts, changed = planned(done, {"encoders": {"pca": {"n_comps": 8}}}, "pca")
    assert changed == {"embed"}
    assert counts["embed"] == 1  # the GEX embedding only; the image embedding is untouched
    assert "prepare" not in counts and "qc_patches" not in counts
    # every embedding built from GEX: all but the image-only baseline
    assert counts["align"] == 10 and counts["random_baseline"] == 1
    # two protocols; the inductive interfaces (9 methods, both donors in one job each) are retrained too
    assert counts["probe"] == 12 * 2 and counts["spatial_consistency"] == 12 and counts["align_inductive"] == 9
    assert "folds" not in counts and "interface_folds" not in counts


def test_patch_size_reruns_the_image_embedding_and_qc_not_the_spots(done):
    counts, changed = planned(done, {"datasets": {"her2st": {"patch_um": 150}}}, "patch")
    assert changed == {"embed", "qc_patches", "folds", "interface_folds"}  # the inductive buffer is one patch
    assert counts["embed"] == 1 and counts["qc_patches"] == 1 and "prepare" not in counts
    assert counts["align"] == 10


def test_training_setting_reruns_training_not_embeddings(done):
    counts, changed = planned(done, {"training": {"method_params": {"simclr": {"temperature": 0.2}}}}, "simclr")
    assert changed == {"align", "align_inductive"}
    assert counts["align"] == 1 and counts["align_inductive"] == 1 and "embed" not in counts and "random_baseline" not in counts
    assert counts["probe"] == 2 and counts["spatial_probe"] == 1  # one probe job per protocol


def test_learning_rate_does_not_refit_cca_or_concat(done):
    counts, changed = planned(done, {"training": {"lr": 2e-4}}, "lr")
    assert changed == {"align", "align_inductive"}
    assert counts["align"] == 8 and counts["align_inductive"] == 8 and counts["probe"] == 16  # the ten methods but cca (closed form) and concat
    assert "embed" not in counts and "random_baseline" not in counts


def test_reader_setting_rebuilds_everything(done):
    counts, changed = planned(done, {"datasets": {"her2st": {"max_spots_per_slide": 30}}}, "reader")
    assert changed == {"prepare"}
    assert counts["prepare"] == 1 and counts["embed"] == 2 and counts["align"] == 10


def test_settings_that_do_not_change_results_rerun_nothing(done):
    change = {"embed": {"batch_size": 8, "num_workers": 1, "device": "cpu"}, "training": {"device": "cpu", "threads": 2}}
    counts, changed = planned(done, change, "runtime")
    assert counts == {} and changed == set()
