rule embed:
    """Embed every spot with one frozen unimodal encoder (registry: workflow_scripts/encoders)."""
    input:
        spots="results/{dataset}/spots.h5ad",
        cells="results/{dataset}/cells.h5ad",
        extra=encoder_inputs,
    output:
        "results/{dataset}/embeddings/{modality}/{encoder}.parquet",
    log:
        "logs/{dataset}/embed_{modality}_{encoder}.log",
    conda:
        "../envs/cellsynergy.yaml"
    threads: 2
    resources:
        gpu=encoder_gpu,
        mem_mb=16000,
        runtime=240,
    params:
        enc=lambda wc: json.dumps(encoder_params(wc.encoder, wc.dataset)),
        patch_um=lambda wc: ds_cfg(wc.dataset)["patch_um"],
        device=config["embed"]["device"],
        batch_size=config["embed"]["batch_size"],
        workers=config["embed"]["num_workers"],
        seed=SEEDS[0],
    shell:
        "python -m workflow_scripts.encoders.embed --encoder {wildcards.encoder} --modality {wildcards.modality}"
        " --dataset {input.spots} --cells {input.cells} --out {output} --params {params.enc:q}"
        " --device {params.device} --batch-size {params.batch_size} --num-workers {params.workers}"
        " --patch-um {params.patch_um} --seed {params.seed} --threads {threads} --log {log}"
