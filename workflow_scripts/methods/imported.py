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
are kept and counted (the probes drop them, logged again). Fails naming the file when no spot id is shared
or when every row is NaN/inf.
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

import anndata as ad

from ..io import match_to_spots, read_embedding_file, setup_logging, write_embedding

log = logging.getLogger(__name__)


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
    out = match_to_spots(emb, spots.obs_names, what, log)
    write_embedding(out, a.out, {"method": a.name, "source": str(a.input), "key": a.key,
                                 "feature_names": emb.attrs.get("feature_names", [])})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
