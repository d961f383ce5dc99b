rule prepare:
    """Read a dataset's raw files into the spot data model and its SpatialData view."""
    input:
        prepare_inputs,
    output:
        spots="results/{dataset}/spots.h5ad",
        cells="results/{dataset}/cells.h5ad",
        sdata=directory("results/{dataset}/sdata.zarr"),
    log:
        "logs/{dataset}/prepare.log",
    benchmark:
        "results/benchmarks/{dataset}/prepare.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        # only the reader's keys (config/readers/<reader>.schema.yaml): tasks, classes, rings and encoders do not
        # change the spots, so changing them must not rebuild them
        cfg=lambda wc: json.dumps(prepare_params(wc.dataset)),
        seed=SEEDS[0],
    shell:
        "python -m workflow_scripts.data.prepare --dataset {wildcards.dataset} --params {params.cfg:q}"
        " --seed {params.seed} --spots {output.spots} --cells {output.cells} --sdata {output.sdata} --log {log}"


rule qc_patches:
    """Sample patches of every slide, titled with their spot ids, at the patch size the image encoder sees."""
    input:
        "results/{dataset}/spots.h5ad",
    output:
        report(
            "results/{dataset}/qc/patches.png",
            caption="../report/qc_patches.rst",
            category="{dataset}",
            subcategory="Quality control",
        ),
    log:
        "logs/{dataset}/qc_patches.log",
    benchmark:
        "results/benchmarks/{dataset}/qc_patches.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    params:
        patch_um=lambda wc: ds_cfg(wc.dataset)["patch_um"],
    shell:
        "python -m workflow_scripts.data.qc --spots {input} --patch-um {params.patch_um} --out {output} --log {log}"
