# cellsynergy-workflow: paired H&E + expression -> frozen unimodal embeddings -> ten fusion methods
# -> linear and spatial probes -> SIS tables and figures. See README.md.
import os


# the default config lives next to this Snakefile; --configfile FILE merges a user config on top
configfile: os.path.join(workflow.basedir, "config/config.yaml")


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/weights.smk"
include: "rules/prepare.smk"
include: "rules/embed.smk"
include: "rules/align.smk"
include: "rules/protocols.smk"
include: "rules/probe.smk"
include: "rules/sis.smk"
include: "rules/figures.smk"
include: "rules/analysis_common.smk"
include: "rules/spectral.smk"
include: "rules/spatial_consistency.smk"
include: "rules/training_curves.smk"
include: "rules/umap.smk"
include: "rules/scaling.smk"
include: "rules/pid_common.smk"
include: "rules/pid.smk"
include: "rules/benchmarks.smk"


localrules:
    all,
    collect_probes,
    collect_spatial,
    sis,
    figure_probe_scores,
    figure_sis_heatmap,
    figure_protocols,
    figure_spatial_rings,
    folds,


rule all:
    input:
        final_targets(),
        "results/figures/benchmarks.png",


rule figures:
    """Rebuild only the figures (and the tables they read) from cached results."""
    input:
        [f for f in final_targets() if "/figures/" in f],


rule analysis:
    """Only the analyses beyond the probes (spectra, spatial consistency, scaling, training curves, UMAPs)."""
    input:
        [t for d in DATASETS for t in analysis_targets(d)],
