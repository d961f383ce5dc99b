# Partial information decomposition of every task with respect to the unimodal embeddings, and I(Y; fused) of every
# fused embedding (workflow_scripts/evaluation/pid.py); the planted PID and the validation table of synthetic
# datasets (workflow_scripts/data/synthetic.py, workflow_scripts/evaluation/validation.py).


rule pid:
    """BROJA PID (bits) of each task on k-means clusters of GEX and IMG, and I(Y; fused) per fused embedding."""
    input:
        gex=lambda wc: embedding_file(wc.dataset, "gex"),
        img=lambda wc: embedding_file(wc.dataset, "img"),
        spots="results/{dataset}/spots.h5ad",
        fused=lambda wc: [p for _, _, p in pid_fused(wc.dataset)],
    output:
        report(
            "results/pid/{dataset}.tsv",
            caption="../report/pid_table.rst",
            category="{dataset}",
            subcategory="Tables",
        ),
    log:
        "logs/{dataset}/pid.log",
    benchmark:
        "results/benchmarks/{dataset}/pid.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        tasks=lambda wc: tasks_json(wc.dataset),
        pid=json.dumps(pid_params()),
        names=lambda wc: json.dumps([[e, s] for e, s, _ in pid_fused(wc.dataset)]),
        min_class=lambda wc: ds_cfg(wc.dataset)["min_class_size"],
    shell:
        "python -m workflow_scripts.evaluation.pid estimate --gex {input.gex} --img {input.img} --spots {input.spots}"
        " --dataset {wildcards.dataset} --tasks {params.tasks:q} --params {params.pid:q}"
        " --fused {input.fused} --fused-names {params.names:q} --min-class-size {params.min_class}"
        " --out {output} --log {log}"


rule pid_truth:
    """Planted PID of a synthetic dataset's tasks, exact on the latent factors each modality sees."""
    output:
        "results/{dataset}/pid_truth.tsv",
    log:
        "logs/{dataset}/pid_truth.log",
    benchmark:
        "results/benchmarks/{dataset}/pid_truth.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    params:
        truth=pid_truth_params,
    shell:
        "python -m workflow_scripts.evaluation.pid truth --dataset {wildcards.dataset} --params {params.truth:q}"
        " --out {output} --log {log}"


rule figure_pid:
    input:
        pid="results/pid/{dataset}.tsv",
        truth=lambda wc: f"results/{wc.dataset}/pid_truth.tsv" if is_synthetic(wc.dataset) else [],
    output:
        report(
            "results/figures/{dataset}/pid.png",
            caption="../report/pid.rst",
            category="{dataset}",
            subcategory="Figures",
        ),
    log:
        "logs/{dataset}/figure_pid.log",
    conda:
        "../envs/cellsynergy.yaml"
    params:
        truth=lambda wc, input: f"--truth {input.truth}" if input.truth else "",
    shell:
        "python -m workflow_scripts.figures.pid --pid {input.pid} {params.truth} --out {output} --log {log}"


rule validation:
    """Planted vs estimated PID terms, and score, gain and SIS per scenario, each with its expectation."""
    input:
        truth="results/{dataset}/pid_truth.tsv",
        pid="results/pid/{dataset}.tsv",
        probes="results/tables/{dataset}/probes.tsv",
        spots="results/{dataset}/spots.h5ad",
    output:
        report(
            "results/tables/{dataset}/validation.tsv",
            caption="../report/validation.rst",
            category="{dataset}",
            subcategory="Tables",
        ),
    log:
        "logs/{dataset}/validation.log",
    benchmark:
        "results/benchmarks/{dataset}/validation.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    params:
        tasks=lambda wc: tasks_json(wc.dataset),
        probe=json.dumps(config["probe"]),
        min_class=lambda wc: ds_cfg(wc.dataset)["min_class_size"],
    shell:
        "python -m workflow_scripts.evaluation.validation --truth {input.truth} --pid {input.pid}"
        " --probes {input.probes} --spots {input.spots} --tasks {params.tasks:q} --probe-params {params.probe:q}"
        " --min-class-size {params.min_class} --out {output} --log {log}"
