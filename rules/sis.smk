rule sis:
    """Synergistic Information Score per fused method × task × metric (mean over seeds and folds first)."""
    input:
        "results/tables/{dataset}/probes.tsv",
    output:
        report(
            "results/sis/{dataset}.tsv",
            caption="../report/sis.rst",
            category="{dataset}",
            subcategory="Tables",
        ),
    log:
        "logs/{dataset}/sis.log",
    conda:
        "../envs/cellsynergy.yaml"
    params:
        methods=json.dumps(METHODS + [b for b in BASELINES if b == "random"]),
    shell:
        "python -m workflow_scripts.evaluation.sis --probes {input} --methods {params.methods:q} --out {output} --log {log}"
