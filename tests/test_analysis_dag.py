"""Dry-run DAG tests of the analyses (rules/spectral.smk, spatial_consistency.smk, training_curves.smk, umap.smk,
scaling.smk): spectra, spatial consistency, training curves, UMAPs, data scaling. They run the real Snakefile, which
calls analysis_targets() from final_targets()."""

import yaml

from workflow_utils import REPO, job_counts, snakemake, workdir

SMALL = REPO / "tests/data/config_small.yaml"


def dry(tmp_path, *targets, configs=(SMALL,)):
    wd = workdir(tmp_path)
    args = [*targets, "-n", "--quiet", "rules"]
    if configs:
        args += ["--configfile", *map(str, configs)]  # last: it takes several values
    r = snakemake(wd, *args)
    return r, job_counts(r.stdout)


def extra_config(tmp_path, name, cfg):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_all_contains_every_analysis(tmp_path):
    r, c = dry(tmp_path, "all", configs=())
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = yaml.safe_load(open(REPO / "config/config.yaml"))
    n_seeds = len(cfg["seeds"])
    n_emb = len(cfg["methods"]) + len(cfg["baselines"])
    n_views = len([m for m in cfg["methods"] if m != "concat"])
    assert c["spectral_unimodal"] == 1
    assert c["spectral_views"] == n_views * n_seeds
    assert c["spatial_consistency"] == n_emb * n_seeds
    assert c["umap_coords"] == 1  # every embedding of the dataset in one job: numba compiles umap-learn once
    assert c["figure_umap"] == 2  # coloured by label and by slide
    for rule in ("collect_spectral", "figure_spectral", "collect_spatial_consistency", "figure_spatial_consistency",
                 "figure_training_curves"):
        assert c[rule] == 1, rule
    assert not any(k.startswith("scaling") or k.startswith("posttrain") for k in c)  # switch off by default


def test_offline_scaling_switch(tmp_path):
    on = extra_config(tmp_path, "on.yaml", {"scaling": {"enabled": True, "fractions": [0.1, 1.0], "seeds": [0, 1]}})
    r, c = dry(tmp_path, "analysis", configs=(SMALL, on))
    assert r.returncode == 0, r.stdout + r.stderr
    assert c["scaling_offline"] == 4 and c["collect_scaling"] == 1 and c["figure_scaling"] == 1
    assert c["spectral_views"] == 9 and c["spatial_consistency"] == 13  # small config: 1 seed
    assert "posttrain_nicheformer" not in c


def test_posttrain_scaling_for_a_nicheformer_dataset(tmp_path):
    nf = extra_config(tmp_path, "nf.yaml", {
        "datasets": {"her2st": {"encoders": {"gex": "nicheformer", "img": "morphology"}}},
        "scaling": {"enabled": True, "fractions": [0.01, 1.0], "seeds": [0]},
    })
    r, c = dry(tmp_path, "results/figures/her2st/scaling.png", configs=(SMALL, nf))
    assert r.returncode == 0, r.stdout + r.stderr
    assert c["posttrain_nicheformer"] == 6  # 3 configurations x 2 fractions x 1 seed
    assert c["embed_posttrained"] == 6 and c["scaling_posttrained_eval"] == 6
    assert c["scaling_pretrained_eval"] == 1 and "scaling_offline" not in c


def test_scaling_mode_mismatch_fails_naming_the_key(tmp_path):
    bad = extra_config(tmp_path, "bad.yaml", {"scaling": {"enabled": True, "mode": "posttrain"}})
    r, _ = dry(tmp_path, "all", configs=(SMALL, bad))
    assert r.returncode != 0
    assert "scaling.mode" in r.stdout + r.stderr


def test_analysis_figures_rebuild_from_tables_only(tmp_path):
    wd = workdir(tmp_path)
    for rel in ("results/tables/her2st/spectral.tsv", "results/tables/her2st/spatial_consistency_summary.tsv"):
        p = wd / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x\n")
    r = snakemake(wd, "results/figures/her2st/spectral.png", "results/figures/her2st/spatial_consistency.png",
                  "-n", "--quiet", "rules")
    assert r.returncode == 0, r.stderr
    assert set(job_counts(r.stdout)) == {"figure_spectral", "figure_spatial_consistency"}
