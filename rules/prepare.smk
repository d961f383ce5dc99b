rule prepare:
    """Read a dataset's raw files into the spot data model and its SpatialData view; draw sample patches for QC."""
    input:
        prepare_inputs,
    output:
        spots="results/{dataset}/spots.h5ad",
        cells="results/{dataset}/cells.h5ad",
        sdata=directory("results/{dataset}/sdata.zarr"),
        qc=report(
            "results/{dataset}/qc/patches.png",
            caption="../report/qc_patches.rst",
            category="{dataset}",
            subcategory="Quality control",
        ),
    log:
        "logs/{dataset}/prepare.log",
    conda:
        "../envs/cellsynergy.yaml"
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        cfg=lambda wc: json.dumps(ds_cfg(wc.dataset)),
        seed=SEEDS[0],
    shell:
        "python -m workflow_scripts.data.prepare --dataset {wildcards.dataset} --params {params.cfg:q}"
        " --seed {params.seed} --spots {output.spots} --cells {output.cells} --sdata {output.sdata}"
        " --qc-figure {output.qc} --log {log}"
