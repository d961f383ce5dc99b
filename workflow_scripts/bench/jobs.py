"""Time and memory of every workflow job: collect Snakemake's ``benchmark:`` files into one table and plot it.

Every rule that does real work declares ``benchmark: "results/benchmarks/{dataset}/<rule>/<wildcards>.tsv"``
(``.../<rule>.tsv`` when the dataset is its only wildcard). Snakemake writes one row per job there: wall seconds
``s``, ``max_rss`` (MB, peak resident set size of the job's processes), ``max_vms``, ``max_uss``, ``max_pss``,
``io_in``, ``io_out`` (MB), ``mean_load`` (CPU %, averaged over the job) and ``cpu_time`` (s, user + system);
see the Snakemake documentation, "Benchmark rules".

``collect``: every benchmark file under ``--root`` for the given datasets → one long table
(``results/tables/benchmarks.tsv``): ``dataset, rule, wildcards, s, cpu_time, max_rss, max_vms, max_uss, max_pss,
io_in, io_out, mean_load, file``, plus ``--summary`` per dataset and rule: ``jobs, s_total, s_mean, s_max,
cpu_time_total, max_rss_max`` (rules by ``s_total``, largest first).
``figure``: job-seconds and peak RSS per rule (``results/figures/benchmarks.png``).

The files are globbed, so a file left from an earlier run of the same dataset (a method since removed from the
config) is collected as well; its ``file`` column and modification time (``mtime``) tell it apart.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..io import setup_logging

log = logging.getLogger(__name__)

#: the columns Snakemake writes, in order (``h:m:s`` is dropped: it repeats ``s``)
BENCH_COLUMNS = ["s", "cpu_time", "max_rss", "max_vms", "max_uss", "max_pss", "io_in", "io_out", "mean_load"]
COLUMNS = ["dataset", "rule", "wildcards", *BENCH_COLUMNS, "mtime", "file"]
SUMMARY_COLUMNS = ["dataset", "rule", "jobs", "s_total", "s_mean", "s_max", "cpu_time_total", "max_rss_max"]


def parse_path(path: Path, root: Path) -> tuple[str, str, str]:
    """``(dataset, rule, wildcards)`` of a benchmark file ``root/dataset/rule/wildcards.tsv`` or
    ``root/dataset/rule.tsv`` (wildcards ``""``). Raises ValueError for any other layout."""
    parts = path.relative_to(root).with_suffix("").parts
    if len(parts) == 2:
        return parts[0], parts[1], ""
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise ValueError(f"{path}: expected {root}/<dataset>/<rule>/<wildcards>.tsv or {root}/<dataset>/<rule>.tsv")


def read_benchmark(path: str | Path) -> pd.DataFrame:
    """One Snakemake benchmark file (one row per repeat; ``benchmark: repeat(..., n)`` gives n rows).

    Missing columns (older Snakemake) become NaN; ``NA`` values (a job too short to sample) stay NaN.
    Raises ValueError naming the file when it has no ``s`` column.
    """
    df = pd.read_csv(path, sep="\t", na_values=["NA", "-"])
    if "s" not in df.columns:
        raise ValueError(f"{path}: not a Snakemake benchmark file (no column 's'; columns {list(df.columns)})")
    for c in BENCH_COLUMNS:
        if c not in df.columns:
            df[c] = float("nan")
    return df[BENCH_COLUMNS].apply(pd.to_numeric, errors="coerce")


def collect(root: str | Path, datasets: Sequence[str] | None = None) -> pd.DataFrame:
    """All benchmark files under ``root`` (of ``datasets``, default all) as one table (:data:`COLUMNS`).

    Returns an empty table with those columns when there is none (logged).
    """
    root = Path(root)
    frames = []
    dirs = [root / d for d in datasets] if datasets else [p for p in sorted(root.glob("*")) if p.is_dir()]
    for d in dirs:
        for f in sorted(d.rglob("*.tsv")):
            ds, rule, wc = parse_path(f, root)
            b = read_benchmark(f)
            b.insert(0, "wildcards", wc)
            b.insert(0, "rule", rule)
            b.insert(0, "dataset", ds)
            b["mtime"] = pd.Timestamp.fromtimestamp(f.stat().st_mtime).isoformat(timespec="seconds")
            b["file"] = str(f)
            frames.append(b)
    if not frames:
        log.warning("no benchmark files under %s for datasets %s", root, list(datasets or []))
        return pd.DataFrame(columns=COLUMNS)
    out = pd.concat(frames, ignore_index=True)[COLUMNS]
    log.info("collected %d benchmark rows of %d rules from %s", len(out), out["rule"].nunique(), root)
    return out


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and rule: number of jobs, total / mean / max wall seconds, total CPU seconds, max peak RSS (MB)."""
    if df.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    g = df.groupby(["dataset", "rule"], sort=False)
    out = g.agg(jobs=("s", "size"), s_total=("s", "sum"), s_mean=("s", "mean"), s_max=("s", "max"),
                cpu_time_total=("cpu_time", "sum"), max_rss_max=("max_rss", "max")).reset_index()
    return out.sort_values(["dataset", "s_total"], ascending=[True, False])[SUMMARY_COLUMNS]


def plot(summary: pd.DataFrame, out: str | Path) -> None:
    """Two panels per dataset: job-seconds per rule (bars: total; label: jobs) and the largest peak RSS per rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(summary["dataset"])) or ["(none)"]
    n_rules = max([int((summary["dataset"] == d).sum()) for d in datasets] + [1])
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 0.9 + 0.32 * n_rules * len(datasets)), squeeze=False)
    for row, d in zip(axes, datasets):
        s = summary[summary["dataset"] == d].iloc[::-1]
        row[0].barh(s["rule"], s["s_total"], color="tab:blue")
        for y, (v, n) in enumerate(zip(s["s_total"], s["jobs"])):
            row[0].text(v, y, f" {v:,.0f} s ({n} jobs)", va="center", fontsize=7)
        row[0].set_xlabel("wall time, summed over jobs (s)")
        row[0].set_title(f"{d}: time per rule")
        row[1].barh(s["rule"], s["max_rss_max"] / 1024, color="tab:orange")
        row[1].set_xlabel("largest peak RSS of one job (GiB)")
        row[1].set_title(f"{d}: memory per rule")
        for ax in row:
            ax.tick_params(axis="y", labelsize=8)
            ax.margins(x=0.25)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m workflow_scripts.bench.jobs collect --root results/benchmarks [--datasets D ...] --out T.tsv
    --summary S.tsv --log LOG`` and ``... figure --summary S.tsv --out F.png --log LOG``."""
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.bench.jobs", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="benchmark files -> one table and a per-rule summary")
    c.add_argument("--root", default="results/benchmarks")
    c.add_argument("--datasets", nargs="*", default=None)
    c.add_argument("--out", required=True)
    c.add_argument("--summary", required=True)
    c.add_argument("--log", default=None)
    f = sub.add_parser("figure", help="per-rule summary -> figure")
    f.add_argument("--summary", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--log", default=None)
    args = ap.parse_args(argv)
    setup_logging(args.log)
    if args.cmd == "collect":
        df = collect(args.root, args.datasets)
        for path, table in ((args.out, df), (args.summary, summarise(df))):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            table.to_csv(path, sep="\t", index=False)
        log.info("wrote %s and %s", args.out, args.summary)
    else:
        plot(pd.read_csv(args.summary, sep="\t"), args.out)
        log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
