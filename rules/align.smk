rule align:
    """Train one fusion method on the paired GEX/IMG embeddings and write the fused embedding Z3."""
    input:
        gex=lambda wc: embedding_file(wc.dataset, "gex"),
        img=lambda wc: embedding_file(wc.dataset, "img"),
    output:
        z3="results/{dataset}/aligned/{method}/seed{seed}.parquet",
        model="results/{dataset}/aligned/{method}/seed{seed}.pt",
        history="results/{dataset}/aligned/{method}/seed{seed}.history.tsv",
        views="results/{dataset}/aligned/{method}/seed{seed}.views.npz",
    log:
        "logs/{dataset}/align_{method}_seed{seed}.log",
    benchmark:
        "results/benchmarks/{dataset}/align/{method}_seed{seed}.tsv"
    group:
        "align"
    conda:
        "../envs/cellsynergy.yaml"
    threads: config["training"]["threads"]
    resources:
        gpu=method_gpu,
        mem_mb=8000,
        runtime=120,
        device=config["training"]["device"],  # not a param: the device does not change what is trained
    params:
        train=lambda wc: json.dumps(training_params(wc.method)),
    shell:
        "python -m workflow_scripts.methods.align --method {wildcards.method} --gex {input.gex} --img {input.img}"
        " --seed {wildcards.seed} --params {params.train:q} --out {output.z3} --model {output.model}"
        " --history {output.history} --views {output.views} --device {resources.device} --threads {threads}"
        " --log {log}"


rule random_baseline:
    """Random N(0, 1) embedding with the dimension of [IMG ‖ GEX] (the reference's `random` baseline)."""
    input:
        gex=lambda wc: embedding_file(wc.dataset, "gex"),
        img=lambda wc: embedding_file(wc.dataset, "img"),
    output:
        z3="results/{dataset}/aligned/random/seed{seed}.parquet",
        model="results/{dataset}/aligned/random/seed{seed}.pt",
        history="results/{dataset}/aligned/random/seed{seed}.history.tsv",
    log:
        "logs/{dataset}/align_random_seed{seed}.log",
    benchmark:
        "results/benchmarks/{dataset}/random_baseline/seed{seed}.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    shell:
        "python -m workflow_scripts.methods.align --method random --gex {input.gex} --img {input.img}"
        " --seed {wildcards.seed} --params '{{}}' --out {output.z3} --model {output.model}"
        " --history {output.history} --device cpu --threads 1 --no-progress --log {log}"


rule import_fused:
    """Check a fused embedding given as a file (config datasets.<d>.fused) and store it as an embedding table."""
    input:
        src=lambda wc: fused_source(wc.dataset, wc.fused, wc.seed),
        spots="results/{dataset}/spots.h5ad",
    output:
        "results/{dataset}/imported/{fused}/seed{seed}.parquet",
    log:
        "logs/{dataset}/import_{fused}_seed{seed}.log",
    benchmark:
        "results/benchmarks/{dataset}/import_fused/{fused}_seed{seed}.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    params:
        key=lambda wc: fused_files(wc.dataset)[wc.fused].get("key") or "X",
    shell:
        "python -m workflow_scripts.methods.imported --input {input.src} --key {params.key} --spots {input.spots}"
        " --name {wildcards.fused} --out {output} --log {log}"
