"""Continued ("post-") training of Nicheformer with its masked-language-model objective.

Used by the data-scaling experiment (docs/reference.md#data-scaling). The reference's post-training is degenerate
(docs/reference.md#flaw-8: one token per cell, no masking, targets = inputs). This module implements Nicheformer's
own MLM objective instead, as described in docs/reference.md#nicheformer (``models/_utils.py::complete_masking`` and
the Lightning training step):

Masking (:func:`mask_tokens`), per token sequence ``[specie, assay, modality, gene tokens…, padding]``
------------------------------------------------------------------------------------------------------
* raw padding id 0 → PAD (1); padding positions and the ``n_context`` leading context positions are never
  selected;
* every other position is selected independently with probability ``masking_p`` (0.15);
* of the selected positions 80 % become MASK (id 0), 10 % a random token drawn uniformly from
  [``random_low``, n_tokens), 10 % keep their token (one uniform draw per position, so the split is exact in
  expectation; the reference's code reaches ≈ 80/10/10 by two successive Bernoulli draws). ``random_low``
  defaults to 30 (= the first gene token, so random replacements are genes); the reference draws from
  [10, n_tokens), which can also insert assay/specie ids — set ``random_low: 10`` to reproduce that;
* targets are the original tokens at the selected positions and −100 (ignored) elsewhere;
* ``padding_mask`` = (token == PAD), the key-padding mask of the encoder (True = ignored).

Loss (:func:`mlm_loss`): cross-entropy over the selected positions only, logits over the n_tokens output ids
(``classifier_head``: Linear(d, n_tokens) + bias).

Optimisation (:func:`posttrain`): AdamW(lr, weight_decay) over all parameters; per-step learning-rate factor
(Nicheformer's ``CosineWarmupScheduler``, docs/reference.md#nicheformer) f(t) = ½(1 + cos(π t / T)) · min(1, t / warmup), with T the
total number of optimiser steps and lr floored at ``min_lr`` (1e-5 in Nicheformer, capped at the base lr);
gradient-norm clipping at ``grad_clip`` (1.0, the reference's trainer setting); bf16 autocast on GPUs that
support it (``precision``). Each epoch visits the training cells in a seeded random order. A held-out
``val_fraction`` of the training cells is masked with the same fixed seed every epoch, so validation losses
are comparable; the state with the lowest validation loss is kept (``early_stopping_patience`` epochs
without improvement stop training). Epoch 0 of the history is the validation loss before post-training.

Configurations (docs/reference.md#data-scaling): cfg1 lr 1e-4 / wd 1e-5; cfg2 lr 2e-5 / wd 5e-4; cfg3 lr 5e-5 / wd 1e-4; batch 32.

Model interface: any ``nn.Module`` ``m`` with ``m(tokens (B, L) int64, padding_mask (B, L) bool) -> logits
(B, L, n_tokens)``; a model with ``supports_select = True`` also takes ``m(tokens, padding_mask, select)`` and
returns the logits of the selected positions only. :class:`NicheformerMLM` wraps
:class:`workflow_scripts.encoders.nicheformer.Nicheformer`
(token + learnable positional embedding → encoder layers with the key-padding mask → ``classifier_head``).

The CLI post-trains on a seeded nested fraction (:func:`workflow_scripts.analysis.scaling.fraction_subset`) of the
cells of an AnnData, tokenised as the Nicheformer encoder does, and writes a Lightning-style checkpoint
(``{"state_dict", "hyper_parameters", "posttrain"}``) that the ``nicheformer`` encoder loads
(``encoders.nicheformer.weights``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..io import setup_logging

log = logging.getLogger(__name__)

MASK_TOKEN = 0
PAD_TOKEN = 1
IGNORE_INDEX = -100

#: The reference's three post-training configurations (docs/reference.md#data-scaling; batch size 32 in all).
CONFIGS = {
    "cfg1": {"lr": 1.0e-4, "weight_decay": 1.0e-5, "batch_size": 32},
    "cfg2": {"lr": 2.0e-5, "weight_decay": 5.0e-4, "batch_size": 32},
    "cfg3": {"lr": 5.0e-5, "weight_decay": 1.0e-4, "batch_size": 32},
}

#: Defaults of the training parameters (``config: scaling.posttrain.train`` merged with a configuration).
DEFAULTS = {
    "lr": 1.0e-4,
    "weight_decay": 1.0e-5,
    "batch_size": 32,
    "max_epochs": 20,
    "max_steps": None,
    "warmup_steps": None,
    "warmup_fraction": 0.05,
    "min_lr": 1.0e-5,
    "masking_p": 0.15,
    "mask_fraction": 0.8,
    "random_fraction": 0.1,
    "random_low": 30,
    "n_context": 3,
    "grad_clip": 1.0,
    "val_fraction": 0.1,
    "early_stopping_patience": 5,
    "precision": "auto",
    "num_workers": 0,
}
HISTORY_COLUMNS = ["epoch", "step", "train_loss", "val_loss", "lr", "n_masked_train"]


def check_params(params: Mapping | None) -> dict:
    """Merge ``params`` over :data:`DEFAULTS`; ValueError naming unknown or invalid keys."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"nicheformer post-training: unknown parameter(s) {unknown}; allowed {sorted(DEFAULTS)} "
                         "(fix config scaling.posttrain.train / scaling.posttrain.configs)")
    p = {**DEFAULTS, **params}
    if not 0 < float(p["masking_p"]) < 1:
        raise ValueError(f"masking_p must be in (0, 1), got {p['masking_p']!r}")
    if float(p["mask_fraction"]) < 0 or float(p["random_fraction"]) < 0 or \
            float(p["mask_fraction"]) + float(p["random_fraction"]) > 1:
        raise ValueError("mask_fraction and random_fraction must be >= 0 with a sum <= 1")
    for k in ("batch_size", "max_epochs"):
        if int(p[k]) < 1:
            raise ValueError(f"{k} must be >= 1, got {p[k]!r}")
    if float(p["lr"]) <= 0 or float(p["weight_decay"]) < 0:
        raise ValueError("lr must be > 0 and weight_decay >= 0")
    if not 0 <= float(p["val_fraction"]) < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {p['val_fraction']!r}")
    return p


