"""Reading and writing the workflow's tables: embeddings, probe results, logs.

Embedding tables
----------------
Every embedding (unimodal, fused, baseline) is a parquet file with one row per spot or patch:
the index is the spot id (``spot_id``, a string), the columns are ``f0 … f{d-1}`` (float32).
Free-form metadata (encoder name, parameters) is stored in the parquet schema metadata under
the key ``cellsynergy``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

META_KEY = b"cellsynergy"


def lazy_module(name: str):
    """Module ``name``, executed on its first attribute access instead of now (``importlib.util.LazyLoader``).

    The dataset readers import anndata this way: Snakemake imports their ``input_files`` while it plans the DAG,
    and anndata (with zarr and dask) takes about 1.2 s of CPU to import, paid by every ``snakemake`` call, dry runs
    included. A module that is already imported is returned as it is. Raises ModuleNotFoundError when ``name`` is
    not installed (at this call, not at first use).
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"no module named {name!r} (install it into the workflow's environment)", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class DataFileError(ValueError):
    """An input data file that exists but cannot be used (truncated, corrupt, missing columns); the message names
    the file, what is wrong and how to fix it."""


def read_table(path: str | Path, required: Sequence[str] = (), hint: str = "", **read_csv_kwargs) -> pd.DataFrame:
    """Read a CSV/TSV (optionally gzipped) with :func:`pandas.read_csv`, failing with a clear message.

    Parameters
    ----------
    path : the file; FileNotFoundError names it when absent.
    required : columns the table must have (the index column counts); DataFileError lists the missing ones and
        the columns the file has.
    hint : appended to every message (how to restore or fix the file).
    **read_csv_kwargs : passed to :func:`pandas.read_csv` (e.g. ``sep="\t"``, ``index_col=0``).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    DataFileError
        The file is truncated or corrupt (a gzip stream that ends early or does not decompress, an empty file,
        rows that do not parse) or lacks a ``required`` column.
    """
    import gzip
    import zlib

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file missing: {path}. {hint}".strip())
    tail = f" {hint}" if hint else ""
    try:
        df = pd.read_csv(path, **read_csv_kwargs)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataFileError(
            f"{path}: the compressed file is truncated or corrupt ({type(e).__name__}: {e}); the copy or download "
            f"was probably interrupted.{tail}"
        ) from e
    except pd.errors.EmptyDataError as e:
        raise DataFileError(f"{path}: the file is empty.{tail}") from e
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataFileError(f"{path}: cannot be parsed as a table ({type(e).__name__}: {e}).{tail}") from e
    have = [str(c) for c in ([df.index.name] if df.index.name is not None else []) + list(df.columns)]
    missing = [c for c in required if c not in have]
    if missing:
        raise DataFileError(f"{path}: missing column(s) {missing}; the file has columns {have}.{tail}")
    return df


def embedding_frame(values: np.ndarray, ids: Sequence[str]) -> pd.DataFrame:
    """Wrap an ``(n, d)`` array as an embedding table indexed by spot id.

    Raises ValueError when the number of rows and ids differ or the array is not 2-D.
    """
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"embedding must be 2-D (n_spots, n_dims), got shape {values.shape}")
    if len(ids) != values.shape[0]:
        raise ValueError(f"{values.shape[0]} embedding rows but {len(ids)} spot ids")
    df = pd.DataFrame(
        values.astype(np.float32, copy=False),
        index=pd.Index([str(i) for i in ids], name="spot_id"),
        columns=[f"f{i}" for i in range(values.shape[1])],
    )
    return df


