"""Collect per-embedding result tables and summarise them (mean ± sd over folds/repeats and seeds).

``collect``: concatenate the TSVs written by :mod:`workflow_scripts.evaluation.probes` or
:mod:`workflow_scripts.evaluation.spatial_probe` (one per dataset × embedding × seed) into one long table.
``summarise``: mean, sd (``np.std``, ddof 0, as the reference reports: docs/reference.md#probes) and count of ``value`` per group.

Default groups: probe tables (they have a ``fold`` column) →
``dataset, embedding, task, task_type, metric``; spatial tables (``ring`` column) →
``dataset, embedding, task, ring, inner_um, outer_um, metric`` (then ``n_spots`` and ``mean_neighbours``
are averaged too). Summary columns: the group columns, then ``mean, sd, n`` (+ ``n_spots,
mean_neighbours`` for spatial tables).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..io import setup_logging

log = logging.getLogger(__name__)

PROBE_BY = ["dataset", "embedding", "task", "task_type", "metric"]
SPATIAL_BY = ["dataset", "embedding", "task", "ring", "inner_um", "outer_um", "metric"]


def read_table(path: str | Path) -> pd.DataFrame:
    """Read one result TSV; FileNotFoundError naming the path when absent."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"result table not found: {path} (run the rule that writes it first)")
    return pd.read_csv(path, sep="\t")


def collect(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate result TSVs with identical columns (in order) into one table.

    Header-only inputs (a probe whose every task was skipped) contribute no rows and are logged.
    Raises ValueError when no path is given or a file's columns differ from the first file's (naming both).
    """
    if not paths:
        raise ValueError("collect: no input tables given")
    frames, cols, first = [], None, None
    for p in paths:
        df = read_table(p)
        if cols is None:
            cols, first = list(df.columns), p
        elif list(df.columns) != cols:
            raise ValueError(f"columns of {p} ({list(df.columns)}) differ from those of {first} ({cols})")
        if len(df) == 0:
            log.warning("%s: no rows (every task/ring skipped?)", p)
        frames.append(df)
    nonempty = [f for f in frames if len(f)]
    out = pd.concat(nonempty, ignore_index=True) if nonempty else frames[0].iloc[:0]
    log.info("collected %d rows from %d tables", len(out), len(paths))
    return out


def default_by(df: pd.DataFrame) -> list[str]:
    """Default grouping columns: spatial tables (``ring`` column) → :data:`SPATIAL_BY`, else
    :data:`PROBE_BY`, each restricted to the columns present."""
    by = SPATIAL_BY if "ring" in df.columns else PROBE_BY
    return [c for c in by if c in df.columns]


def summarise(df: pd.DataFrame, by: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean, sd (ddof 0) and n of ``value`` per group (default :func:`default_by`).

    Rows with NaN ``value`` are not counted. For spatial tables ``n_spots`` and ``mean_neighbours`` are
    averaged per group as well. Raises ValueError naming absent columns.
    """
    by = list(by) if by else default_by(df)
    missing = [c for c in [*by, "value"] if c not in df.columns]
    if missing:
        raise ValueError(f"summarise: table lacks columns {missing}; it has {list(df.columns)}")
    n_nan = int(df["value"].isna().sum())
    if n_nan:
        log.warning("summarise: %d rows with NaN value ignored", n_nan)
    d = df.dropna(subset=["value"])
    g = d.groupby(by, sort=True, dropna=False)
    out = g["value"].agg(mean="mean", sd=lambda v: float(np.std(v.to_numpy(dtype=float))), n="count").reset_index()
    for extra in ("n_spots", "mean_neighbours"):
        if extra in d.columns and extra not in by:
            out[extra] = g[extra].mean().to_numpy()
    log.info("summarised %d rows into %d groups by %s", len(d), len(out), by)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m workflow_scripts.evaluation.tables collect --inputs A.tsv B.tsv ... --out ALL.tsv --log LOG``
    and ``python -m workflow_scripts.evaluation.tables summarise --input ALL.tsv --out SUMMARY.tsv [--by COL ...]
    --log LOG``."""
    p = argparse.ArgumentParser(prog="python -m workflow_scripts.evaluation.tables", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="concatenate result TSVs")
    c.add_argument("--inputs", nargs="+", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--log", default=None)
    s = sub.add_parser("summarise", help="mean/sd/n of value per group")
    s.add_argument("--input", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--by", nargs="+", default=None, help="group columns (default: by table kind)")
    s.add_argument("--log", default=None)
    args = p.parse_args(argv)
    setup_logging(args.log)
    if args.cmd == "collect":
        out = collect(args.inputs)
    else:
        out = summarise(read_table(args.input), args.by)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(args.out, sep="\t", index=False)
    log.info("wrote %d rows to %s", len(out), args.out)


if __name__ == "__main__":
    main()