# ----------------------------------------------------------------------------------------------- objective
def mask_tokens(tokens: torch.Tensor, n_tokens: int, masking_p: float = 0.15, n_context: int = 3,
                mask_fraction: float = 0.8, random_fraction: float = 0.1, random_low: int = 30,
                generator: torch.Generator | None = None):
    """BERT-style masking of Nicheformer token sequences (module docstring).

    Parameters
    ----------
    tokens : (B, L) int64; padding is 0 (raw) or 1 (PAD); the first ``n_context`` positions are context tokens.
    n_tokens : size of the output vocabulary; random replacements are drawn from [random_low, n_tokens).
    generator : torch RNG (on the tokens' device) for reproducible masks.

    Returns ``(inputs, targets, padding_mask)``: inputs (B, L) int64 with MASK (0) / random / kept tokens at the
    selected positions and PAD (1) at padding; targets (B, L) int64 (original token where selected, −100
    elsewhere); padding_mask (B, L) bool (True at padding).
    Raises ValueError when ``random_low`` ≥ ``n_tokens``.
    """
    if random_low >= n_tokens:
        raise ValueError(f"random_low {random_low} must be < n_tokens {n_tokens}")
    dev = tokens.device
    t = torch.where(tokens == 0, torch.full_like(tokens, PAD_TOKEN), tokens)
    pad = t == PAD_TOKEN
    eligible = ~pad
    eligible[:, :n_context] = False
    sel = (torch.rand(t.shape, generator=generator, device=dev) < masking_p) & eligible
    u = torch.rand(t.shape, generator=generator, device=dev)
    to_mask = sel & (u < mask_fraction)
    to_rand = sel & (u >= mask_fraction) & (u < mask_fraction + random_fraction)
    rand_tok = torch.randint(int(random_low), int(n_tokens), t.shape, generator=generator, device=dev)
    inputs = torch.where(to_mask, torch.full_like(t, MASK_TOKEN), t)
    inputs = torch.where(to_rand, rand_tok, inputs)
    targets = torch.where(sel, t, torch.full_like(t, IGNORE_INDEX))
    return inputs, targets, pad


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (..., V) against ``targets`` (...) over positions with target ≠ −100
    ((B, L, V) with (B, L), or the selected positions only: (N, V) with (N,)).

    A batch without any selected position gives a zero loss that keeps the graph (no NaN).
    """
    if not (targets != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Nicheformer's CosineWarmupScheduler factor (docs/reference.md#nicheformer): ½(1 + cos(π·step/total)) × min(1, step/warmup)."""
    f = 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    if warmup > 0 and step <= warmup:
        f *= step / warmup
    return f


