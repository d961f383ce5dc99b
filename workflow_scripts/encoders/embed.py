"""Stage 2, ``embed``: run one registered unimodal encoder over a spots AnnData.

Works inside the workflow (rule ``embed``) and on its own, e.g. to embed your own data or to check a
checkpoint::

    python -m workflow_scripts.encoders.embed --encoder uni2h --weights /path/to/pytorch_model.bin \
        --dataset results/her2st/spots.h5ad --out uni2h.parquet --device cuda --batch-size 64
    python -m workflow_scripts.encoders.embed --encoder pca --dataset results/her2st/spots.h5ad --out pca.parquet

Output: an embedding table (:mod:`workflow_scripts.io`), one row per spot, with the encoder name,
parameters and (where the encoder provides them) feature names in its metadata. Rows that come out
non-finite are kept as NaN and counted in the log; downstream stages drop them, again with a count.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import anndata as ad
import numpy as np

from . import ANY_MODALITY, EncodeContext, get_encoder, known_encoders
from ..io import setup_logging, write_embedding

log = logging.getLogger(__name__)


def embed(
    encoder: str,
    spots: ad.AnnData,
    params: dict | None = None,
    ctx: EncodeContext | None = None,
):
    """Run encoder ``encoder`` on ``spots``; return the embedding table (spots × dims, indexed by spot id).

    Raises KeyError for an unknown encoder and ValueError when the encoder returns rows for unknown
    spots or a table that is not 2-D.
    """
    spec = get_encoder(encoder)
    ctx = ctx or EncodeContext()
    t0 = time.perf_counter()
    df = spec.fn(spots, dict(params or {}), ctx)
    attrs = dict(df.attrs)
    unknown = df.index.difference(spots.obs_names.astype(str))
    if len(unknown):
        raise ValueError(f"encoder {encoder!r} returned {len(unknown)} rows for unknown spot ids, e.g. {list(unknown[:3])}")
    n_missing = spots.n_obs - len(df)
    if n_missing:
        log.warning("encoder %s: no embedding for %d of %d spots", encoder, n_missing, spots.n_obs)
    bad = ~np.isfinite(df.to_numpy(dtype=float)).all(axis=1)
    if bad.any():
        log.warning("encoder %s: %d of %d rows are NaN/inf (dropped downstream)", encoder, int(bad.sum()), len(df))
    log.info("encoder %s (%s): %d spots x %d dims in %.1f s", encoder, spec.modality, len(df), df.shape[1], time.perf_counter() - t0)
    df.attrs = attrs
    return df


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", required=True, help=f"one of {known_encoders()}")
    p.add_argument("--modality", choices=["gex", "img"], help="fail unless the encoder embeds this modality")
    p.add_argument("--dataset", required=True, help="spots AnnData (results/{dataset}/spots.h5ad)")
    p.add_argument("--cells", help="per-cell AnnData with obs['spot_id'] (results/{dataset}/cells.h5ad)")
    p.add_argument("--out", required=True, help="output parquet")
    p.add_argument("--params", default="{}", help="encoder parameters as JSON")
    p.add_argument("--weights", help="model weights file (sets params['weights'])")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--patch-um", type=float, default=200.0, help="physical patch side in µm")
    p.add_argument("--patch-px", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch/BLAS")
    p.add_argument("--log")
    a = p.parse_args(argv)
    setup_logging(a.log)
    if a.threads:
        try:
            import torch

            torch.set_num_threads(a.threads)
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
    spec = get_encoder(a.encoder)
    if spec.modality == ANY_MODALITY and not a.modality:
        raise SystemExit(f"encoder {a.encoder!r} serves both modalities: pass --modality gex or --modality img")
    if a.modality and spec.modality not in (a.modality, ANY_MODALITY):
        raise SystemExit(
            f"encoder {a.encoder!r} embeds {spec.modality!r}, not {a.modality!r}: "
            f"set datasets.<name>.encoders.{spec.modality} (not .{a.modality}) to {a.encoder!r} in the config"
        )
    params = json.loads(a.params)
    if a.weights:
        params["weights"] = a.weights
    spots = ad.read_h5ad(a.dataset)
    extra = {"modality": a.modality or spec.modality}
    if a.cells:
        extra["cells"] = ad.read_h5ad(a.cells)
    ctx = EncodeContext(
        seed=a.seed, device=a.device, batch_size=a.batch_size, num_workers=a.num_workers,
        patch_um=a.patch_um, patch_px=a.patch_px, extra=extra,
    )
    df = embed(a.encoder, spots, params, ctx)
    meta = {"encoder": a.encoder, "modality": a.modality or spec.modality, "params": params,
            "patch_um": a.patch_um, "seed": a.seed}
    # encoder diagnostics (feature names, explained variance, counts of dropped genes/spots) travel with the table
    meta.update({k: v for k, v in df.attrs.items() if k not in meta})
    write_embedding(df, a.out, meta)


if __name__ == "__main__":
    main()
