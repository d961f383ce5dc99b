"""Training-speed benchmark of the fusion methods on synthetic embeddings of a chosen size.

:func:`benchmark_training` times the training loop of one method (the same :func:`~.training.run_epoch` that
:func:`~.training.train_model` runs) on synthetic paired embeddings with a planted shared signal, e.g. the lung
scale of the study (71,000 patches, 512-d GEX, 1,536-d IMG), and returns epochs per second. A full epoch at batch
32 on 71,000 rows is 2,218 optimiser steps, so ``max_steps`` times the first steps of an epoch and scales up.
:func:`largest_batch_size` finds the largest batch that fits a memory limit by doubling the batch in child
processes (``python -m workflow_scripts.methods.benchmark``), so that a batch that does not fit cannot take
the calling process down. The benchmark command of the project (``python -m workflow_scripts.bench``) calls
these functions.

Usage of the child process (prints one JSON line)::

    python -m workflow_scripts.methods.benchmark --method comm --n 71000 --d-gex 512 --d-img 1536 \
        --batch-size 32 --max-steps 50 [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from .training import make_optimizer, resolve_device, resolve_params, run_epoch

log = logging.getLogger(__name__)

#: Trainable methods that :func:`benchmark_training` accepts (cca is a closed-form fit, concat has no training).
TRAINED = ("dcca", "comm", "simclr", "byol", "simsiam", "barlow_twins", "vicreg", "dim")


def synthetic_pair(n: int, d_gex: int, d_img: int, n_latent: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Paired (n, d_gex) and (n, d_img) float32 embeddings sharing ``n_latent`` directions: a latent
    s ~ N(0, I) mapped into each modality by a random linear map, plus unit Gaussian noise. Standardised per
    feature, as the fusion methods see their inputs."""
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, n_latent), dtype=np.float32)
    out = []
    for d in (d_gex, d_img):
        x = s @ rng.standard_normal((n_latent, d), dtype=np.float32)
        x += rng.standard_normal((n, d), dtype=np.float32)
        x -= x.mean(0)
        x /= x.std(0)
        out.append(x)
    return out[0], out[1]


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def benchmark_training(
    method: str,
    n: int = 71_000,
    d_gex: int = 512,
    d_img: int = 1536,
    batch_size: int = 32,
    epochs: int = 1,
    device: str = "cpu",
    max_steps: int | None = None,
    params: dict | None = None,
    threads: int | None = None,
    seed: int = 0,
    data: tuple[np.ndarray, np.ndarray] | None = None,
    warmup_steps: int = 2,
) -> dict:
    """Time ``epochs`` training epochs of ``method`` on synthetic (n, d_gex) / (n, d_img) embeddings.

    Parameters
    ----------
    method : one of :data:`TRAINED`.
    n, d_gex, d_img : size of the synthetic inputs (:func:`synthetic_pair`), unless ``data`` gives them.
    batch_size : optimiser batch (drop_last, as in training; the method's own batch in ``params`` is ignored).
    epochs : epochs timed; each is cut to ``max_steps`` optimiser steps when given (then the rate is scaled
        to full epochs of n // batch_size steps).
    device : "cpu", "cuda", "auto".
    params : training parameters (``training`` block merged with ``training.method_params[method]``);
        defaults of :mod:`.training` and the method otherwise.
    threads : torch intra-op threads for the run (None: leave torch's setting).
    data : (x_gex, x_img) to use instead of synthetic inputs.
    warmup_steps : optimiser steps run (not timed) before timing.

    Returns a dict: method, device, n, d_gex, d_img, batch_size, steps_per_epoch, steps_timed, seconds (wall),
    cpu_seconds (this process), steps_per_s, epochs_per_s, peak_rss_gib (process peak, inputs included),
    peak_gpu_gib (CUDA only, else NaN). The validation pass of the training
    loop (a tenth of the rows, forward only) is not included. Raises ValueError for an untrained method or a
    batch larger than n.
    """
    from . import METHOD_DEFAULTS, build_model

    if method not in TRAINED:
        raise ValueError(f"benchmark_training: {method!r} is not trained by gradient descent; choose from {TRAINED}")
    if data is not None:
        x_gex, x_img = data
        n, d_gex, d_img = x_gex.shape[0], x_gex.shape[1], x_img.shape[1]
    if not 2 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [2, n={n}], got {batch_size}")
    if threads:
        torch.set_num_threads(int(threads))
    dev = resolve_device(device)
    if data is None:
        x_gex, x_img = synthetic_pair(n, d_gex, d_img, seed=seed)
    p = resolve_params(method, {**(params or {}), "batch_size": int(batch_size)}, METHOD_DEFAULTS[method])
    torch.manual_seed(seed)
    model = build_model(method, d_img, d_gex, p)
    xi = torch.as_tensor(x_img, device=dev)
    xg = torch.as_tensor(x_gex, device=dev)
    model.to(dev)
    model.prepare(xi, xg)
    opt = make_optimizer(model, p)
    rng = np.random.default_rng(seed)
    steps_per_epoch = n // batch_size
    if warmup_steps:  # lazy initialisation, first-call kernel selection, allocator growth
        run_epoch(model, opt, xi, xg, rng.permutation(n), batch_size, max_steps=warmup_steps,
                  precision=p["precision"])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    steps = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(int(epochs)):
        steps += len(run_epoch(model, opt, xi, xg, rng.permutation(n), batch_size, max_steps=max_steps,
                               precision=p["precision"]))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {
        "method": method,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "n": int(n),
        "d_gex": int(d_gex),
        "d_img": int(d_img),
        "batch_size": int(batch_size),
        "precision": p["precision"],
        "steps_per_epoch": int(steps_per_epoch),
        "steps_timed": int(steps),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "steps_per_s": steps / seconds,
        "epochs_per_s": steps / seconds / steps_per_epoch,
        "peak_rss_gib": _peak_rss_bytes() / 2**30,
        "peak_gpu_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan"),
    }
    log.info("%s on %s: batch %d, %.1f steps/s, %.4g epochs/s of %d rows (%d steps timed, peak RSS %.2f GiB)",
             method, dev, batch_size, out["steps_per_s"], out["epochs_per_s"], n, steps, out["peak_rss_gib"])
    return out


