"""Benchmarks of the workflow's expensive stages at lung scale, and the per-job figures of a workflow run.

* ``python -m workflow_scripts.bench`` (:mod:`workflow_scripts.bench.run`): synthetic lung-scale embeddings
  (:mod:`workflow_scripts.bench.synthetic`), each stage timed (wall, CPU, peak RSS, peak GPU memory) next to the
  naive way of doing it, with the ratio;
* :mod:`workflow_scripts.bench.jobs`: Snakemake's ``benchmark:`` files of a run collected into
  ``results/tables/benchmarks.tsv`` and plotted for the report.

Figures, commands and the machine: ``BENCHMARKS.md``.
"""
