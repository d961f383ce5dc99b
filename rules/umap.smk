# 2-D UMAPs of the unimodal and fused embeddings (workflow_scripts/analysis/umap.py), coloured by label and slide.


rule umap_coords:
    """2-D UMAPs of every embedding of a dataset (seed config umap.seed, default the first seed), fixed random_state.

    One job per dataset: umap-learn is compiled by numba in every new process, which costs more than the fits.
    """
    input:
        lambda wc: [embedding_path(wc.dataset, e, umap_seed()) for e in embeddings_of(wc.dataset)],
    output:
        "results/{dataset}/umap/coords.tsv",
    log:
        "logs/{dataset}/umap.log",
    benchmark:
        "results/benchmarks/{dataset}/umap_coords.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        umap=json.dumps({k: v for k, v in acfg("umap").items() if k not in ("label", "seed")}),
        names=lambda wc: embeddings_of(wc.dataset),
    shell:
        "python -m workflow_scripts.analysis.umap --embedding {input} --names {params.names} --params {params.umap:q}"
        " --out {output} --log {log}"


rule figure_umap:
    input:
        coords="results/{dataset}/umap/coords.tsv",
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
        "python -m workflow_scripts.figures.analysis umap --coords {input.coords} --spots {input.spots}"
        " --colour {params.column} --dataset {wildcards.dataset} --out {output} --log {log}"
