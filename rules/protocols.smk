# The evaluation protocols: fold tables shared by every probe, and the per-outer-fold interfaces of the
# inductive protocol (workflow_scripts/evaluation/folds.py; docs/evaluation.md).


rule folds:
    """Fold assignment of one dataset, protocol and seed, with each task's spots and class set fixed up front."""
    input:
        "results/{dataset}/spots.h5ad",
    output:
        tsv="results/{dataset}/folds/{protocol}/seed{seed}.tsv",
        meta="results/{dataset}/folds/{protocol}/seed{seed}.json",
    log:
        "logs/{dataset}/folds_{protocol}_seed{seed}.log",
    benchmark:
        "results/benchmarks/{dataset}/folds/{protocol}_seed{seed}.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    params:
        tasks=lambda wc: tasks_json(wc.dataset),
        probe=lambda wc: json.dumps({k: config["probe"][k] for k in ("n_folds", "cv")}),
        inductive=json.dumps(config["inductive"]),
        min_class=lambda wc: ds_cfg(wc.dataset)["min_class_size"],
        patch_um=lambda wc: ds_cfg(wc.dataset)["patch_um"],
        n_outer=lambda wc: (f"--n-outer {n_outer(wc.dataset)}" if wc.protocol == "inductive" else ""),
    shell:
        "python -m workflow_scripts.evaluation.folds make --spots {input} --protocol {wildcards.protocol}"
        " --seed {wildcards.seed} --tasks {params.tasks:q} --params {params.probe:q} --inductive {params.inductive:q}"
        " --min-class-size {params.min_class} --patch-um {params.patch_um} {params.n_outer}"
        " --out {output.tsv} --log {log}"


rule interface_folds:
    """The outer folds the inductive interfaces are trained on: the interface rows of the inductive fold table
    alone, so that a task setting (labels, exclusions, min_class_size) does not retrain any interface."""
    input:
        "results/{dataset}/spots.h5ad",
    output:
        tsv="results/{dataset}/folds/inductive/seed{seed}.interface.tsv",
        meta="results/{dataset}/folds/inductive/seed{seed}.interface.json",
    log:
        "logs/{dataset}/interface_folds_seed{seed}.log",
    benchmark:
        "results/benchmarks/{dataset}/interface_folds/seed{seed}.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    params:
        probe=json.dumps({"n_folds": config["probe"]["n_folds"]}),
        inductive=json.dumps(config["inductive"]),
        patch_um=lambda wc: ds_cfg(wc.dataset)["patch_um"],
        n_outer=lambda wc: n_outer(wc.dataset),
    shell:
        "python -m workflow_scripts.evaluation.folds make --interface-only --spots {input} --protocol inductive"
        " --seed {wildcards.seed} --params {params.probe:q} --inductive {params.inductive:q}"
        " --patch-um {params.patch_um} --n-outer {params.n_outer} --out {output.tsv} --log {log}"


rule align_inductive:
    """Train one fusion method on the training donors of every outer fold (inductive protocol), all folds of a
    method and seed in one process; each fold's interface embeds every spot (one folder of outer-fold files).
    """
    input:
        gex=lambda wc: embedding_file(wc.dataset, "gex"),
        img=lambda wc: embedding_file(wc.dataset, "img"),
        folds="results/{dataset}/folds/inductive/seed{seed}.interface.tsv",
        folds_meta="results/{dataset}/folds/inductive/seed{seed}.interface.json",
    output:
        directory("results/{dataset}/aligned_inductive/{method}/seed{seed}"),
    log:
        "logs/{dataset}/align_inductive_{method}_seed{seed}.log",
    benchmark:
        "results/benchmarks/{dataset}/align_inductive/{method}_seed{seed}.tsv"
    group:
        "align"
    conda:
        "../envs/cellsynergy.yaml"
    threads: config["training"]["threads"]
    resources:
        gpu=method_gpu,
        mem_mb=8000,
        runtime=lambda wc: 120 * n_outer(wc.dataset),
        device=config["training"]["device"],  # not a param: the device does not change what is trained
    params:
        train=lambda wc: json.dumps(training_params(wc.method)),
        n_outer=lambda wc: n_outer(wc.dataset),
    shell:
        "python -m workflow_scripts.methods.align --method {wildcards.method} --gex {input.gex} --img {input.img}"
        " --seed {wildcards.seed} --params {params.train:q} --interface-folds {input.folds}"
        " --n-outer {params.n_outer} --out-dir {output} --device {resources.device} --threads {threads} --log {log}"