class NicheformerMLM(nn.Module):
    """MLM head view of a :class:`workflow_scripts.encoders.nicheformer.Nicheformer`.

    ``forward(tokens (B, L), padding_mask (B, L), select=None)``: token + learnable positional embedding
    (positions 0 … L−1), dropout, every encoder layer with ``src_key_padding_mask=padding_mask``, then
    ``classifier_head`` (Linear(d, n_tokens) with its bias) → logits (B, L, n_tokens). With a boolean ``select``
    (B, L) only the selected positions go through the head → (n_selected, n_tokens): the same loss at a fraction
    of the memory (the full head output is B × L × 20,340 values). MASK (0) is an ordinary embedding row here;
    padding is given only by ``padding_mask`` (unlike ``Nicheformer.embed``, which maps id 0 to padding).
    """

    supports_select = True

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def n_tokens(self) -> int:
        return int(self.model.classifier_head.out_features)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor,
                select: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        length = tokens.shape[1]
        if length > m.positional_embedding.num_embeddings:
            raise ValueError(f"sequence length {length} exceeds the context length {m.positional_embedding.num_embeddings}")
        pos = torch.arange(length, device=tokens.device)
        h = m.dropout(m.embeddings(tokens) + m.positional_embedding(pos).unsqueeze(0))
        for layer in m.encoder.layers:
            h = layer(h, src_key_padding_mask=padding_mask, is_causal=False)
        if select is not None:
            h = h[select]
        return m.classifier_head(h)


# ----------------------------------------------------------------------------------------------- training
def _pad_batch(seqs: Sequence[torch.Tensor]) -> torch.Tensor:
    length = max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), PAD_TOKEN, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _get(dataset, i: int) -> torch.Tensor:
    item = dataset[int(i)]
    t = item[0] if isinstance(item, tuple) else item
    return torch.as_tensor(t, dtype=torch.long)  # raw padding (0) is kept; mask_tokens turns it into PAD


def _batches(idx: np.ndarray, bs: int) -> list[np.ndarray]:
    return [idx[i: i + bs] for i in range(0, len(idx), bs)]


