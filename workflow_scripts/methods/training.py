"""Training loop shared by the neural fusion methods.

Follows the reference's ``AlignmentTrainer`` (docs/reference.md#alignment).

What is reproduced from the reference
-------------------------------------
* AdamW(lr, weight_decay) over all trainable parameters; ``CosineAnnealingLR(T_max=max_epochs)`` stepped
  once per epoch; no warm-up, no gradient clipping, no mixed precision (``precision: bf16`` is an opt-in
  deviation, :func:`autocast`).
* Mini-batches of ``batch_size`` drawn from a shuffled order with ``drop_last=True``; when fewer than
  ``batch_size`` spots are available the batch holds all of them (so that there is always one batch).
* Validation: unsupervised methods (comm, simclr, barlow_twins, vicreg, byol, simsiam) train on 100 % of the
  spots and validate on a random ``val_fraction_unsupervised`` subset of the same spots (it overlaps training,
  as in the reference); the other methods (dcca, dim; cca in :mod:`.cca`) hold out ``val_fraction`` of the spots.
  Validation batches also use ``drop_last`` with the same batch size.
* ``val_loss_smooth``: exponential moving average of the per-epoch mean validation loss,
  s_t = a·s_{t−1} + (1−a)·v_t with a = ``ema_smoothing`` (0.9) and s_1 = v_1. Validation losses that are NaN,
  ±inf or > 1e6 are skipped (the smoothed value is left unchanged and the epoch counts as "no improvement").
* Early stopping when ``val_loss_smooth`` has not strictly decreased for ``early_stopping_patience`` epochs;
  the state with the best smoothed validation loss is kept and restored at the end (``ModelCheckpoint`` with
  ``monitor=val_loss_smooth, mode=min``). ``min_delta`` (default 0, the reference) makes the patience count
  only improvements larger than ``min_delta``·|reference value|, where the reference value is the smoothed
  loss at the last such improvement (Lightning ``EarlyStopping(min_delta)``, made relative so that one value
  suits objectives on different scales: DCCA's loss is about −31, SimCLR's about 2); the restored state is
  still the one with the lowest smoothed loss.

Deliberate simplifications (documented deviations)
--------------------------------------------------
* Validation once per epoch (the reference validates twice per epoch, ``val_check_interval=0.5``, and sets the
  early-stopping patience to max(patience, 50)/0.5 checks ≈ 50 epochs); here the patience is in epochs.
* The random generator is the run's seed (reference: fixed seed 42, ``RandomState(42)`` for the splits).
* DCCA's ``limit_val_batches=0.1`` is not reproduced (the whole validation split is used).
* Validation runs in ``model.eval()`` mode inside :func:`torch.random.fork_rng` re-seeded with a fixed value, so
  stochastic objectives (CoMM with augmentation) see the same random draws in every validation epoch and the
  training random stream is not perturbed by validation.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .base import AlignModel

log = logging.getLogger(__name__)

#: Defaults of the keys of the config's ``training`` block (config/config.yaml); used when a key is absent.
COMMON_DEFAULTS = {
    "batch_size": 32,
    "max_epochs": 100,
    "lr": 1.0e-4,
    "weight_decay": 1.0e-5,
    "projection_dim": 256,
    "early_stopping_patience": 50,
    "min_delta": 0.0,
    "ema_smoothing": 0.9,
    "val_fraction": 0.15,
    "val_fraction_unsupervised": 0.1,
    "standardize": True,
    "precision": "fp32",
}
#: ``training.precision`` values: fp32 (reference) or bf16 (autocast of the objective, :func:`autocast`).
PRECISIONS = ("fp32", "bf16")
#: Keys of the training block that are accepted but not used by fit_method (handled by the caller).
IGNORED_KEYS = ("device", "threads", "method_params")

#: Methods trained on 100 % of the spots and validated on an overlapping random subset (docs/reference.md#alignment).
UNSUPERVISED_METHODS = ("comm", "simclr", "barlow_twins", "vicreg", "byol", "simsiam")
#: Methods that hold out ``val_fraction`` of the spots for validation (docs/reference.md#alignment).
HELD_OUT_METHODS = ("cca", "dcca", "dim")

MAX_VALID_LOSS = 1e6
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_loss_smooth", "lr"]


def resolve_params(method: str, params: dict | None, method_defaults: dict) -> dict:
    """Merge ``params`` over :data:`COMMON_DEFAULTS` and the method's own defaults and check the values.

    ``params`` is the config's ``training`` block updated with ``training.method_params[method]``.
    Raises ValueError naming the offending key on unknown keys or out-of-range values.
    """
    params = dict(params or {})
    allowed = set(COMMON_DEFAULTS) | set(method_defaults) | set(IGNORED_KEYS)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(
            f"unknown training parameter(s) {unknown} for method {method!r}; allowed keys: {sorted(allowed)} "
            f"(fix config `training` / `training.method_params.{method}`)"
        )
    out = {**COMMON_DEFAULTS, **method_defaults}
    out.update({k: v for k, v in params.items() if k not in IGNORED_KEYS})
    for key in ("batch_size", "max_epochs", "projection_dim"):
        if int(out[key]) != out[key] or int(out[key]) < 1:
            raise ValueError(f"training parameter {key!r} must be a positive integer, got {out[key]!r}")
        out[key] = int(out[key])
    if int(out["early_stopping_patience"]) < 1:
        raise ValueError(f"early_stopping_patience must be >= 1, got {out['early_stopping_patience']!r}")
    out["early_stopping_patience"] = int(out["early_stopping_patience"])
    if not 0.0 <= float(out["min_delta"]) < 1.0:
        raise ValueError(f"min_delta (relative) must be in [0, 1), got {out['min_delta']!r}")
    for key in ("val_fraction", "val_fraction_unsupervised"):
        if not 0.0 <= float(out[key]) < 1.0:
            raise ValueError(f"training parameter {key!r} must be in [0, 1), got {out[key]!r}")
    if out["precision"] not in PRECISIONS:
        raise ValueError(f"training parameter 'precision' must be one of {PRECISIONS}, got {out['precision']!r}")
    if not isinstance(out["standardize"], bool):
        raise ValueError(f"training parameter 'standardize' must be true or false, got {out['standardize']!r}")
    if not 0.0 <= float(out["ema_smoothing"]) < 1.0:
        raise ValueError(f"ema_smoothing must be in [0, 1), got {out['ema_smoothing']!r}")
    if float(out["lr"]) < 0 or float(out["weight_decay"]) < 0:
        raise ValueError(f"lr and weight_decay must be >= 0, got {out['lr']!r}, {out['weight_decay']!r}")
    return out


def resolve_device(device: str | None) -> torch.device:
    """"auto" (or None) → cuda when available, else cpu; any other string is passed to ``torch.device``."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device auto or cpu")
    return dev


