"""Extraction throughput and peak memory of the foundation-model encoders on one device.

Runs the encoders' own extraction loops (:func:`workflow_scripts.encoders.uni2h.embed_patches`,
:func:`workflow_scripts.encoders.nicheformer.embed_cells`) on synthetic input, so the figure can be taken on
any machine — a GPU node for the real numbers — without data or weights:

* ``uni2h``: a synthetic 4096 × 4096 px H&E-coloured slide (JPEG, 0.5 µm/px); ``--n-items`` spots at random
  positions; patches of 112 µm (224 px) cut by the DataLoader workers, ImageNet-normalised on the device,
  forward under autocast. Reports patches/s.
* ``nicheformer``: ``--n-items`` synthetic cells with ``--genes-per-cell`` non-zero genes drawn from the real
  vocabulary (``resources/nicheformer/model.h5ad``) and tokenised with the real ``dissociated`` technology
  mean; sequences are 3 + min(genes, 1497) tokens. Reports cells/s. Whole-transcriptome spots (HER2ST,
  Visium) fill all 1500 positions; Xenium cells have ~50-300 non-zero genes of a 343-5000-gene panel.

The model is built first (random weights unless ``--weights``), one warm-up batch runs untimed, then the
timed pass covers all items. Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the peak
resident set size of this process (``VmHWM``, reset after building the model; DataLoader workers excluded).

Examples::

    python benchmarks/benchmark_encoders.py --encoder uni2h --device cuda --batch-size 64 --n-items 2048
    python benchmarks/benchmark_encoders.py --encoder nicheformer --device cuda --batch-size 256 --n-items 20000
    python benchmarks/benchmark_encoders.py --encoder uni2h --device cpu --batch-size 4 --n-items 16
    python benchmarks/benchmark_encoders.py --encoder nicheformer --device cpu --batch-size 32 --n-items 256 --tiny
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from workflow_scripts.encoders import nicheformer as N  # noqa: E402
from workflow_scripts.encoders import uni2h as U  # noqa: E402
from workflow_scripts.encoders.torch_utils import (  # noqa: E402
    PatchDataset,
    peak_memory_mb,
    reset_peak_memory,
    resolve_device,
)
from workflow_scripts.io import setup_logging  # noqa: E402
from workflow_scripts.data.patches import patch_reader  # noqa: E402

log = logging.getLogger("benchmark_encoders")


def synthetic_spots(n: int, tmp: Path, seed: int = 0, side: int = 4096, um_per_px: float = 0.5):
    """A spots AnnData of ``n`` spots on one synthetic slide image (pink/purple noise, ``side`` px square)."""
    import anndata as ad
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.array([230, 160, 200], dtype=np.float32)  # eosin-like pink
    img = base + rng.normal(0, 25, size=(side // 8, side // 8, 3))
    img = np.asarray(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize((side, side), Image.Resampling.BILINEAR))
    path = tmp / "slide.jpg"
    Image.fromarray(img).save(path, quality=90)
    margin = 150
    px = rng.uniform(margin, side - margin, size=(n, 2))
    obs = pd.DataFrame({
        "slide": "S", "donor": "D", "x_um": px[:, 0] * um_per_px, "y_um": px[:, 1] * um_per_px,
        "px_x": px[:, 0], "px_y": px[:, 1], "split": "eval",
    }, index=[f"s{i}" for i in range(n)])
    a = ad.AnnData(X=sp.csr_matrix((n, 1), dtype=np.float32), obs=obs)
    a.uns["slides"] = {"S": {"image_path": str(path), "um_per_px": um_per_px}}
    return a


def synthetic_cells(n: int, genes_per_cell: int, n_vocab: int, seed: int = 0) -> sp.csr_matrix:
    """``(n, n_vocab)`` CSR counts with ``genes_per_cell`` random non-zero genes per cell (counts 1 + Poisson(2))."""
    rng = np.random.default_rng(seed)
    k = min(genes_per_cell, n_vocab)
    cols = np.concatenate([np.sort(rng.choice(n_vocab, size=k, replace=False)) for _ in range(n)])
    rows = np.repeat(np.arange(n), k)
    data = 1.0 + rng.poisson(2.0, size=n * k)
    return sp.csr_matrix((data.astype(np.float32), (rows, cols)), shape=(n, n_vocab))


def bench_uni2h(a, device) -> dict:
    t0 = time.perf_counter()
    model = U.load_uni2h(a.weights, device, tiny=a.tiny, allow_random_weights=a.weights is None, seed=0)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        spots = synthetic_spots(a.n_items, Path(tmp))
        reader = patch_reader(spots, 112.0, 224)
        warm = PatchDataset(reader, reader.order()[: a.batch_size])
        U.embed_patches(model, warm, device, a.batch_size, 0, a.precision)
        reset_peak_memory(device)
        ds = PatchDataset(reader)
        t0 = time.perf_counter()
        emb, _ = U.embed_patches(model, ds, device, a.batch_size, a.num_workers, a.precision)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
    assert np.isfinite(emb).all()
    n_params = sum(p.numel() for p in model.parameters())
    return {"items": a.n_items, "unit": "patches", "seconds": dt, "build_seconds": build_s, "n_params": n_params,
            "dim": int(emb.shape[1])}


def bench_nicheformer(a, device) -> dict:
    t0 = time.perf_counter()
    model, _ = N.load_nicheformer(a.weights, tiny=a.tiny, device=device, allow_random_weights=a.weights is None)
    build_s = time.perf_counter() - t0
    vocab = N.load_vocabulary(REPO / "resources/nicheformer/model.h5ad")
    mean = N.load_technology_mean("dissociated", len(vocab), REPO / "resources/nicheformer")
    ctx = N.context_tokens("human", "Xenium", "spatial")
    Xv = synthetic_cells(a.n_items, a.genes_per_cell, len(vocab))
    max_len = min(1500, model.hparams["context_length"])
    warm = N.CellTokenDataset(Xv[: a.batch_size], mean, ctx, max_len)
    N.embed_cells(model, warm, device, a.batch_size, 0, precision=a.precision, exclude_padding=not a.reference_padding)
    reset_peak_memory(device)
    ds = N.CellTokenDataset(Xv, mean, ctx, max_len)
    t0 = time.perf_counter()
    emb = N.embed_cells(model, ds, device, a.batch_size, a.num_workers, precision=a.precision,
                        exclude_padding=not a.reference_padding)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    assert np.isfinite(emb).all()
    return {"items": a.n_items, "unit": "cells", "seconds": dt, "build_seconds": build_s,
            "n_params": N.n_parameters(model), "dim": int(emb.shape[1]),
            "tokens_per_cell": int(ds.lengths().max()) if not a.reference_padding else max_len}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", required=True, choices=["uni2h", "nicheformer"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-items", type=int, default=None, help="patches or cells (default 16 / 256 on CPU, 2048 / 20000 on GPU)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--tiny", action="store_true", help="tiny architecture (smoke test of the script)")
    p.add_argument("--weights", help="real weights (default: random weights of the exact architecture)")
    p.add_argument("--genes-per-cell", type=int, default=100, help="nicheformer: non-zero genes per synthetic cell")
    p.add_argument("--reference-padding", action="store_true", help="nicheformer: pad to 1500 (exclude_padding false)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", help="also write the result as JSON here")
    p.add_argument("--log")
    a = p.parse_args(argv)
    setup_logging(a.log, level=logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    if a.n_items is None:
        a.n_items = (16 if a.encoder == "uni2h" else 256) if device.type == "cpu" else (2048 if a.encoder == "uni2h" else 20000)
    res = (bench_uni2h if a.encoder == "uni2h" else bench_nicheformer)(a, device)
    peak, what = peak_memory_mb(device)
    res.update(
        encoder=a.encoder, device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        torch_threads=torch.get_num_threads(), batch_size=a.batch_size, num_workers=a.num_workers, precision=a.precision,
        tiny=a.tiny, random_weights=a.weights is None, items_per_s=res["items"] / res["seconds"],
        peak_memory_mb=peak, peak_memory_kind=what, torch=torch.__version__,
    )
    print(
        f"{a.encoder} on {res['device']} ({res['device_name']}, {res['torch_threads']} threads), batch {a.batch_size}, "
        f"{a.num_workers} workers, precision {a.precision}{', tiny' if a.tiny else ''}: {res['items']} {res['unit']} in "
        f"{res['seconds']:.2f} s = {res['items_per_s']:.2f} {res['unit']}/s; peak memory {peak:.0f} MiB ({what}); "
        f"model {res['n_params']:,} params built in {res['build_seconds']:.1f} s"
    )
    print(json.dumps(res, default=str))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    return res


if __name__ == "__main__":
    main()
