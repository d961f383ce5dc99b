# Analyses beyond the probes (issue 6): spectral analysis of the cross-covariance, spatial consistency,
# data scaling (offline encoders or Nicheformer MLM post-training), training curves and UMAPs.
# Every output reachable from `all` through analysis_targets(dataset) (called by final_targets()).
# Config sections (all optional; defaults in rules/analysis_common.smk): spectral, spatial_consistency, umap, scaling.


rule analysis:
    """Only the analyses of issue 6 (spectra, spatial consistency, scaling, training curves, UMAPs)."""
    input:
        [t for d in DATASETS for t in analysis_targets(d)],


# ----------------------------------------------------------------------------------------------- spectral


rule spectral_unimodal:
    """Whitened cross-covariance spectrum between the unimodal GEX and IMG embeddings, with a permutation null."""
    input:
        gex=lambda wc: embedding_file(wc.dataset, "gex"),
        img=lambda wc: embedding_file(wc.dataset, "img"),
    output:
        "results/{dataset}/spectral/unimodal.tsv",
    log:
        "logs/{dataset}/spectral_unimodal.log",
    conda:
        "../envs/cellsynergy.yaml"
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        spectral=spectral_params(),
        seed=SEEDS[0],
    shell:
        "python -m workflow_scripts.spectral unimodal --gex {input.gex} --img {input.img} --dataset {wildcards.dataset}"
        " --seed {params.seed} --params {params.spectral:q} --out {output} --log {log}"


rule spectral_views:
    """Spectrum between a method's two projected views (what its objective aligns)."""
    input:
        "results/{dataset}/aligned/{method}/seed{seed}.views.npz",
    output:
        "results/{dataset}/spectral/{method}/seed{seed}.tsv",
    log:
        "logs/{dataset}/spectral_{method}_seed{seed}.log",
    conda:
        "../envs/cellsynergy.yaml"
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        spectral=spectral_params(),
    shell:
        "python -m workflow_scripts.spectral views --views {input} --method {wildcards.method}"
        " --dataset {wildcards.dataset} --seed {wildcards.seed} --params {params.spectral:q} --out {output} --log {log}"


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
        "python -m workflow_scripts.spectral collect --inputs {input.unimodal} {input.views} --out {output.table}"
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
        "python -m workflow_scripts.figures_analysis spectral --inputs {input} --max-rank {params.max_rank}"
        " --out {output} --log {log}"


# ----------------------------------------------------------------------------------------------- spatial consistency


rule spatial_consistency:
    """Close (k-NN) vs far (> percentile) spot pairs within slides: logistic classifier, CV grouped by slide."""
    input:
        emb=lambda wc: embedding_path(wc.dataset, wc.embedding, wc.seed),
        spots="results/{dataset}/spots.h5ad",
    output:
        "results/{dataset}/spatial_consistency/{embedding}/seed{seed}.tsv",
    log:
        "logs/{dataset}/spatial_consistency_{embedding}_seed{seed}.log",
    conda:
        "../envs/cellsynergy.yaml"
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        sc=json.dumps(acfg("spatial_consistency")),
    shell:
        "python -m workflow_scripts.spatial_consistency --embedding {input.emb} --spots {input.spots}"
        " --dataset {wildcards.dataset} --name {wildcards.embedding} --seed {wildcards.seed}"
        " --params {params.sc:q} --out {output} --log {log}"


