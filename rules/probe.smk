rule probe:
    """Linear probes on the shared folds: macro-F1 (logistic regression, C tuned by inner CV) and R² (ridge) per
    task; a fused method's job also probes its dimension-matched controls (control_<kind>@<method>)."""
    input:
        unpack(control_inputs),
        emb=probe_inputs,
        spots="results/{dataset}/spots.h5ad",
        folds="results/{dataset}/folds/{protocol}/seed{seed}.tsv",
        folds_meta="results/{dataset}/folds/{protocol}/seed{seed}.json",
    output:
        "results/{dataset}/probes/{protocol}/{embedding}/seed{seed}.tsv",
    log:
        "logs/{dataset}/probe_{protocol}_{embedding}_seed{seed}.log",
    benchmark:
        "results/benchmarks/{dataset}/probe/{protocol}_{embedding}_seed{seed}.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        tasks=lambda wc: tasks_json(wc.dataset),
        probe=probe_params(),
        controls=control_args,
        emb=probe_embeddings,
    shell:
        "python -m workflow_scripts.evaluation.probes --embedding {params.emb} --spots {input.spots}"
        " --dataset {wildcards.dataset} --name {wildcards.embedding} --seed {wildcards.seed}"
        " --tasks {params.tasks:q} --params {params.probe:q} --folds {input.folds} {params.controls}"
        " --out {output} --log {log}"


rule spatial_probe:
    """Predict the majority label of neighbours in distance rings (µm) from the centre spot's embedding."""
    input:
        emb=lambda wc: embedding_path(wc.dataset, wc.embedding, wc.seed),
        spots="results/{dataset}/spots.h5ad",
    output:
        "results/{dataset}/spatial/{embedding}/seed{seed}.tsv",
    log:
        "logs/{dataset}/spatial_{embedding}_seed{seed}.log",
    benchmark:
        "results/benchmarks/{dataset}/spatial_probe/{embedding}_seed{seed}.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        tasks=lambda wc: json.dumps(
            {t: ds_cfg(wc.dataset)["tasks"][t] for t in spatial_cfg(wc.dataset).get("tasks", [])}
        ),
        edges=lambda wc: json.dumps(spatial_cfg(wc.dataset)["ring_edges_um"]),
        probe=json.dumps(config["probe"]),
        spatial=json.dumps(config["spatial_probe"]),
        min_class=lambda wc: ds_cfg(wc.dataset)["min_class_size"],
    shell:
        "python -m workflow_scripts.evaluation.spatial_probe --embedding {input.emb} --spots {input.spots}"
        " --dataset {wildcards.dataset} --name {wildcards.embedding} --seed {wildcards.seed}"
        " --tasks {params.tasks:q} --ring-edges-um {params.edges:q} --params {params.probe:q}"
        " --spatial-params {params.spatial:q} --min-class-size {params.min_class} --out {output} --log {log}"


rule collect_probes:
    """All probe folds of every protocol, embedding and seed in one long table, plus its summary (mean, sd and the
    bootstrap interval of the mean)."""
    input:
        probe_tables,
    output:
        table="results/tables/{dataset}/probes.tsv",
        summary=report(
            "results/tables/{dataset}/probes_summary.tsv",
            caption="../report/probes_summary.rst",
            category="{dataset}",
            subcategory="Tables",
        ),
    log:
        "logs/{dataset}/collect_probes.log",
    conda:
        "../envs/cellsynergy.yaml"
    params:
        bootstrap=json.dumps(config["bootstrap"]),
    shell:
        "python -m workflow_scripts.evaluation.tables collect --inputs {input} --out {output.table} --log {log}"
        " && python -m workflow_scripts.evaluation.tables summarise --input {output.table} --out {output.summary}"
        " --bootstrap {params.bootstrap:q} --log {log}.summary"


rule collect_spatial:
    """All spatial-ring probe results in one long table, plus its mean/sd summary per ring."""
    input:
        spatial_tables,
    output:
        table="results/tables/{dataset}/spatial.tsv",
        summary=report(
            "results/tables/{dataset}/spatial_summary.tsv",
            caption="../report/spatial_summary.rst",
            category="{dataset}",
            subcategory="Tables",
        ),
    log:
        "logs/{dataset}/collect_spatial.log",
    conda:
        "../envs/cellsynergy.yaml"
    shell:
        "python -m workflow_scripts.evaluation.tables collect --inputs {input} --out {output.table} --log {log}"
        " && python -m workflow_scripts.evaluation.tables summarise --input {output.table} --out {output.summary} --log {log}.summary"
