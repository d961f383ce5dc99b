# Time and memory of every job (workflow_scripts/bench/jobs.py): each rule that does real work declares
# `benchmark: "results/benchmarks/{dataset}/<rule>/<wildcards>.tsv"`; these rules collect the files and plot them.


localrules:
    collect_benchmarks,
    figure_benchmarks,


rule collect_benchmarks:
    """Every job's benchmark file (wall s, CPU s, peak RSS) in one table, plus a summary per rule."""
    input:
        final_targets(),  # runs after everything `all` builds, so every job's file is there
    output:
        table="results/tables/benchmarks.tsv",
        summary=report(
            "results/tables/benchmarks_summary.tsv",
            caption="../report/benchmarks_summary.rst",
            category="Benchmarks",
        ),
    log:
        "logs/collect_benchmarks.log",
    conda:
        "../envs/cellsynergy.yaml"
    params:
        datasets=DATASETS,
    shell:
        "python -m workflow_scripts.bench.jobs collect --root results/benchmarks --datasets {params.datasets}"
        " --out {output.table} --summary {output.summary} --log {log}"


rule figure_benchmarks:
    """Job-seconds and the largest peak RSS per rule."""
    input:
        "results/tables/benchmarks_summary.tsv",
    output:
        report(
            "results/figures/benchmarks.png",
            caption="../report/benchmarks.rst",
            category="Benchmarks",
        ),
    log:
        "logs/figure_benchmarks.log",
    conda:
        "../envs/cellsynergy.yaml"
    shell:
        "python -m workflow_scripts.bench.jobs figure --summary {input} --out {output} --log {log}"
