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
    benchmark:
        "results/benchmarks/{dataset}/embed/{modality}_{encoder}.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    threads: 2
    resources:
        gpu=encoder_gpu,
        mem_mb=16000,
        runtime=240,
        # settings that do not change the embedding are resources, not params, so changing them reruns nothing
        # (Snakemake's params trigger compares params only); override with --set-resources embed:batch_size=128
        batch_size=config["embed"]["batch_size"],
        num_workers=config["embed"]["num_workers"],
        device=config["embed"]["device"],
    params:
        enc=lambda wc: json.dumps(encoder_params(wc.encoder, wc.dataset)),
        patch=patch_option,
        seed=SEEDS[0],
    shell:
        "python -m workflow_scripts.encoders.embed --encoder {wildcards.encoder} --modality {wildcards.modality}"
        " --dataset {input.spots} --cells {input.cells} --out {output} --params {params.enc:q}"
        " --device {resources.device} --batch-size {resources.batch_size} --num-workers {resources.num_workers}"
        " {params.patch} --seed {params.seed} --threads {threads} --log {log}"
