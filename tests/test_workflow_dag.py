"""Dry-run DAG tests of the real Snakefile: which jobs `all` and single targets contain."""

import pytest
import yaml

from workflow_utils import REPO, job_counts, snakemake, workdir

SMALL = REPO / "tests/data/config_small.yaml"


def dry(tmp_path, *targets, configfile=None, extra=()):
    wd = workdir(tmp_path)
    r = snakemake(wd, *targets, *extra, "-n", "--quiet", "rules", configfile=configfile)
    assert r.returncode == 0, r.stdout + r.stderr
    return job_counts(r.stdout)


def test_all_default_config_has_every_stage(tmp_path):
    c = dry(tmp_path, "all")
    cfg = yaml.safe_load(open(REPO / "config/config.yaml"))
    n_seeds, n_methods = len(cfg["seeds"]), len(cfg["methods"])
    n_emb = (n_methods + len(cfg["baselines"])) * n_seeds
    n_protocols = len(cfg["protocols"])
    assert cfg["protocols"] == ["transductive", "inductive"]
    assert c["prepare"] == 1
    assert c["embed"] == 2  # one GEX and one IMG encoder
    assert c["align"] == n_methods * n_seeds
    assert c["random_baseline"] == n_seeds
    # one fold table per protocol and seed, shared by every probe
    assert c["folds"] == n_protocols * n_seeds
    # inductive: every trained method (not concat) once per seed, all outer folds in one job
    assert c["align_inductive"] == (n_methods - 1) * n_seeds
    # one probe job per protocol × embedding × seed (a fused method's job also probes its controls)
    assert c["probe"] == n_emb * n_protocols
    assert c["spatial_probe"] == n_emb
    for rule in ("collect_probes", "sis", "figure_probe_scores", "figure_sis_heatmap", "figure_spatial_rings",
                 "figure_protocols"):
        assert c[rule] == 1, rule


def test_single_sis_target_builds_only_what_it_needs(tmp_path):
    c = dry(tmp_path, "results/sis/her2st.tsv")
    assert "spatial_probe" not in c and "collect_spatial" not in c
    assert not any(k.startswith("figure") for k in c)
    assert c["sis"] == 1 and c["collect_probes"] == 1 and c["align"] == 30 and c["align_inductive"] == 27


def test_small_config_dag(tmp_path):
    c = dry(tmp_path, "all", configfile=SMALL)
    # sections A1 and C2: two donors, two outer folds
    assert c["align"] == 10 and c["probe"] == 26 and c["embed"] == 2
    assert c["align_inductive"] == 9 and c["folds"] == 2


def test_one_method_one_seed_via_config_override(tmp_path):
    c = dry(tmp_path, "results/sis/her2st.tsv", configfile=SMALL, extra=("--config", "methods=[cca]", "baselines=[unimodal_gex,unimodal_img]"))
    assert c["align"] == 1 and c["probe"] == 6 and "random_baseline" not in c and c["align_inductive"] == 1


def test_transductive_only_plans_no_inductive_job(tmp_path):
    c = dry(tmp_path, "all", configfile=SMALL, extra=("--config", "protocols=[transductive]"))
    assert "align_inductive" not in c and c["folds"] == 1 and c["probe"] == 13


