"""Fused embeddings from files: check a user's fused embedding and store it where the probes read it.

Config: ``datasets.<d>.fused: {name: FILE}`` (or ``{name: {path: FILE, key: KEY}}``; ``{seed}`` in FILE is replaced
by each seed, otherwise every seed probes the same file). FILE is a table or an h5ad as read by
:func:`workflow_scripts.io.read_embedding_file`. The rule ``import_fused`` writes
``results/{dataset}/imported/{name}/seed{seed}.parquet``, which the probes, spatial probes, spatial consistency,
UMAPs and the PID table then score beside the ten methods.

Usage::

    python -m workflow_scripts.methods.imported --input FUSED.parquet [--key KEY] --spots spots.h5ad \
        --name my_fusion --out results/D/imported/my_fusion/seed0.parquet --log LOG

Rows for spots not in the dataset are dropped and spots without a row are counted (both logged); rows with NaN/inf
are kept and counted (the probes drop them, logged again). Fails naming the file when no spot id is shared.
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from ..io import read_embedding_file, setup_logging, write_embedding

log = logging.getLogger(__name__)


def match_to_spots(emb: pd.DataFrame, spot_ids: Sequence[str], what: str) -> pd.DataFrame:
    """Rows of ``emb`` (spots × dims) for the spots in ``spot_ids``, in that order; missing and extra spots and
    non-finite rows are counted in the log. Raises ValueError naming ``what`` when no spot id is shared."""
    ids = pd.Index([str(s) for s in spot_ids])
    common = ids.intersection(emb.index, sort=False)
    if len(common) == 0:
        raise ValueError(f"{what}: no spot id in common with the dataset (e.g. {list(emb.index[:3])} vs "
                         f"{list(ids[:3])}); the file's spot_id must be the dataset's spot ids")
    n_extra, n_missing = len(emb) - len(common), len(ids) - len(common)
    if n_extra:
        log.warning("%s: %d rows for spots not in the dataset are dropped", what, n_extra)
    if n_missing:
        log.warning("%s: %d of %d dataset spots have no row", what, n_missing, len(ids))
    out = emb.loc[common]
    bad = ~np.isfinite(out.to_numpy(dtype=float)).all(axis=1)
    if bad.any():
        log.warning("%s: %d rows have NaN/inf values (dropped by the probes)", what, int(bad.sum()))
    log.info("%s: %d spots x %d dims", what, out.shape[0], out.shape[1])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workflow_scripts.methods.imported", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="the fused embedding file (.parquet, .csv, .tsv, .h5ad)")
    p.add_argument("--key", default="X", help="h5ad only: obsm key of the embedding (default X)")
    p.add_argument("--spots", required=True, help="spots AnnData (results/<dataset>/spots.h5ad)")
    p.add_argument("--name", required=True, help="the embedding's name (config datasets.<d>.fused key)")
    p.add_argument("--out", required=True)
    p.add_argument("--log", default=None)
    a = p.parse_args(argv)
    setup_logging(a.log)
    what = f"fused embedding {a.name} ({a.input})"
    emb = read_embedding_file(a.input, key=a.key, what=what)
    spots = ad.read_h5ad(a.spots, backed="r")
    out = match_to_spots(emb, spots.obs_names, what)
    write_embedding(out, a.out, {"method": a.name, "source": str(a.input), "key": a.key,
                                 "feature_names": emb.attrs.get("feature_names", [])})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
