# Data scaling over fractions of the spots (workflow_scripts/analysis/scaling.py): offline encoders, or continued
# Nicheformer masked-language-model training (workflow_scripts/analysis/nicheformer_mlm.py).


rule scaling_offline:
    """Mode offline: a seeded fraction of spots fits the PCA GEX encoder and trains CoMM; probes on all spots."""
    input:
        spots="results/{dataset}/spots.h5ad",
        img=lambda wc: embedding_file(wc.dataset, "img"),
        gex=lambda wc: (
            [] if "gex_encoder" in SCALING["offline"]["subsample"] else embedding_file(wc.dataset, "gex")
        ),
    output:
        "results/{dataset}/scaling/offline/frac{fraction}/seed{seed}.tsv",
    log:
        "logs/{dataset}/scaling_offline_frac{fraction}_seed{seed}.log",
    benchmark:
        "results/benchmarks/{dataset}/scaling_offline/frac{fraction}_seed{seed}.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    threads: config["training"]["threads"]
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
        device=config["training"]["device"],
    params:
        offline=lambda wc: json.dumps(
            {
                **SCALING["offline"],
                "pca": encoder_params("pca", wc.dataset) if encoder_of(wc.dataset, "gex") == "pca" else {},
            }
        ),
        gex=lambda wc: (
            ""
            if "gex_encoder" in SCALING["offline"]["subsample"]
            else f"--gex {embedding_file(wc.dataset, 'gex')}"
        ),
        tasks=lambda wc: tasks_json(wc.dataset),
        probe=json.dumps(config["probe"]),
        comm=json.dumps(training_params("comm")),
        min_class=lambda wc: ds_cfg(wc.dataset)["min_class_size"],
    shell:
        "python -m workflow_scripts.analysis.scaling offline --spots {input.spots} --img {input.img} {params.gex}"
        " --dataset {wildcards.dataset} --fraction {wildcards.fraction} --seed {wildcards.seed}"
        " --params {params.offline:q}"
        " --tasks {params.tasks:q} --probe-params {params.probe:q} --comm-params {params.comm:q}"
        " --min-class-size {params.min_class} --device {resources.device} --threads {threads}"
        " --out {output} --log {log}"


rule posttrain_nicheformer:
    """Mode posttrain: continue Nicheformer's masked-language-model training on a fraction of the training cells."""
    input:
        cells=lambda wc: SCALING["posttrain"]["train_cells"].format(dataset=wc.dataset),
    output:
        ckpt="results/{dataset}/scaling/posttrain/{ptcfg}/frac{fraction}/seed{seed}.ckpt",
        history="results/{dataset}/scaling/posttrain/{ptcfg}/frac{fraction}/seed{seed}.history.tsv",
    log:
        "logs/{dataset}/posttrain_{ptcfg}_frac{fraction}_seed{seed}.log",
    benchmark:
        "results/benchmarks/{dataset}/posttrain_nicheformer/{ptcfg}_frac{fraction}_seed{seed}.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=64000,
        runtime=1440,
        device=SCALING["posttrain"]["device"],
    params:
        enc=lambda wc: json.dumps(encoder_params("nicheformer", wc.dataset)),
        train=posttrain_params,
    shell:
        "python -m workflow_scripts.analysis.nicheformer_mlm --cells {input.cells} --encoder-params {params.enc:q}"
        " --config {wildcards.ptcfg} --params {params.train:q} --fraction {wildcards.fraction} --seed {wildcards.seed}"
        " --device {resources.device} --threads {threads} --out {output.ckpt} --history {output.history} --log {log}"


rule embed_posttrained:
    """Re-embed the evaluation spots with a post-trained Nicheformer checkpoint."""
    input:
        ckpt="results/{dataset}/scaling/posttrain/{ptcfg}/frac{fraction}/seed{seed}.ckpt",
        spots="results/{dataset}/spots.h5ad",
        cells="results/{dataset}/cells.h5ad",
    output:
        "results/{dataset}/scaling/posttrain/{ptcfg}/frac{fraction}/seed{seed}.gex.parquet",
    log:
        "logs/{dataset}/embed_posttrained_{ptcfg}_frac{fraction}_seed{seed}.log",
    benchmark:
        "results/benchmarks/{dataset}/embed_posttrained/{ptcfg}_frac{fraction}_seed{seed}.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=240,
        device=config["embed"]["device"],
        batch_size=config["embed"]["batch_size"],
        num_workers=config["embed"]["num_workers"],
    params:
        enc=lambda wc: json.dumps(
            {k: v for k, v in encoder_params("nicheformer", wc.dataset).items() if k != "weights"}
        ),
        patch_um=lambda wc: ds_cfg(wc.dataset)["patch_um"],
    shell:
        "python -m workflow_scripts.encoders.embed --encoder nicheformer --modality gex --dataset {input.spots}"
        " --cells {input.cells} --out {output} --params {params.enc:q} --weights {input.ckpt}"
        " --device {resources.device} --batch-size {resources.batch_size} --num-workers {resources.num_workers}"
        " --patch-um {params.patch_um} --seed {wildcards.seed} --threads {threads} --log {log}"


