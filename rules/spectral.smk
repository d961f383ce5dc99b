# Spectral analysis: the canonical correlations (singular values of the whitened cross-covariance) between the
# unimodal embeddings and between each method's two projected views, against a permutation null
# (workflow_scripts/analysis/spectral.py). The null permutes spots within slides (config spectral.null), so the
# slide of each spot comes from the spot table.


rule spectral_unimodal:
    """Whitened cross-covariance spectrum between the unimodal GEX and IMG embeddings, with a permutation null."""
    input:
        gex=lambda wc: embedding_file(wc.dataset, "gex"),
        img=lambda wc: embedding_file(wc.dataset, "img"),
        spots="results/{dataset}/spots.h5ad",
    output:
        "results/{dataset}/spectral/unimodal.tsv",
    log:
        "logs/{dataset}/spectral_unimodal.log",
    benchmark:
        "results/benchmarks/{dataset}/spectral_unimodal.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        spectral=spectral_params(),
        seed=SEEDS[0],
    shell:
        "python -m workflow_scripts.analysis.spectral unimodal --gex {input.gex} --img {input.img} --spots {input.spots}"
        " --dataset {wildcards.dataset} --seed {params.seed} --params {params.spectral:q} --out {output} --log {log}"


rule spectral_views:
    """Spectrum between a method's two projected views (what its objective aligns). With the inductive protocol
    enabled: on held-out spots only, each spot's views from the interface of the outer fold that held it out;
    else on every spot (the study's transductive analysis)."""
    input:
        views=spectral_views_inputs,
        spots="results/{dataset}/spots.h5ad",
    output:
        "results/{dataset}/spectral/{method}/seed{seed}.tsv",
    log:
        "logs/{dataset}/spectral_{method}_seed{seed}.log",
    benchmark:
        "results/benchmarks/{dataset}/spectral_views/{method}_seed{seed}.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        spectral=spectral_params(),
        rows=lambda wc: "held_out" if spectral_views_inductive(wc) else "all",
        views=spectral_views_files,
    shell:
        "python -m workflow_scripts.analysis.spectral views --views {params.views} --rows {params.rows}"
        " --spots {input.spots} --method {wildcards.method} --dataset {wildcards.dataset} --seed {wildcards.seed}"
        " --params {params.spectral:q} --out {output} --log {log}"


rule collect_spectral:
    input:
        unimodal="results/{dataset}/spectral/unimodal.tsv",
        views=lambda wc: expand(
            "results/{dataset}/spectral/{method}/seed{seed}.tsv",
            dataset=wc.dataset,
            method=VIEW_METHODS,
            seed=SEEDS,
        ),
    output:
        table="results/tables/{dataset}/spectral.tsv",
        summary=report(
            "results/tables/{dataset}/spectral_summary.tsv",
            caption="../report/spectral_summary.rst",
            category="{dataset}",
            subcategory="Spectral analysis",
        ),
    log:
        "logs/{dataset}/collect_spectral.log",
    conda:
        "../envs/cellsynergy.yaml"
    shell:
        "python -m workflow_scripts.analysis.spectral collect --inputs {input.unimodal} {input.views} --out {output.table}"
        " --summary {output.summary} --log {log}"


rule figure_spectral:
    input:
        "results/tables/{dataset}/spectral.tsv",
    output:
        report(
            "results/figures/{dataset}/spectral.png",
            caption="../report/spectral.rst",
            category="{dataset}",
            subcategory="Spectral analysis",
        ),
    log:
        "logs/{dataset}/figure_spectral.log",
    conda:
        "../envs/cellsynergy.yaml"
    params:
        max_rank=acfg("spectral")["plot_max_rank"],
    shell:
        "python -m workflow_scripts.figures.analysis spectral --inputs {input} --max-rank {params.max_rank}"
        " --out {output} --log {log}"
