# Training and validation loss per epoch of every alignment method and seed (workflow_scripts/figures/analysis.py).


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
        "python -m workflow_scripts.figures.analysis training_curves --histories {input} --out {output} --log {log}"