def posttrain(model: nn.Module, dataset, params: Mapping, seed: int = 0, device: str | torch.device = "cpu",
              indices: np.ndarray | None = None, progress: bool = True) -> pd.DataFrame:
    """Continue training ``model`` in place with the MLM objective (module docstring); restores the best state.

    Parameters
    ----------
    model : ``m(tokens, padding_mask) -> logits (B, L, n_tokens)``; n_tokens (the range of random
        replacements) is read from the logits of a first forward pass.
    dataset : indexable; item i is a 1-D int64 token tensor (or a tuple whose first element is one), context
        tokens first, optionally right-padded with 0/1 (e.g. :class:`~workflow_scripts.encoders.nicheformer.CellTokenDataset`).
    params : see :data:`DEFAULTS`.
    indices : the dataset items to train on (default all); ``val_fraction`` of them is held out (seeded).

    Returns the history (:data:`HISTORY_COLUMNS`, one row per epoch; epoch 0 = validation before training).
    Raises ValueError for invalid parameters or fewer than 2 items.
    """
    p = check_params(params)
    dev = torch.device(device)
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    if len(idx) < 2:
        raise ValueError(f"post-training needs at least 2 cells, got {len(idx)}")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    perm = rng.permutation(idx)
    n_val = int(round(float(p["val_fraction"]) * len(idx)))
    n_val = min(n_val, len(idx) - 1)
    val_idx, tr_idx = np.sort(perm[:n_val]), perm[n_val:]
    bs = int(p["batch_size"])
    steps_per_epoch = math.ceil(len(tr_idx) / bs)
    total = int(p["max_steps"]) if p["max_steps"] else steps_per_epoch * int(p["max_epochs"])
    warmup = int(p["warmup_steps"]) if p["warmup_steps"] is not None else int(round(float(p["warmup_fraction"]) * total))
    base_lr = float(p["lr"])
    floor = min(float(p["min_lr"]), base_lr) / base_lr
    log.info("MLM post-training: %d training and %d validation cells, batch %d, %d steps (%d per epoch), warm-up %d, "
             "lr %.3g, weight decay %.3g, masking p %.3g (%.0f/%.0f/%.0f)", len(tr_idx), len(val_idx), bs, total,
             steps_per_epoch, warmup, base_lr, p["weight_decay"], p["masking_p"], 100 * p["mask_fraction"],
             100 * p["random_fraction"], 100 * (1 - p["mask_fraction"] - p["random_fraction"]))
    model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=float(p["weight_decay"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(lr_factor(s, warmup, total), floor))
    amp = None
    if dev.type == "cuda" and str(p["precision"]) in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        amp = torch.bfloat16
    gen = torch.Generator(device=dev)
    mask_kw = dict(masking_p=float(p["masking_p"]), n_context=int(p["n_context"]),
                   mask_fraction=float(p["mask_fraction"]), random_fraction=float(p["random_fraction"]),
                   random_low=int(p["random_low"]))

    def run_batch(b: np.ndarray, g: torch.Generator, n_tok: int):
        tokens = _pad_batch([_get(dataset, i) for i in b]).to(dev)
        inputs, targets, pad = mask_tokens(tokens, n_tok, generator=g, **mask_kw)
        sel = targets != IGNORE_INDEX
        with torch.autocast(device_type=dev.type, dtype=amp, enabled=amp is not None):
            if select_ok:  # logits of the selected positions only (same loss, far less memory)
                logits = model(inputs, pad, sel)
                targets = targets[sel]
            else:
                logits = model(inputs, pad)
        return mlm_loss(logits, targets), int(sel.sum())

    select_ok = bool(getattr(model, "supports_select", False))
    with torch.no_grad():
        probe = _pad_batch([_get(dataset, idx[0])]).to(dev)
        n_tok = int(model(probe, probe == PAD_TOKEN).shape[-1])

    def validate() -> float:
        if not len(val_idx):
            return float("nan")
        model.eval()
        g = torch.Generator(device=dev)
        g.manual_seed(int(seed) + 104729)
        tot, cnt = 0.0, 0
        with torch.no_grad():
            for b in _batches(val_idx, bs):
                loss, n = run_batch(b, g, n_tok)
                tot += float(loss) * n
                cnt += n
        model.train()
        return tot / cnt if cnt else float("nan")

    rows = [(0, 0, float("nan"), validate(), float(opt.param_groups[0]["lr"]), 0)]
    best, best_state, since, step = rows[0][3], None, 0, 0
    log.info("epoch 0: validation MLM loss %.4f (before post-training)", best)
    model.train()
    for epoch in range(1, int(p["max_epochs"]) + 1):
        order = rng.permutation(tr_idx)
        gen.manual_seed(int(seed) * 1_000_003 + epoch)
        losses, n_masked = [], 0
        for b in tqdm(_batches(order, bs), desc=f"MLM epoch {epoch}", leave=False, file=sys.stderr,
                      mininterval=2.0, disable=not progress):
            if step >= total:
                break
            loss, n = run_batch(b, gen, n_tok)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if p["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(p["grad_clip"]))
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            n_masked += n
        val = validate()
        rows.append((epoch, step, float(np.mean(losses)) if losses else float("nan"), val,
                     float(opt.param_groups[0]["lr"]), n_masked))
        log.info("epoch %d (step %d): train MLM loss %.4f, validation %.4f, lr %.3g", epoch, step, rows[-1][2], val,
                 rows[-1][4])
        if not math.isfinite(rows[-1][2]):
            log.error("training loss is %s at epoch %d; stopping", rows[-1][2], epoch)
            break
        if math.isfinite(val) and (not math.isfinite(best) or val < best):
            best, since = val, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if len(val_idx) and since >= int(p["early_stopping_patience"]):
                log.info("early stopping at epoch %d (no improvement of the validation loss for %d epochs)", epoch, since)
                break
        if step >= total:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
        log.info("restored the state with the lowest validation loss %.4f", best)
    elif len(val_idx):
        log.warning("validation loss never improved on the starting model; keeping the final state")
    model.eval()
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


# ----------------------------------------------------------------------------------------------- CLI
def save_checkpoint(model: nn.Module, path: str | Path, meta: Mapping) -> None:
    """Write a Lightning-style checkpoint ``{"state_dict", "hyper_parameters", "posttrain"}`` readable by
    :func:`workflow_scripts.encoders.nicheformer.read_nicheformer_weights` (``torch.load(weights_only=True)``)."""
    hp = dict(getattr(model, "hparams", {}))
    hp.update(learnable_pe=True, specie=True, assay=True, modality=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "hyper_parameters": hp, "posttrain": json.loads(json.dumps(dict(meta), default=str))}, path)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m workflow_scripts.analysis.nicheformer_mlm --cells CELLS.h5ad --encoder-params JSON --config NAME
    --params JSON --fraction F --seed S [--device auto] --out CKPT --history TSV --log LOG``.

    ``--encoder-params``: ``encoders.nicheformer`` (weights of the model to continue from, vocabulary,
    technology mean, gene map, context tokens, max_seq_len; tokenisation as the encoder). ``--config``: one of
    :data:`CONFIGS` (or ``custom``) whose lr / weight decay / batch size are the base; ``--params`` (config
    ``scaling.posttrain.train`` merged with ``scaling.posttrain.configs.<name>``) overrides them.
    """
    from ..encoders import nicheformer as nf
    from ..encoders.torch_utils import resolve_device, resolve_resource
    from .scaling import fraction_subset

    import anndata as ad

    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.analysis.nicheformer_mlm", description=__doc__.split("\n")[0])
    ap.add_argument("--cells", required=True, help="AnnData of training cells (raw counts, gene symbols or Ensembl ids)")
    ap.add_argument("--encoder-params", default="{}", help="JSON, config encoders.nicheformer")
    ap.add_argument("--config", default="cfg1", help=f"one of {sorted(CONFIGS)} or 'custom'")
    ap.add_argument("--params", default="{}", help="JSON training parameters; they override the configuration's")
    ap.add_argument("--fraction", type=float, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True, help="output checkpoint (.ckpt)")
    ap.add_argument("--history", required=True, help="output TSV, one row per epoch")
    ap.add_argument("--log", default=None)
    args = ap.parse_args(argv)
    setup_logging(args.log)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        enc = nf.check_params(json.loads(args.encoder_params))
        over = json.loads(args.params)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--encoder-params/--params: not valid JSON ({e})")
    if args.config not in CONFIGS and args.config != "custom":
        raise SystemExit(f"--config {args.config!r}: choose one of {sorted(CONFIGS)} or 'custom'")
    params = check_params({**CONFIGS.get(args.config, {}), **over})
    device = resolve_device(args.device)
    if not Path(args.cells).exists():
        raise FileNotFoundError(f"training cells not found: {args.cells} (config scaling.posttrain.train_cells)")
    cells = ad.read_h5ad(args.cells)
    model, report = nf.load_nicheformer(enc["weights"], enc["arch"], bool(enc["tiny"]), "cpu",
                                        bool(enc["allow_random_weights"]), args.seed)
    vocab_path = resolve_resource(enc["vocabulary"], "Nicheformer vocabulary (model.h5ad)", "encoders.nicheformer.vocabulary")
    vocab = nf.load_vocabulary(vocab_path)
    mean = nf.load_technology_mean(enc["technology_mean"], len(vocab), vocab_path.parent)
    context = nf.context_tokens(enc["specie"], enc["assay"], enc["modality"])
    Xv, _, keep = nf.prepare_cells(cells, None, enc, vocab)
    sub = keep[fraction_subset(len(keep), args.fraction, args.seed)]
    log.info("fraction %g, seed %d: %d of %d usable cells post-train the model (config %s: %s)", args.fraction,
             args.seed, len(sub), len(keep), args.config, {k: params[k] for k in ("lr", "weight_decay", "batch_size")})
    ds = nf.CellTokenDataset(Xv, mean, context, int(enc["max_seq_len"]))
    params["n_context"] = len(context)
    hist = posttrain(NicheformerMLM(model), ds, params, args.seed, device, indices=sub)
    model.eval()
    meta = {"config": args.config, "fraction": args.fraction, "seed": args.seed, "n_cells": int(len(sub)),
            "n_usable_cells": int(len(keep)), "params": params, "source_weights": str(enc["weights"]),
            "best_val_loss": float(np.nanmin(hist["val_loss"])) if hist["val_loss"].notna().any() else None}
    save_checkpoint(model, args.out, meta)
    hist.insert(0, "n_cells", len(sub))
    hist.insert(0, "seed", args.seed)
    hist.insert(0, "fraction", args.fraction)
    hist.insert(0, "config", args.config)
    Path(args.history).parent.mkdir(parents=True, exist_ok=True)
    hist.to_csv(args.history, sep="\t", index=False)
    log.info("wrote %s and %s", args.out, args.history)


if __name__ == "__main__":
    main()