def run_child(method: str, n: int, d_gex: int, d_img: int, batch_size: int, max_steps: int, device: str = "cpu",
              threads: int | None = 1, params: dict | None = None, timeout: float = 600.0,
              warmup_steps: int = 1) -> dict | None:
    """:func:`benchmark_training` in a child process (``python -m workflow_scripts.methods.benchmark``).

    Returns its result dict, or None when the child failed (out of memory, killed, timed out); the failure is
    logged with the end of its stderr."""
    cmd = [sys.executable, "-m", "workflow_scripts.methods.benchmark", "--method", method, "--n", str(n),
           "--d-gex", str(d_gex), "--d-img", str(d_img), "--batch-size", str(batch_size),
           "--max-steps", str(max_steps), "--warmup-steps", str(warmup_steps), "--device", device,
           "--params", json.dumps(params or {})]
    if threads:
        cmd += ["--threads", str(threads)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s batch %d: timed out after %.0f s", method, batch_size, timeout)
        return None
    if r.returncode != 0:
        log.warning("%s batch %d: child failed (exit %d): %s", method, batch_size, r.returncode,
                    r.stderr.strip().splitlines()[-1:] if r.stderr.strip() else "")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def largest_batch_size(method: str, n: int = 71_000, d_gex: int = 512, d_img: int = 1536, device: str = "cpu",
                       mem_limit_gib: float = 8.0, start: int = 32, max_steps: int = 2, threads: int | None = 1,
                       params: dict | None = None, timeout: float = 600.0) -> tuple[int, list[dict]]:
    """Largest batch among start·2^k (and n itself, one step per epoch) whose training step fits ``mem_limit_gib``.

    Doubles the batch, timing ``max_steps`` steps of each in a child process (:func:`run_child`). Memory is the
    child's peak RSS on CPU (inputs included) or the peak CUDA allocation on a GPU. Before each doubling the
    next peak is extrapolated as if memory grew with the square of the batch (the B × B similarity and critic
    matrices of the contrastive methods); a batch predicted above the limit is not tried. Returns (the largest
    batch that ran within the limit, or 0; the results of every batch tried).
    """
    key = "peak_gpu_gib" if resolve_device(device).type == "cuda" else "peak_rss_gib"
    tried, best, prev, b = [], 0, None, int(start)
    while b <= n:
        res = run_child(method, n, d_gex, d_img, b, max_steps, device, threads, params, timeout)
        if res is None or res[key] > mem_limit_gib:
            break
        tried.append(res)
        best = b
        if b == n:
            break
        nxt = n if b * 2 > n else b * 2  # the full batch as the last candidate
        if prev is not None and res[key] + (nxt / b) ** 2 * (res[key] - prev) > mem_limit_gib:
            break  # quadratic growth: doubling B multiplies the B-dependent part by up to 4
        prev, b = res[key], nxt
    return best, tried


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.methods.benchmark", description=__doc__.split("\n")[0])
    ap.add_argument("--method", required=True, choices=TRAINED)
    ap.add_argument("--n", type=int, default=71_000)
    ap.add_argument("--d-gex", type=int, default=512)
    ap.add_argument("--d-img", type=int, default=1536)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--params", default="{}", help="training parameters as one JSON object")
    args = ap.parse_args(argv)
    res = benchmark_training(args.method, args.n, args.d_gex, args.d_img, args.batch_size, args.epochs, args.device,
                             args.max_steps, json.loads(args.params), args.threads, warmup_steps=args.warmup_steps)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
