"""2-D UMAP coordinates of one embedding, for the UMAP figures (:mod:`workflow_scripts.figures.analysis`).

UMAP (McInnes, Healy & Melville 2018, arXiv:1802.03426; the ``umap-learn`` package) of one embedding table:
per-feature standardisation → PCA to ≤ ``n_pca`` dims → ``UMAP(n_neighbors, min_dist, metric, random_state)``;
deterministic for a fixed ``random_state`` (single-threaded).

umap-learn's functions are compiled by numba on first use in every process (most are not cached on disk), which
costs 10-20 s of CPU, far more than a fit of a few thousand spots; the CLI therefore takes several embeddings and
fits them one after another in one process (one job per dataset), so the compilation is paid once. Each fit
starts from its own ``random_state``, so the coordinates do not depend on how many embeddings share the job.

CLI: ``python -m workflow_scripts.analysis.umap --embedding E1.parquet [E2.parquet ...] [--names N1 [N2 ...]]
--params JSON --out COORDS.tsv --log LOG`` writes one table ``embedding, spot_id, umap1, umap2`` (embeddings in the
order given; names default to the file names without ``.parquet``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..io import drop_invalid_rows, json_arg, read_embedding, setup_logging

log = logging.getLogger(__name__)

UMAP_DEFAULTS = {"n_neighbors": 15, "min_dist": 0.3, "metric": "euclidean", "n_pca": 50, "random_state": 0,
                 "label": None, "max_spots": None}


def umap_coords(emb: pd.DataFrame, params: Mapping | None = None) -> pd.DataFrame:
    """2-D UMAP coordinates of an embedding table (module docstring); returns ``spot_id``-indexed ``umap1, umap2``.

    ``params``: :data:`UMAP_DEFAULTS` (``max_spots``: seeded subsample for very large tables, logged).
    Raises ValueError for unknown keys or fewer than 4 rows.
    """
    import umap
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    p = {**UMAP_DEFAULTS, **dict(params or {})}
    unknown = sorted(set(p) - set(UMAP_DEFAULTS))
    if unknown:
        raise ValueError(f"umap: unknown parameter(s) {unknown}; allowed {sorted(UMAP_DEFAULTS)}")
    emb = drop_invalid_rows(emb, "embedding for UMAP")
    if p["max_spots"] and len(emb) > int(p["max_spots"]):
        keep = np.sort(np.random.default_rng(int(p["random_state"])).choice(len(emb), int(p["max_spots"]), replace=False))
        log.info("umap: %d of %d spots drawn (max_spots)", len(keep), len(emb))
        emb = emb.iloc[keep]
    if len(emb) < 4:
        raise ValueError(f"umap: {len(emb)} rows; at least 4 are needed")
    x = StandardScaler().fit_transform(emb.to_numpy(np.float64))
    n_pca = min(int(p["n_pca"]), x.shape[1], x.shape[0] - 1)
    if n_pca < x.shape[1]:
        x = PCA(n_components=n_pca, random_state=int(p["random_state"])).fit_transform(x)
    reducer = umap.UMAP(n_neighbors=min(int(p["n_neighbors"]), len(x) - 1), min_dist=float(p["min_dist"]),
                        metric=p["metric"], random_state=int(p["random_state"]), n_jobs=1)
    y = reducer.fit_transform(x)
    return pd.DataFrame(y, index=emb.index, columns=["umap1", "umap2"])



def main(argv: Sequence[str] | None = None) -> None:
    """CLI: see the module docstring. Exits with a usage error when the numbers of embeddings and names differ."""
    import time

    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.analysis.umap", description=__doc__.split("\n")[0])
    ap.add_argument("--embedding", required=True, nargs="+", help="embedding table(s) (parquet)")
    ap.add_argument("--names", nargs="+", default=None, help="embedding names, one per --embedding")
    ap.add_argument("--params", default="{}", help="JSON, config umap")
    ap.add_argument("--out", required=True, help="TSV: embedding, spot_id, umap1, umap2")
    ap.add_argument("--log", default=None)
    args = ap.parse_args(argv)
    names = args.names or [Path(p).name.removesuffix(".parquet") for p in args.embedding]
    if len(names) != len(args.embedding):
        ap.error(f"{len(args.embedding)} --embedding files but {len(names)} --names; give one name per embedding")
    setup_logging(args.log)
    params = json_arg(args.params, "--params")
    params.pop("label", None)
    frames = []
    for name, emb_path in zip(names, args.embedding):
        t0 = time.process_time()
        xy = umap_coords(read_embedding(emb_path), params)
        frames.append(xy.reset_index(names="spot_id").assign(embedding=name)[["embedding", "spot_id", "umap1", "umap2"]])
        log.info("%s: %d UMAP coordinates from %s (%.1f s CPU, numba compilation included on the first)",
                 name, len(xy), emb_path, time.process_time() - t0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pd.concat(frames, ignore_index=True).to_csv(args.out, sep="\t", index=False)
    log.info("wrote the UMAP coordinates of %d embeddings to %s", len(frames), args.out)


if __name__ == "__main__":
    main()