rule scaling_posttrained_eval:
    """CoMM on all evaluation spots + probes of GEX / concat / CoMM for a post-trained GEX embedding."""
    input:
        gex="results/{dataset}/scaling/posttrain/{ptcfg}/frac{fraction}/seed{seed}.gex.parquet",
        history="results/{dataset}/scaling/posttrain/{ptcfg}/frac{fraction}/seed{seed}.history.tsv",
        img=lambda wc: embedding_file(wc.dataset, "img"),
        spots="results/{dataset}/spots.h5ad",
    output:
        "results/{dataset}/scaling/posttrain/{ptcfg}/frac{fraction}/seed{seed}.tsv",
    log:
        "logs/{dataset}/scaling_posttrain_{ptcfg}_frac{fraction}_seed{seed}.log",
    benchmark:
        "results/benchmarks/{dataset}/scaling_posttrained_eval/{ptcfg}_frac{fraction}_seed{seed}.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    threads: config["training"]["threads"]
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
        device=config["training"]["device"],
    params:
        tasks=lambda wc: tasks_json(wc.dataset),
        probe=json.dumps(config["probe"]),
        comm=json.dumps(training_params("comm")),
        min_class=lambda wc: ds_cfg(wc.dataset)["min_class_size"],
    shell:
        "python -m workflow_scripts.analysis.scaling evaluate --spots {input.spots} --gex {input.gex} --img {input.img}"
        " --dataset {wildcards.dataset} --config {wildcards.ptcfg} --fraction {wildcards.fraction}"
        " --seed {wildcards.seed} --history {input.history}"
        " --tasks {params.tasks:q} --probe-params {params.probe:q} --comm-params {params.comm:q}"
        " --min-class-size {params.min_class} --device {resources.device} --threads {threads}"
        " --out {output} --log {log}"


rule scaling_pretrained_eval:
    """Fraction 0: the pretrained GEX encoder (the dataset's own GEX embedding), same CoMM + probes."""
    input:
        gex=lambda wc: embedding_file(wc.dataset, "gex"),
        img=lambda wc: embedding_file(wc.dataset, "img"),
        spots="results/{dataset}/spots.h5ad",
    output:
        "results/{dataset}/scaling/posttrain/pretrained/seed{seed}.tsv",
    log:
        "logs/{dataset}/scaling_pretrained_seed{seed}.log",
    benchmark:
        "results/benchmarks/{dataset}/scaling_pretrained_eval/seed{seed}.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    threads: config["training"]["threads"]
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
        device=config["training"]["device"],
    params:
        tasks=lambda wc: tasks_json(wc.dataset),
        probe=json.dumps(config["probe"]),
        comm=json.dumps(training_params("comm")),
        min_class=lambda wc: ds_cfg(wc.dataset)["min_class_size"],
    shell:
        "python -m workflow_scripts.analysis.scaling evaluate --spots {input.spots} --gex {input.gex} --img {input.img}"
        " --dataset {wildcards.dataset} --config pretrained --fraction 0 --seed {wildcards.seed} --n-fit 0"
        " --tasks {params.tasks:q} --probe-params {params.probe:q} --comm-params {params.comm:q}"
        " --min-class-size {params.min_class} --device {resources.device} --threads {threads}"
        " --out {output} --log {log}"


rule collect_scaling:
    input:
        scaling_tables,
    output:
        table="results/tables/{dataset}/scaling.tsv",
        summary=report(
            "results/tables/{dataset}/scaling_summary.tsv",
            caption="../report/scaling_summary.rst",
            category="{dataset}",
            subcategory="Data scaling",
        ),
    log:
        "logs/{dataset}/collect_scaling.log",
    conda:
        "../envs/cellsynergy.yaml"
    shell:
        "python -m workflow_scripts.evaluation.tables collect --inputs {input} --out {output.table} --log {log}"
        " && python -m workflow_scripts.evaluation.tables summarise --input {output.table} --out {output.summary}"
        " --by dataset mode config embedding task metric fraction --log {log}.summary"


rule figure_scaling:
    input:
        "results/tables/{dataset}/scaling.tsv",
    output:
        report(
            "results/figures/{dataset}/scaling.png",
            caption="../report/scaling.rst",
            category="{dataset}",
            subcategory="Data scaling",
        ),
    log:
        "logs/{dataset}/figure_scaling.log",
    conda:
        "../envs/cellsynergy.yaml"
    shell:
        "python -m workflow_scripts.figures.analysis scaling --inputs {input} --out {output} --log {log}"
