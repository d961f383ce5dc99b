rule sis:
    """SIS per protocol × fused method × task × metric (means over seeds and folds first), gains against the best
    unimodal embedding and the best control, paired-bootstrap intervals; and the protocols side by side."""
    input:
        probes="results/tables/{dataset}/probes.tsv",
        folds_meta=folds_meta_files,
    output:
        sis=report(
            "results/sis/{dataset}.tsv",
            caption="../report/sis.rst",
            category="{dataset}",
            subcategory="Tables",
        ),
        protocols=report(
            "results/tables/{dataset}/protocols.tsv",
            caption="../report/protocols.rst",
            category="{dataset}",
            subcategory="Tables",
        ),
    log:
        "logs/{dataset}/sis.log",
    benchmark:
        "results/benchmarks/{dataset}/sis.tsv"
    conda:
        "../envs/cellsynergy.yaml"
    params:
        methods=lambda wc: sis_methods(wc.dataset),
        bootstrap=json.dumps(config["bootstrap"]),
    shell:
        "python -m workflow_scripts.evaluation.sis --probes {input.probes} --methods {params.methods:q}"
        " --bootstrap {params.bootstrap:q} --folds-meta {input.folds_meta} --out {output.sis}"
        " --protocols-out {output.protocols} --log {log}"