def split_indices(n: int, method: str, params: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation spot indices for ``method`` (docs/reference.md#alignment).

    Unsupervised methods: train = all n spots, val = a random ``val_fraction_unsupervised`` subset (overlapping).
    Others: a random permutation; the first round(``val_fraction``·n) spots are validation, the rest training.
    Returns (train_idx, val_idx), int64 arrays (val_idx sorted).
    """
    if method in UNSUPERVISED_METHODS:
        n_val = int(round(float(params["val_fraction_unsupervised"]) * n))
        val = np.sort(rng.choice(n, size=n_val, replace=False)) if n_val else np.empty(0, dtype=np.int64)
        return np.arange(n, dtype=np.int64), val.astype(np.int64)
    n_val = int(round(float(params["val_fraction"]) * n))
    perm = rng.permutation(n)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


@dataclass
class MonitorUpdate:
    """Result of one :meth:`SmoothedEarlyStopping.update`: smoothed value, improvement, stop flag."""

    smooth: float
    improved: bool
    stop: bool


class SmoothedEarlyStopping:
    """EMA-smoothed validation monitor with best-state tracking and patience (docs/reference.md#alignment).

    ``smoothing`` a: s_t = a·s_{t−1} + (1−a)·v_t, s_1 = v_1. A loss v that is NaN/inf or > 1e6 is skipped.
    ``improved`` when s_t < best (strict): the state to keep. The patience counter is reset only by a
    significant improvement, s_t < r − ``min_delta``·|r| with r the smoothed loss at the previous significant
    improvement (r = best when ``min_delta`` = 0, the reference); ``stop`` once ``patience`` consecutive
    updates were not significant improvements.
    """

    def __init__(self, smoothing: float = 0.9, patience: int = 50, min_delta: float = 0.0):
        self.smoothing = float(smoothing)
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.smooth = math.nan
        self.best = math.inf
        self.best_epoch = 0
        self.reference = math.inf
        self.wait = 0
        self.n_skipped = 0

    @staticmethod
    def is_valid(value: float) -> bool:
        return math.isfinite(value) and value <= MAX_VALID_LOSS

    def update(self, value: float, epoch: int) -> MonitorUpdate:
        """Feed the mean validation loss of ``epoch`` (1-based)."""
        valid = self.is_valid(value)
        if valid:
            a = self.smoothing
            self.smooth = value if math.isnan(self.smooth) else a * self.smooth + (1 - a) * value
        else:
            self.n_skipped += 1
        improved = valid and self.smooth < self.best
        if improved:
            self.best, self.best_epoch = self.smooth, epoch
        ref = self.reference
        if valid and (math.isinf(ref) or self.smooth < ref - self.min_delta * abs(ref)):
            self.reference, self.wait = self.smooth, 0
        else:
            self.wait += 1
        return MonitorUpdate(self.smooth, improved, self.wait >= self.patience)


def _batches(idx: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split ``idx`` in order into full batches (drop_last); ≥ 1 batch (of all of idx) if idx is non-empty."""
    if len(idx) == 0:
        return []
    bs = min(batch_size, len(idx))
    return [idx[i * bs : (i + 1) * bs] for i in range(len(idx) // bs)]


def _state_copy(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def autocast(device: torch.device, precision: str = "fp32"):
    """Context in which the training objective is computed: ``torch.autocast(device.type, torch.bfloat16)`` for
    ``precision="bf16"`` (matrix products in bfloat16 with fp32 accumulation; the weights, gradients and AdamW
    state stay fp32), a no-op for ``"fp32"`` (the reference: no mixed precision). bf16 is a deviation from the
    reference: it roughly halves CoMM's training time on CPUs with AVX512-BF16/AMX and on GPUs (BENCHMARKS.md),
    while the objective's values differ by bfloat16 rounding (8 bits of mantissa)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def evaluate_loss(model: AlignModel, x_img: torch.Tensor, x_gex: torch.Tensor, batches: list, seed: int,
                  precision: str = "fp32") -> float:
    """Mean objective over ``batches`` (index arrays) in eval mode, no_grad, with a forked RNG seeded by ``seed``,
    under :func:`autocast` of ``precision``."""
    if not batches:
        return math.nan
    was_training = model.training
    model.eval()
    devices = [x_img.device] if x_img.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with autocast(x_img.device, precision):
            losses = [float(model.loss(x_img[b], x_gex[b])) for b in batches]
    model.train(was_training)
    return float(np.mean(losses))


@torch.no_grad()
def predict(model: AlignModel, x_img: torch.Tensor, x_gex: torch.Tensor, batch_size: int = 1024):
    """Z3 (n, z3_dim) and the two views (n, view_dim) as float32 numpy arrays, eval mode, in batches."""
    model.eval()
    z3, v_img, v_gex = [], [], []
    for s in range(0, x_img.shape[0], batch_size):
        xi, xg = x_img[s : s + batch_size], x_gex[s : s + batch_size]
        z3.append(model.embed(xi, xg).float().cpu())
        a, b = model.views(xi, xg)
        v_img.append(a.float().cpu())
        v_gex.append(b.float().cpu())
    cat = lambda xs: torch.cat(xs).numpy().astype(np.float32)  # noqa: E731
    return cat(z3), (cat(v_img), cat(v_gex))


def make_optimizer(model: AlignModel, params: dict) -> torch.optim.Optimizer:
    """AdamW(lr, weight_decay) over the trainable parameters (reference, docs/reference.md#alignment).

    The multi-tensor (``foreach``) implementation does the same arithmetic as the per-parameter loop in fewer
    calls (identical results on CPU; the default on CUDA).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=float(params["lr"]), weight_decay=float(params["weight_decay"]),
                             foreach=True)


def run_epoch(model: AlignModel, opt: torch.optim.Optimizer, x_img: torch.Tensor, x_gex: torch.Tensor,
              order: np.ndarray, batch_size: int, max_steps: int | None = None,
              precision: str = "fp32") -> list[float]:
    """One training epoch: full batches of ``batch_size`` consecutive rows of ``order`` (drop_last).

    ``x_img`` (n, d_img), ``x_gex`` (n, d_gex): tensors on the training device; ``order``: the shuffled row
    indices of the epoch; at least one batch (of all rows) when fewer than ``batch_size`` are given.
    ``max_steps``: stop after that many batches (benchmarks only); ``precision``: the objective's :func:`autocast`.
    Returns the per-batch training losses.

    The rows are gathered once per epoch and the batches are slices of that copy (the values of indexing every
    batch separately); the losses stay on the device until the end of the epoch, so there is one
    device-to-host transfer per epoch instead of one per step.
    """
    model.train()
    bs = min(int(batch_size), len(order))
    idx = torch.as_tensor(np.asarray(order, dtype=np.int64), device=x_img.device)
    xi, xg = x_img[idx], x_gex[idx]
    n_steps = len(order) // bs if max_steps is None else min(len(order) // bs, int(max_steps))
    losses = []
    for i in range(n_steps):
        with autocast(x_img.device, precision):
            loss = model.loss(xi[i * bs : (i + 1) * bs], xg[i * bs : (i + 1) * bs])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.after_step()
        losses.append(loss.detach().float())
    return torch.stack(losses).tolist()


@dataclass
class TrainOutcome:
    """What :func:`train_model` returns besides the (best-state) model."""

    history: pd.DataFrame
    best_epoch: int
    best_val_loss_smooth: float
    n_epochs: int
    stopped_early: bool
    n_train: int
    n_val: int
    batch_size: int


def train_model(
    model: AlignModel,
    x_img: np.ndarray,
    x_gex: np.ndarray,
    params: dict,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> TrainOutcome:
    """Train ``model`` in place with the reference loop (module docstring) and restore its best state.

    ``x_img`` (n, d_img) and ``x_gex`` (n, d_gex) are the frozen embeddings (float32, finite). ``params`` must be
    resolved (:func:`resolve_params`). The same ``seed`` gives the same split, batches and result.
    Raises ValueError when fewer than 2 training spots are available.
    """
    method = model.method
    n = x_img.shape[0]
    rng = np.random.default_rng(seed)
    train_idx, val_idx = split_indices(n, method, params, rng)
    if len(train_idx) < 2:
        raise ValueError(f"{method}: only {len(train_idx)} training spots; at least 2 are needed")
    if 0 < len(val_idx) < 2:
        log.warning("%s: validation split has %d spot(s) (< 2); monitoring the training loss instead", method,
                    len(val_idx))
        val_idx = val_idx[:0]
    bs = int(params["batch_size"])
    if len(train_idx) < bs:
        log.warning("%s: %d training spots < batch_size %d; using one batch of %d", method, len(train_idx), bs,
                    len(train_idx))
    n_drop = len(train_idx) % min(bs, len(train_idx))
    val_batches = _batches(val_idx, bs)
    n_val_used = sum(len(b) for b in val_batches)
    log.info(
        "%s: %d spots, train %d (%d batches of %d per epoch, %d dropped by drop_last), validation %d%s",
        method, n, len(train_idx), len(train_idx) // min(bs, len(train_idx)), min(bs, len(train_idx)), n_drop,
        len(val_idx), (f" ({len(val_idx) - n_val_used} dropped by drop_last)" if len(val_idx) - n_val_used else ""),
    )
    if not val_batches:
        log.warning("%s: no validation split (val fraction 0); early stopping monitors the training loss", method)

    xi = torch.as_tensor(np.ascontiguousarray(x_img, dtype=np.float32), device=device)
    xg = torch.as_tensor(np.ascontiguousarray(x_gex, dtype=np.float32), device=device)
    model.to(device)
    model.prepare(xi[train_idx], xg[train_idx])
    opt = make_optimizer(model, params)
    max_epochs = int(params["max_epochs"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_epochs)
    monitor = SmoothedEarlyStopping(params["ema_smoothing"], params["early_stopping_patience"], params["min_delta"])
    val_seed = int(seed) + 7919  # fixed per run: every validation epoch sees the same random draws

    rows, best_state, stopped_early = [], None, False
    bar = tqdm(range(1, max_epochs + 1), desc=method, file=sys.stderr, mininterval=1.0, disable=not progress,
               leave=False)
    for epoch in bar:
        losses = run_epoch(model, opt, xi, xg, rng.permutation(train_idx), bs, precision=params["precision"])
        train_loss = float(np.mean(losses))
        lr = float(opt.param_groups[0]["lr"])
        val_loss = (evaluate_loss(model, xi, xg, val_batches, val_seed, params["precision"]) if val_batches
                    else train_loss)
        sched.step()
        upd = monitor.update(val_loss, epoch)
        if upd.improved:
            best_state = _state_copy(model)
        rows.append((epoch, train_loss, val_loss, upd.smooth, lr))
        bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}", refresh=False)
        if not math.isfinite(train_loss):
            log.error("%s: training loss became %s at epoch %d; stopping and keeping the best state", method,
                      train_loss, epoch)
            break
        if upd.stop:
            stopped_early = True
            log.info("%s: early stopping at epoch %d (no improvement of val_loss_smooth by more than %g relative for "
                     "%d epochs)", method, epoch, monitor.min_delta, monitor.patience)
            break
    bar.close()
    if monitor.n_skipped:
        log.warning("%s: %d of %d validation losses were NaN/inf/>1e6 and skipped", method, monitor.n_skipped,
                    len(rows))
    if best_state is None:
        log.warning("%s: no valid validation loss was ever seen; keeping the final state", method)
    else:
        model.load_state_dict(best_state)
    model.eval()
    history = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    log.info("%s: %d epochs, best epoch %d (val_loss_smooth %.6g)", method, len(rows), monitor.best_epoch, monitor.best)
    return TrainOutcome(
        history=history,
        best_epoch=int(monitor.best_epoch),
        best_val_loss_smooth=float(monitor.best),
        n_epochs=len(rows),
        stopped_early=stopped_early,
        n_train=len(train_idx),
        n_val=len(val_idx),
        batch_size=min(bs, len(train_idx)),
    )
