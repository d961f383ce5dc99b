# Figure rules read only the summary tables, so editing a plot reruns only plots.


rule figure_probe_scores:
    input:
        "results/tables/{dataset}/probes_summary.tsv",
    output:
        report(
            "results/figures/{dataset}/probe_scores.png",
            caption="../report/probe_scores.rst",
            category="{dataset}",
            subcategory="Figures",
        ),
    log:
        "logs/{dataset}/figure_probe_scores.log",
    conda:
        "../envs/cellsynergy.yaml"
    shell:
        "python -m workflow_scripts.figures.evaluation probe_scores --probes {input} --out {output} --log {log}"


rule figure_sis_heatmap:
    input:
        "results/sis/{dataset}.tsv",
    output:
        report(
            "results/figures/{dataset}/sis_heatmap.png",
            caption="../report/sis_heatmap.rst",
            category="{dataset}",
            subcategory="Figures",
        ),
    log:
        "logs/{dataset}/figure_sis_heatmap.log",
    conda:
        "../envs/cellsynergy.yaml"
    shell:
        "python -m workflow_scripts.figures.evaluation sis_heatmap --sis {input} --out {output} --log {log}"


rule figure_protocols:
    input:
        "results/tables/{dataset}/protocols.tsv",
    output:
        report(
            "results/figures/{dataset}/protocols.png",
            caption="../report/protocols_figure.rst",
            category="{dataset}",
            subcategory="Figures",
        ),
    log:
        "logs/{dataset}/figure_protocols.log",
    conda:
        "../envs/cellsynergy.yaml"
    shell:
        "python -m workflow_scripts.figures.evaluation protocols --protocols {input} --out {output} --log {log}"


rule figure_spatial_rings:
    input:
        "results/tables/{dataset}/spatial.tsv",
    output:
        report(
            "results/figures/{dataset}/spatial_rings.png",
            caption="../report/spatial_rings.rst",
            category="{dataset}",
            subcategory="Figures",
        ),
    log:
        "logs/{dataset}/figure_spatial_rings.log",
    conda:
        "../envs/cellsynergy.yaml"
    shell:
        "python -m workflow_scripts.figures.evaluation spatial_rings --spatial {input} --out {output} --log {log}"