rule collect_spatial_consistency:
    input:
        lambda wc: expand(
            "results/{dataset}/spatial_consistency/{embedding}/seed{seed}.tsv",
            dataset=wc.dataset,
            embedding=EMBEDDINGS,
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
        "python -m workflow_scripts.tables collect --inputs {input} --out {output.table} --log {log}"
        " && python -m workflow_scripts.tables summarise --input {output.table} --out {output.summary}"
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
        "python -m workflow_scripts.figures_analysis spatial_consistency --input {input} --out {output} --log {log}"


# ----------------------------------------------------------------------------------------------- training curves


rule figure_training_curves:
    input:
        lambda wc: expand(
            "results/{dataset}/aligned/{method}/seed{seed}.history.tsv",
            dataset=wc.dataset,
            method=METHODS,
            seed=SEEDS,
        ),
    output:
        report(
            "results/figures/{dataset}/training_curves.png",
            caption="../report/training_curves.rst",
            category="{dataset}",
            subcategory="Training",
        ),
    log:
        "logs/{dataset}/figure_training_curves.log",
    conda:
        "../envs/cellsynergy.yaml"
    shell:
        "python -m workflow_scripts.figures_analysis training_curves --histories {input} --out {output} --log {log}"


# ----------------------------------------------------------------------------------------------- UMAP


rule umap_coords:
    """2-D UMAP of one embedding (seed config umap.seed, default the first seed) with a fixed random_state."""
    input:
        lambda wc: embedding_path(wc.dataset, wc.embedding, umap_seed()),
    output:
        "results/{dataset}/umap/{embedding}.tsv",
    log:
        "logs/{dataset}/umap_{embedding}.log",
    conda:
        "../envs/cellsynergy.yaml"
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        umap=json.dumps({k: v for k, v in acfg("umap").items() if k not in ("label", "seed")}),
    shell:
        "python -m workflow_scripts.figures_analysis umap_coords --embedding {input} --params {params.umap:q}"
        " --out {output} --log {log}"


rule figure_umap:
    input:
        coords=lambda wc: expand(
            "results/{dataset}/umap/{embedding}.tsv", dataset=wc.dataset, embedding=EMBEDDINGS
        ),
        spots="results/{dataset}/spots.h5ad",
    output:
        report(
            "results/figures/{dataset}/umap_{colouring}.png",
            caption="../report/umap.rst",
            category="{dataset}",
            subcategory="UMAP",
        ),
    log:
        "logs/{dataset}/figure_umap_{colouring}.log",
    conda:
        "../envs/cellsynergy.yaml"
    params:
        column=lambda wc: "slide" if wc.colouring == "slide" else umap_label(wc.dataset),
    shell:
        "python -m workflow_scripts.figures_analysis umap --coords {input.coords} --spots {input.spots}"
        " --colour {params.column} --dataset {wildcards.dataset} --out {output} --log {log}"


# ----------------------------------------------------------------------------------------------- data scaling


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
    conda:
        "../envs/cellsynergy.yaml"
    threads: config["training"]["threads"]
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
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
        device=config["training"]["device"],
    shell:
        "python -m workflow_scripts.scaling offline --spots {input.spots} --img {input.img} {params.gex}"
        " --dataset {wildcards.dataset} --fraction {wildcards.fraction} --seed {wildcards.seed}"
        " --params {params.offline:q}"
        " --tasks {params.tasks:q} --probe-params {params.probe:q} --comm-params {params.comm:q}"
        " --min-class-size {params.min_class} --device {params.device} --threads {threads}"
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
    conda:
        "../envs/cellsynergy.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=64000,
        runtime=1440,
    params:
        enc=lambda wc: json.dumps(encoder_params("nicheformer", wc.dataset)),
        train=posttrain_params,
        device=SCALING["posttrain"]["device"],
    shell:
        "python -m workflow_scripts.nicheformer_mlm --cells {input.cells} --encoder-params {params.enc:q}"
        " --config {wildcards.ptcfg} --params {params.train:q} --fraction {wildcards.fraction} --seed {wildcards.seed}"
        " --device {params.device} --threads {threads} --out {output.ckpt} --history {output.history} --log {log}"


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
    conda:
        "../envs/cellsynergy.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=240,
    params:
        enc=lambda wc: json.dumps(
            {k: v for k, v in encoder_params("nicheformer", wc.dataset).items() if k != "weights"}
        ),
        patch_um=lambda wc: ds_cfg(wc.dataset)["patch_um"],
        device=config["embed"]["device"],
        batch_size=config["embed"]["batch_size"],
        workers=config["embed"]["num_workers"],
    shell:
        "python -m workflow_scripts.embed --encoder nicheformer --modality gex --dataset {input.spots}"
        " --cells {input.cells} --out {output} --params {params.enc:q} --weights {input.ckpt}"
        " --device {params.device} --batch-size {params.batch_size} --num-workers {params.workers}"
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
    conda:
        "../envs/cellsynergy.yaml"
    threads: config["training"]["threads"]
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    params:
        tasks=lambda wc: tasks_json(wc.dataset),
        probe=json.dumps(config["probe"]),
        comm=json.dumps(training_params("comm")),
        min_class=lambda wc: ds_cfg(wc.dataset)["min_class_size"],
        device=config["training"]["device"],
    shell:
        "python -m workflow_scripts.scaling evaluate --spots {input.spots} --gex {input.gex} --img {input.img}"
        " --dataset {wildcards.dataset} --config {wildcards.ptcfg} --fraction {wildcards.fraction}"
        " --seed {wildcards.seed} --history {input.history}"
        " --tasks {params.tasks:q} --probe-params {params.probe:q} --comm-params {params.comm:q}"
        " --min-class-size {params.min_class} --device {params.device} --threads {threads}"
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
    conda:
        "../envs/cellsynergy.yaml"
    threads: config["training"]["threads"]
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    params:
        tasks=lambda wc: tasks_json(wc.dataset),
        probe=json.dumps(config["probe"]),
        comm=json.dumps(training_params("comm")),
        min_class=lambda wc: ds_cfg(wc.dataset)["min_class_size"],
        device=config["training"]["device"],
    shell:
        "python -m workflow_scripts.scaling evaluate --spots {input.spots} --gex {input.gex} --img {input.img}"
        " --dataset {wildcards.dataset} --config pretrained --fraction 0 --seed {wildcards.seed} --n-fit 0"
        " --tasks {params.tasks:q} --probe-params {params.probe:q} --comm-params {params.comm:q}"
        " --min-class-size {params.min_class} --device {params.device} --threads {threads}"
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
        "python -m workflow_scripts.tables collect --inputs {input} --out {output.table} --log {log}"
        " && python -m workflow_scripts.tables summarise --input {output.table} --out {output.summary}"
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
        "python -m workflow_scripts.figures_analysis scaling --inputs {input} --out {output} --log {log}"