def test_outer_folds_follow_the_configured_donors(tmp_path):
    """Sections of one patient (A1 only): a single donor, so spatial blocks give probe.n_folds outer folds."""
    wd = workdir(tmp_path)
    r = snakemake(wd, "results/sis/her2st.tsv", "--config", "methods=[cca]", "baselines=[unimodal_gex,unimodal_img]",
                  "datasets={'her2st': {'sections': ['A1']}}", "-n", "--printshellcmds", configfile=SMALL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("--interface-folds") == 1 and "--n-outer 5 " in r.stdout
    # the probe job reads the five interfaces' tables, in outer-fold order
    probe = next(ln for ln in r.stdout.splitlines() if "evaluation.probes" in ln and "--name cca " in ln
                 and "inductive/seed0.tsv" in ln)
    assert [f"outer{k}.parquet" in probe for k in range(6)] == [True] * 5 + [False]


def test_figures_rebuild_from_tables_only(tmp_path):
    """With the summary tables present, the figure target needs no upstream job."""
    wd = workdir(tmp_path)
    for rel in ("results/tables/her2st/probes_summary.tsv", "results/sis/her2st.tsv",
                "results/tables/her2st/spatial.tsv", "results/tables/her2st/protocols.tsv"):
        p = wd / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x\n")
    r = snakemake(wd, "results/figures/her2st/probe_scores.png", "results/figures/her2st/sis_heatmap.png",
                  "results/figures/her2st/spatial_rings.png", "results/figures/her2st/protocols.png", "-n",
                  "--quiet", "rules")
    assert r.returncode == 0, r.stderr
    c = job_counts(r.stdout)
    assert set(c) == {"figure_probe_scores", "figure_sis_heatmap", "figure_spatial_rings", "figure_protocols"}


def test_seeds_methods_and_reader_keys_from_the_command_line(tmp_path):
    """`--config` hands nested values over as strings (seeds=[0] -> ["0"]); they are typed by the schemas."""
    c = dry(tmp_path, "all", extra=("--config", "seeds=[0]", "methods=[cca,comm]",
                                     "datasets={her2st: {max_spots_per_slide: 40}}"))
    assert c["align"] == 2 and c["probe"] == 5 * 2 and c["random_baseline"] == 1 and c["prepare"] == 1
    assert c["align_inductive"] == 2  # cca and comm, each trained on the donors A, B, C held out in one job


@pytest.mark.parametrize(
    "override, message",
    [
        ("probe={'n_folds': 1}", "n_folds"),
        ("protocols=[transductive,leave_one_out]", "leave_one_out"),
        ("bootstrap={'level': 1.5}", "level"),
        ("methods=[cca,not_a_method]", "not_a_method"),
        ("training={'lr': -1}", "lr"),
        ("datasets={her2st: {max_spot_per_slide: 40}}",
         "datasets.her2st: unknown key 'max_spot_per_slide' (did you mean 'max_spots_per_slide'?)"),
        ("datasets={her2st: {section: [A1]}}", "datasets.her2st: unknown key 'section' (did you mean 'sections'?)"),
        ("datasets={her2st: {sections: []}}", "datasets.her2st.sections: [] should be non-empty"),
        ("datasets={her2st: {sections: [A1, Z9]}}", "datasets.her2st.sections: unknown HER2ST section(s) ['Z9']"),
        ("datasets={her2st: {reader: visum}}", "datasets.her2st.reader: unknown reader 'visum' (did you mean 'visium'?)"),
        ("training={method_params: {comm: {temprature: 0.1}}}",
         "training.method_params.comm: unknown parameter 'temprature' (did you mean 'temperature'?)"),
    ],
)
def test_invalid_config_fails_before_any_job_naming_the_key(tmp_path, override, message):
    wd = workdir(tmp_path)
    r = snakemake(wd, "all", "--config", override, "-n")
    assert r.returncode != 0
    assert message in (r.stdout + r.stderr)
    assert not (wd / "results").exists()


def test_unknown_dataset_in_a_target_lists_the_known_datasets(tmp_path):
    wd = workdir(tmp_path)
    r = snakemake(wd, "results/sis/foo.tsv", "-n")
    assert r.returncode != 0
    assert "unknown dataset 'foo' (from the requested file's path); known datasets: ['her2st']" in r.stdout + r.stderr


def test_missing_input_file_is_named(tmp_path):
    wd = tmp_path / "wd"
    (wd / "resources/her2st").mkdir(parents=True)
    for f in ("sections.tsv",):
        (wd / "resources/her2st" / f).write_text((REPO / "resources/her2st" / f).read_text())
    (wd / "resources/her2st/clusters").mkdir()
    r = snakemake(wd, "-n", "results/her2st/spots.h5ad")
    assert r.returncode != 0
    assert "resources/her2st/counts/A1.tsv.gz" in r.stdout + r.stderr
