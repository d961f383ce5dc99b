"""One check of the GPU code paths, with random weights; called by ``benchmarks/gpu_check.sh`` (one process per check).

Checks (first argument):

``uni2h``        UNI2-h extraction (:func:`workflow_scripts.encoders.uni2h.embed_patches`: DataLoader workers
                 cutting patches, pinned memory, autocast) of synthetic patches in fp32 and in bf16: patches/s
                 of each, peak GPU memory, and bf16 against fp32 (largest absolute difference, cosine
                 similarity of each patch's two embeddings: smallest and mean).
``nicheformer``  Nicheformer extraction (:func:`workflow_scripts.encoders.nicheformer.embed_cells`) of synthetic
                 cells, the same figures per cell.
``train``        one training of every fusion method (:func:`workflow_scripts.methods.fit_method`) on synthetic
                 paired embeddings on the device: epochs/s (validation included), peak GPU memory.
``mlm``          Nicheformer masked-language-model post-training
                 (:func:`workflow_scripts.analysis.nicheformer_mlm.posttrain`) for a few optimiser steps: steps/s,
                 loss before and after, peak GPU memory.

Each check appends rows ``check, item, value, unit, status, note`` to ``--out`` (TSV) and exits 1 when it fails:
an exception, a non-finite embedding or loss, a model not on the device, or bf16 embeddings whose mean cosine
similarity to the fp32 ones is below ``--min-cosine`` (0.98). ``--tiny`` shrinks the models and the data so the
script runs on a CPU in seconds (the test of the script); ``--device cpu`` runs there.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from workflow_scripts.encoders.torch_utils import peak_memory_mb, reset_peak_memory, resolve_device  # noqa: E402

log = logging.getLogger("gpu_check")
FIELDS = ["check", "item", "value", "unit", "status", "note"]


class Rows:
    """Rows of one check, written to the TSV at the end (also after a failure)."""

    def __init__(self, check: str, device: torch.device):
        self.check, self.device, self.rows, self.failed = check, device, [], False

    def add(self, item: str, value, unit: str = "", status: str = "ok", note: str = "") -> None:
        self.rows.append(dict(check=self.check, item=item, value=value, unit=unit, status=status, note=note))
        if status == "FAIL":
            self.failed = True
        print(f"{self.check:12s} {item:34s} {value!s:>14} {unit:10s} {status:5s} {note}", flush=True)

    def require(self, ok: bool, item: str, note: str) -> None:
        if not ok:
            self.add(item, "", "", "FAIL", note)

    def peak(self, item: str) -> None:
        mb, kind = peak_memory_mb(self.device)
        self.add(item, round(mb, 1), "MiB", note=kind)

    def write(self, path: str | Path) -> None:
        path = Path(path)
        new = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", newline="") as fh:
            w = csv.DictWriter(fh, FIELDS, delimiter="\t")
            if new:
                w.writeheader()
            w.writerows(self.rows)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(rows: Rows, a: np.ndarray, b: np.ndarray, min_cosine: float, what: str) -> None:
    """bf16 (``b``) against fp32 (``a``) embeddings, row by row."""
    rows.require(np.isfinite(a).all() and np.isfinite(b).all(), f"{what} finite", "non-finite embedding values")
    diff = float(np.max(np.abs(a - b)))
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-12)
    rows.add(f"{what} max |bf16 - fp32|", f"{diff:.4g}", "", note=f"fp32 values up to {float(np.abs(a).max()):.3g}")
    rows.add(f"{what} cosine bf16 vs fp32 (min)", f"{float(cos.min()):.5f}")
    rows.add(f"{what} cosine bf16 vs fp32 (mean)", f"{float(cos.mean()):.5f}",
             status="ok" if cos.mean() >= min_cosine else "FAIL", note=f"needs >= {min_cosine}")


def check_uni2h(rows: Rows, args) -> None:
    from benchmarks.benchmark_encoders import synthetic_spots
    from workflow_scripts.data.patches import patch_reader
    from workflow_scripts.encoders import uni2h as U
    from workflow_scripts.encoders.torch_utils import PatchDataset

    dev = rows.device
    n = args.n_items or (8 if args.tiny else 512)
    t0 = time.perf_counter()
    model = U.load_uni2h(None, dev, tiny=args.tiny, allow_random_weights=True, seed=0)
    rows.add("model built", round(time.perf_counter() - t0, 2), "s",
             note=f"{sum(p.numel() for p in model.parameters()):,} parameters (random weights)")
    rows.require(next(model.parameters()).device.type == dev.type, "model on device", "parameters not on the device")
    with tempfile.TemporaryDirectory() as tmp:
        reader = patch_reader(synthetic_spots(n, Path(tmp), side=1024 if args.tiny else 4096), 112.0, 224)
        ds = PatchDataset(reader)
        U.embed_patches(model, PatchDataset(reader, reader.order()[: args.batch_size]), dev, args.batch_size, 0,
                        "fp32")  # warm-up
        out = {}
        for prec in ("fp32", "bf16"):
            reset_peak_memory(dev)
            t0 = time.perf_counter()
            out[prec], _ = U.embed_patches(model, ds, dev, args.batch_size, args.num_workers, prec)
            _sync(dev)
            dt = time.perf_counter() - t0
            rows.add(f"patches/s {prec}", f"{n / dt:.2f}", "patches/s",
                     note=f"{n} patches, batch {args.batch_size}, {args.num_workers} workers")
            rows.peak(f"peak memory {prec}")
    compare(rows, out["fp32"], out["bf16"], args.min_cosine, "uni2h")


def check_nicheformer(rows: Rows, args) -> None:
    from benchmarks.benchmark_encoders import synthetic_cells
    from workflow_scripts.encoders import nicheformer as N

    dev = rows.device
    n = args.n_items or (64 if args.tiny else 20000)
    t0 = time.perf_counter()
    model, _ = N.load_nicheformer(None, tiny=args.tiny, device=dev, allow_random_weights=True)
    rows.add("model built", round(time.perf_counter() - t0, 2), "s", note=f"{N.n_parameters(model):,} parameters")
    rows.require(next(model.parameters()).device.type == dev.type, "model on device", "parameters not on the device")
    vocab = N.load_vocabulary(REPO / "resources/nicheformer/model.h5ad")
    mean = N.load_technology_mean("dissociated", len(vocab), REPO / "resources/nicheformer")
    ctx = N.context_tokens("human", "Xenium", "spatial")
    X = synthetic_cells(n, 100, len(vocab))
    max_len = min(1500, model.hparams["context_length"])
    N.embed_cells(model, N.CellTokenDataset(X[: args.batch_size], mean, ctx, max_len), dev, args.batch_size, 0,
                  precision="fp32")  # warm-up
    ds = N.CellTokenDataset(X, mean, ctx, max_len)
    out = {}
    for prec in ("fp32", "bf16"):
        reset_peak_memory(dev)
        t0 = time.perf_counter()
        out[prec] = N.embed_cells(model, ds, dev, args.batch_size, args.num_workers, precision=prec)
        _sync(dev)
        dt = time.perf_counter() - t0
        rows.add(f"cells/s {prec}", f"{n / dt:.1f}", "cells/s", note=f"{n} cells of 100 genes, batch {args.batch_size}")
        rows.peak(f"peak memory {prec}")
    compare(rows, out["fp32"], out["bf16"], args.min_cosine, "nicheformer")


def check_train(rows: Rows, args) -> None:
    from workflow_scripts.methods import METHODS, fit_method

    dev = rows.device
    n = args.n_items or (96 if args.tiny else 8192)
    d_gex, d_img = (12, 16) if args.tiny else (512, 1536)
    rng = np.random.default_rng(0)
    s = rng.standard_normal((n, 8)).astype(np.float32)
    gex = s @ rng.standard_normal((8, d_gex)).astype(np.float32) + rng.standard_normal((n, d_gex)).astype(np.float32)
    img = s @ rng.standard_normal((8, d_img)).astype(np.float32) + rng.standard_normal((n, d_img)).astype(np.float32)
    epochs = 2 if args.tiny else args.epochs
    for m in METHODS:
        params = {"max_epochs": epochs, "early_stopping_patience": epochs + 1, "batch_size": 32 if args.tiny else 256,
                  "projection_dim": 8 if args.tiny else 256}
        if m == "comm" and args.tiny:
            params.update(embed_dim=8, n_heads=2)
        try:
            reset_peak_memory(dev)
            t0 = time.perf_counter()
            res = fit_method(m, gex, img, params, seed=0, device=str(dev), progress=False)
            _sync(dev)
            dt = time.perf_counter() - t0
        except Exception as e:  # one method's failure must not hide the others'
            rows.add(f"{m} training", "", "", "FAIL", f"{type(e).__name__}: {e}")
            traceback.print_exc()
            continue
        z3 = np.asarray(res.z3)
        ok = np.isfinite(z3).all()
        if m in ("cca", "concat"):  # closed form / no training
            rows.add(f"{m} fit", f"{dt:.3g}", "s", "ok" if ok else "FAIL", "no gradient training"
                     + ("" if ok else "; non-finite Z3"))
            continue
        ran = len(res.history)
        rows.add(f"{m} epochs/s", f"{ran / dt:.3g}", "epochs/s", "ok" if ok and ran else "FAIL",
                 f"{ran} epochs of {n} rows in {dt:.2f} s (batch {params['batch_size']}; validation included)"
                 + ("" if ok else "; non-finite Z3"))
        if dev.type == "cuda":
            rows.peak(f"{m} peak memory")
        if m in ("comm", "dcca"):  # training.precision: bf16 (autocast of the objective) on the same data
            try:
                t0 = time.perf_counter()
                r16 = fit_method(m, gex, img, {**params, "precision": "bf16"}, seed=0, device=str(dev), progress=False)
                _sync(dev)
                dt16 = time.perf_counter() - t0
            except Exception as e:
                rows.add(f"{m} bf16 training", "", "", "FAIL", f"{type(e).__name__}: {e}")
                traceback.print_exc()
                continue
            ok16 = np.isfinite(np.asarray(r16.z3)).all() and np.isfinite(r16.history["train_loss"]).all()
            ran16 = len(r16.history)
            rows.add(f"{m} bf16 epochs/s", f"{ran16 / dt16:.3g}", "epochs/s", "ok" if ok16 and ran16 else "FAIL",
                     f"{ran16} epochs in {dt16:.2f} s, {dt / ran * ran16 / dt16:.2f}x the fp32 rate; last train loss "
                     f"{r16.history['train_loss'].iloc[-1]:.4g} vs fp32 {res.history['train_loss'].iloc[-1]:.4g}"
                     + ("" if ok16 else "; non-finite loss or Z3"))


def check_mlm(rows: Rows, args) -> None:
    from benchmarks.benchmark_encoders import synthetic_cells
    from workflow_scripts.analysis import nicheformer_mlm as mlm
    from workflow_scripts.encoders import nicheformer as N

    dev = rows.device
    model, _ = N.load_nicheformer(None, tiny=args.tiny, device=dev, allow_random_weights=True)
    vocab = N.load_vocabulary(REPO / "resources/nicheformer/model.h5ad")
    mean = N.load_technology_mean("dissociated", len(vocab), REPO / "resources/nicheformer")
    n, bs = (40, 8) if args.tiny else (32 * args.mlm_steps + 64, 32)
    ds = N.CellTokenDataset(synthetic_cells(n, 100, len(vocab)), mean, N.context_tokens("human", "Xenium", "spatial"),
                            min(1500, model.hparams["context_length"]))
    params = {"max_epochs": 1, "batch_size": bs, "lr": 1e-4, "val_fraction": 0.1}
    reset_peak_memory(dev)
    t0 = time.perf_counter()
    hist = mlm.posttrain(mlm.NicheformerMLM(model), ds, params, seed=0, device=dev, progress=False)
    _sync(dev)
    dt = time.perf_counter() - t0
    steps = int(np.ceil((n - round(0.1 * n)) / bs))
    losses = hist["val_loss"].to_numpy(dtype=float)
    ok = np.isfinite(losses).all() and np.isfinite(hist["train_loss"].to_numpy(dtype=float)[1:]).all()
    rows.add("optimiser steps/s", f"{steps / dt:.3g}", "steps/s", "ok" if ok else "FAIL",
             f"{steps} steps of batch {bs} (one epoch + validation) in {dt:.2f} s" + ("" if ok else "; non-finite loss"))
    rows.add("validation loss before / after", f"{losses[0]:.6f} / {losses[-1]:.6f}")
    rows.peak("peak memory")


CHECKS = {"uni2h": check_uni2h, "nicheformer": check_nicheformer, "train": check_train, "mlm": check_mlm}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("check", choices=sorted(CHECKS))
    ap.add_argument("--device", default="cuda", help="cuda (default), cpu or auto")
    ap.add_argument("--tiny", action="store_true", help="tiny models and data (runs on a CPU in seconds)")
    ap.add_argument("--out", required=True, help="TSV to append the rows to")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--n-items", type=int, default=None, help="patches / cells / training rows")
    ap.add_argument("--epochs", type=int, default=5, help="train: epochs per method")
    ap.add_argument("--mlm-steps", type=int, default=20, help="mlm: optimiser steps (about)")
    ap.add_argument("--min-cosine", type=float, default=0.98)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    dev = resolve_device(args.device)
    if args.batch_size is None:
        args.batch_size = 4 if args.tiny else (64 if args.check == "uni2h" else 256)
    if args.num_workers is None:
        args.num_workers = 0 if args.tiny or dev.type == "cpu" else 4
    rows = Rows(args.check, dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    rows.add("device", name, note=f"torch {torch.__version__}{', tiny' if args.tiny else ''}")
    try:
        CHECKS[args.check](rows, args)
    except Exception as e:
        traceback.print_exc()
        rows.add("run", "", "", "FAIL", f"{type(e).__name__}: {e}")
    rows.write(args.out)
    return 1 if rows.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