def write_embedding(df: pd.DataFrame, path: str | Path, meta: Mapping | None = None) -> None:
    """Write an embedding table (see module docstring) to ``path`` (parquet).

    ``meta`` is any JSON-serialisable mapping (e.g. encoder name and parameters).
    Raises ValueError on duplicated spot ids.
    """
    if df.index.has_duplicates:
        dup = df.index[df.index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"duplicated spot ids in embedding for {path}: {dup}")
    df = df.copy()
    df.index = df.index.astype(str)
    df.index.name = "spot_id"
    df.columns = [str(c) for c in df.columns]
    table = pa.Table.from_pandas(df.astype(np.float32), preserve_index=True)
    md = dict(table.schema.metadata or {})
    md[META_KEY] = json.dumps(dict(meta or {}), default=str).encode()
    table = table.replace_schema_metadata(md)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def read_embedding(path: str | Path) -> pd.DataFrame:
    """Read an embedding table written by :func:`write_embedding`.

    Raises FileNotFoundError naming the path when it does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"embedding table not found: {path} (run the rule that builds it first)")
    df = pq.read_table(path).to_pandas()
    df.index = df.index.astype(str)
    df.index.name = "spot_id"
    return df


EMBEDDING_FILE_TYPES = (".parquet", ".csv", ".tsv", ".txt", ".h5ad")


def read_embedding_file(path: str | Path, key: str | None = None, what: str = "embedding file") -> pd.DataFrame:
    """Read a user-supplied embedding (bring your own embeddings) as an embedding table (spots × dims).

    Accepted files (chosen by suffix):

    * ``.parquet`` — a table written by :func:`write_embedding`, or any table with a ``spot_id`` column (or index)
      and numeric columns, one row per spot;
    * ``.csv`` / ``.tsv`` / ``.txt`` — the same as text (comma- or tab-separated), with a ``spot_id`` column;
    * ``.h5ad`` — an AnnData whose ``obs_names`` are the spot ids; the embedding is ``obsm[key]`` (or ``X`` when
      ``key`` is None or ``"X"``).

    Returns a float32 DataFrame indexed by spot id (str) with columns ``f0 … f{d-1}``; ``attrs['feature_names']``
    keeps the original column names. Raises FileNotFoundError naming ``path``; ValueError naming ``path`` for an
    unknown suffix, a missing ``spot_id`` column or ``obsm`` key, non-numeric columns, or duplicated spot ids.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} (fix the path in the config)")
    suffix = path.suffix.lower()
    if suffix not in EMBEDDING_FILE_TYPES:
        raise ValueError(f"{what} {path}: unknown file type {suffix!r}; use one of {list(EMBEDDING_FILE_TYPES)}")
    if suffix == ".h5ad":
        import anndata as ad

        a = ad.read_h5ad(path)
        if key in (None, "X"):
            values = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
            names = [str(v) for v in a.var_names]
        elif key in a.obsm:
            m = a.obsm[key]
            values = m.to_numpy() if isinstance(m, pd.DataFrame) else np.asarray(m)
            names = [str(c) for c in m.columns] if isinstance(m, pd.DataFrame) else [f"{key}_{i}" for i in
                                                                                      range(values.shape[1])]
        else:
            raise ValueError(f"{what} {path}: obsm has no key {key!r}; it has {sorted(a.obsm.keys())} (set `key`)")
        df = pd.DataFrame(np.asarray(values, dtype=np.float64), index=a.obs_names.astype(str), columns=names)
    else:
        if suffix == ".parquet":
            df = pq.read_table(path).to_pandas()
        else:
            df = pd.read_csv(path, sep="," if suffix == ".csv" else "\t")
        if "spot_id" in df.columns:
            df = df.set_index("spot_id")
        elif df.index.name != "spot_id":
            raise ValueError(f"{what} {path}: no `spot_id` column (one row per spot, the id as in the spots table)")
        bad = [str(c) for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
        if bad:
            raise ValueError(f"{what} {path}: non-numeric column(s) {bad[:5]}; keep only spot_id and the dimensions")
    df.index = df.index.astype(str)
    if df.index.has_duplicates:
        raise ValueError(f"{what} {path}: duplicated spot ids, e.g. {df.index[df.index.duplicated()][:3].tolist()}")
    if df.shape[1] == 0:
        raise ValueError(f"{what} {path}: no embedding columns")
    out = embedding_frame(df.to_numpy(dtype=np.float32), df.index)
    out.attrs["feature_names"] = [str(c) for c in df.columns]
    return out


def match_to_spots(emb: pd.DataFrame, spot_ids: Sequence[str], what: str,
                   logger: logging.Logger | None = None) -> pd.DataFrame:
    """Rows of an embedding table for a dataset's spots, in the dataset's order.

    ``emb``: (n_rows, d) indexed by spot id (from a user's file); ``spot_ids``: the dataset's spot ids. Rows for
    spots not in the dataset are dropped and spots without a row are left out; both are counted in the log, as are
    rows with NaN/inf values (kept: the probes drop them and count them again). The result's ``attrs`` gain
    ``n_rows_unused`` and ``n_spots_missing``. Raises ValueError naming ``what`` when no spot id is shared or when
    every shared row has a NaN/inf value.
    """
    lg = logger or log
    ids = pd.Index([str(s) for s in spot_ids])
    common = ids.intersection(emb.index, sort=False)
    if len(common) == 0:
        raise ValueError(f"{what}: no spot id in common with the dataset (e.g. {list(emb.index[:3])} vs "
                         f"{list(ids[:3])}); the file's spot_id must be the dataset's spot ids")
    n_extra, n_missing = len(emb) - len(common), len(ids) - len(common)
    if n_extra:
        lg.warning("%s: %d rows for spots not in the dataset are dropped", what, n_extra)
    if n_missing:
        lg.warning("%s: %d of %d dataset spots have no row", what, n_missing, len(ids))
    out = emb.loc[common]
    bad = ~np.isfinite(out.to_numpy(dtype=float)).all(axis=1)
    if bad.all():
        raise ValueError(f"{what}: every one of its {len(out)} rows for the dataset's spots has NaN/inf values")
    if bad.any():
        lg.warning("%s: %d rows have NaN/inf values (dropped by the probes)", what, int(bad.sum()))
    out.attrs.update(n_rows_unused=int(n_extra), n_spots_missing=int(n_missing))
    lg.info("%s: %d spots x %d dims", what, out.shape[0], out.shape[1])
    return out


def read_embedding_meta(path: str | Path) -> dict:
    """Return the ``cellsynergy`` metadata dict stored with an embedding table ({} if none)."""
    md = pq.read_schema(path).metadata or {}
    raw = md.get(META_KEY)
    return json.loads(raw) if raw else {}


def drop_invalid_rows(df: pd.DataFrame, what: str, logger: logging.Logger | None = None) -> pd.DataFrame:
    """Drop rows with any NaN/inf value, logging how many were dropped (never silently).

    ``what`` names the table in the log message (e.g. ``"GEX embedding pca"``).
    """
    logger = logger or log
    values = df.to_numpy(dtype=np.float64, copy=False)
    ok = np.isfinite(values).all(axis=1)
    n_bad = int((~ok).sum())
    if n_bad:
        logger.warning("%s: dropped %d of %d rows with NaN/inf values", what, n_bad, len(df))
    else:
        logger.info("%s: all %d rows finite", what, len(df))
    return df.loc[ok]


def intersect_tables(tables: Mapping[str, pd.DataFrame], logger: logging.Logger | None = None) -> dict:
    """Restrict several spot-indexed tables to their common spot ids (in the first table's order).

    Every spot dropped from a table because another table lacks it is counted in the log.
    Returns a dict with the same keys. Raises ValueError if no spot is shared.
    """
    logger = logger or log
    names = list(tables)
    common = tables[names[0]].index
    for n in names[1:]:
        common = common.intersection(tables[n].index, sort=False)
    if len(common) == 0:
        raise ValueError(f"tables {names} share no spot id")
    out = {}
    for n in names:
        n_drop = len(tables[n]) - len(common)
        if n_drop:
            logger.warning("%s: %d of %d spots dropped (absent from another table)", n, n_drop, len(tables[n]))
        out[n] = tables[n].loc[common]
    return out


def log_uncaught_exception(exc_type, exc, tb) -> None:
    """``sys.excepthook`` installed by :func:`setup_logging`: an exception that ends a CLI is logged (message, then
    traceback) through the logging handlers, so the rule's log file holds the same error as the terminal."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("workflow_scripts").critical(
        "%s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb)
    )
    for h in logging.getLogger().handlers:
        h.flush()


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> logging.Logger:
    """Log to ``log_file`` (the rule's ``log:``) and to stderr; return the package logger.

    Every CLI's ``main`` calls this first. It also installs :func:`log_uncaught_exception` as ``sys.excepthook``,
    so an error that ends the command (a missing column, a truncated file, a bad parameter) is written to the
    log file with its traceback, not only to the terminal.
    """
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    logging.captureWarnings(True)
    sys.excepthook = log_uncaught_exception
    return logging.getLogger("workflow_scripts")


def write_result_table(df: pd.DataFrame, path: str | Path, dataset: str, embedding: str, seed: int) -> None:
    """Write a per-embedding result table as TSV with the leading key columns ``dataset, embedding, seed``.

    Used by the probe, spatial-probe and spatial-consistency CLIs, so their tables concatenate cleanly
    (:mod:`workflow_scripts.evaluation.tables`).
    """
    df = df.copy()
    df.insert(0, "seed", seed)
    df.insert(0, "embedding", embedding)
    df.insert(0, "dataset", dataset)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, sep="\t", index=False)
    log.info("wrote %d rows to %s", len(df), path)


def json_arg(text: str, option: str):
    """Parse the JSON value of a CLI option; exits with a message naming ``option`` when it is not valid JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        msg = f"{option}: not valid JSON ({e}): {text!r}"
        log.error(msg)  # SystemExit bypasses sys.excepthook: log it here so that the rule's log has it
        raise SystemExit(msg)


def embedding_task_parser(prog: str, description: str):
    """Argument parser with the options every per-embedding evaluation CLI shares.

    ``--embedding`` (parquet), ``--spots`` (spots AnnData), ``--dataset``, ``--name`` (embedding name written in the
    ``embedding`` column), ``--seed``, ``--out`` (TSV) and ``--log``; callers add their own options.
    """
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--embedding", required=True, help="embedding parquet (workflow_scripts.io format)")
    p.add_argument("--spots", required=True, help="spots AnnData (results/<dataset>/spots.h5ad)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--name", required=True, help="embedding name written in the 'embedding' column")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True, help="output TSV")
    p.add_argument("--log", default=None)
    return p
