# Spatial consistency: are spots close in tissue more alike in an embedding than far pairs?
# (workflow_scripts/evaluation/spatial_consistency.py).


rule spatial_consistency:
    """Close (k-NN) vs far (> percentile) spot pairs within slides: logistic classifier, CV grouped by slide."""
    input:
        emb=lambda wc: embedding_path(wc.dataset, wc.embedding, wc.seed),
        spots="results/{dataset}/spots.h5ad",
    output:
        "results/{dataset}/spatial_consistency/{embedding}/seed{seed}.tsv",
    log:
        "logs/{dataset}/spatial_consistency_{embedding}_seed{seed}.log",
    benchmark:
        "results/benchmarks/{dataset}/spatial_consistency/{embedding}_seed{seed}.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        sc=json.dumps(acfg("spatial_consistency")),
    shell:
        "python -m workflow_scripts.evaluation.spatial_consistency --embedding {input.emb} --spots {input.spots}"
        " --dataset {wildcards.dataset} --name {wildcards.embedding} --seed {wildcards.seed}"
        " --params {params.sc:q} --out {output} --log {log}"


rule collect_spatial_consistency:
    input:
        lambda wc: expand(
            "results/{dataset}/spatial_consistency/{embedding}/seed{seed}.tsv",
            dataset=wc.dataset,
            embedding=embeddings_of(wc.dataset),
            seed=SEEDS,
        ),
    output:
        table="results/tables/{dataset}/spatial_consistency.tsv",
        summary=report(
            "results/tables/{dataset}/spatial_consistency_summary.tsv",
            caption="../report/spatial_consistency_summary.rst",
            category="{dataset}",
            subcategory="Spatial consistency",
        ),
    log:
        "logs/{dataset}/collect_spatial_consistency.log",
    conda:
        "../envs/cellsynergy.yaml"
    shell:
        "python -m workflow_scripts.evaluation.tables collect --inputs {input} --out {output.table} --log {log}"
        " && python -m workflow_scripts.evaluation.tables summarise --input {output.table} --out {output.summary}"
        " --by dataset embedding metric --log {log}.summary"


rule figure_spatial_consistency:
    input:
        "results/tables/{dataset}/spatial_consistency_summary.tsv",
    output:
        report(
            "results/figures/{dataset}/spatial_consistency.png",
            caption="../report/spatial_consistency.rst",
            category="{dataset}",
            subcategory="Spatial consistency",
        ),
    log:
        "logs/{dataset}/figure_spatial_consistency.log",
    conda:
        "../envs/cellsynergy.yaml"
    shell:
        "python -m workflow_scripts.figures.analysis spatial_consistency --input {input} --out {output} --log {log}"
