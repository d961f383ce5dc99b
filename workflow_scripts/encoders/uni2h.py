"""``uni2h`` — the paper's image encoder: UNI2-h (MahmoodLab), a ViT-giant/14 with 8 register tokens.

Architecture (docs/weights.md, docs/reference.md#uni2-h; the UNI2-h model
card's ``timm_kwargs``): ``timm.create_model("vit_giant_patch14_224", pretrained=False, img_size=224,
patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667*2,
num_classes=0, no_embed_class=True, mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU,
reg_tokens=8, dynamic_img_size=True)`` — 681,394,176 parameters, 343 state-dict tensors.

Input: the spot's H&E patch, ``ctx.patch_um`` µm wide, resampled to ``ctx.patch_px`` (224) px
(:mod:`workflow_scripts.data.patches`), scaled to [0, 1] and normalised with the **ImageNet** mean
(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) — hard-coded, because timm's local default
``pretrained_cfg`` for this architecture name says mean = std = 0.5, which is wrong for UNI2-h
(docs/weights.md, "Known pitfalls").

Output: ``model(x)``, the 1536-d CLS token after the final LayerNorm (``global_pool="token"``); equal to
``forward_features(x)[:, 0]``, which is what cell_synergy takes (docs/reference.md#uni2-h).

Weights: ``params["weights"]`` = path of ``pytorch_model.bin`` (or a ``.safetensors`` export), loaded
with ``strict=True`` into a model built on the meta device (no 2.7 GB random initialisation); a missing
file, a key or a shape mismatch raises :class:`workflow_scripts.encoders.weights.WeightsError` saying where to get
the weights (Hugging Face ``MahmoodLab/UNI2-h``, gated, CC-BY-NC-ND-4.0) and which config key to set.
``weights: null`` with ``allow_random_weights: true`` builds randomly initialised weights — for tests and
benchmarks only (logged as a warning). Note that cell_synergy loads with ``strict=False``; strict loading
here makes a wrong file fail instead of silently leaving layers random.

Parameters (``params``, defaults in :data:`DEFAULTS`)::

    weights: PATH | null          # pytorch_model.bin / .safetensors
    allow_random_weights: false   # only with weights: null (tests, benchmarks)
    precision: auto               # auto (bf16/fp16 autocast on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    tiny: false                   # tests: a 2-block, 32-d model through the same code path
    arch: {}                      # explicit timm kwargs overrides (depth, embed_dim, num_heads, ...)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..io import embedding_frame
from ..data.patches import patch_reader
from .weights import WeightsError, how_to_get, missing_weights_error
from . import EncodeContext, register, register_weights_check
from .torch_utils import (
    merge_arch,
    PatchDataset,
    autocast,
    autocast_dtype,
    compare_state_dicts,
    load_checkpoint_file,
    make_loader,
    normalize_uint8,
    resolve_device,
    seed_everything,
)

log = logging.getLogger(__name__)

TIMM_NAME = "vit_giant_patch14_224"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_PX = 224
N_PARAMS = 681_394_176
EMBED_DIM = 1536

# model-card kwargs that are plain values (the layer classes are added in uni2h_kwargs)
ARCH = {
    "img_size": 224,
    "patch_size": 14,
    "depth": 24,
    "num_heads": 24,
    "init_values": 1e-5,
    "embed_dim": 1536,
    "mlp_ratio": 2.66667 * 2,
    "num_classes": 0,
    "no_embed_class": True,
    "reg_tokens": 8,
    "dynamic_img_size": True,
}
TINY_ARCH = {"depth": 2, "num_heads": 2, "embed_dim": 32}

DEFAULTS = {"weights": None, "allow_random_weights": False, "precision": "auto", "tiny": False, "arch": None}


def uni2h_kwargs(arch: dict | None = None, tiny: bool = False) -> dict:
    """The timm kwargs of UNI2-h (:data:`ARCH` + SwiGLUPacked MLP + SiLU), with ``TINY_ARCH`` and ``arch`` overrides.

    Raises ValueError for override keys that are not UNI2-h architecture kwargs.
    """
    import timm

    kw = merge_arch(ARCH, TINY_ARCH, arch, tiny, "encoders.uni2h.arch")
    kw["mlp_layer"] = timm.layers.SwiGLUPacked
    kw["act_layer"] = torch.nn.SiLU
    return kw


def build_uni2h(arch: dict | None = None, tiny: bool = False, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build the (randomly initialised) UNI2-h architecture with timm on ``device``.

    ``device="meta"`` allocates no memory (parameter counts, key lists, and the target of an
    ``assign=True`` weight load). The local ``pretrained_cfg`` of this timm name (mean/std 0.5) is *not*
    used anywhere: normalisation is :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`.
    """
    import timm

    with torch.device(device):
        model = timm.create_model(TIMM_NAME, pretrained=False, **uni2h_kwargs(arch, tiny))
    return model


def read_uni2h_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a UNI2-h weights file (``pytorch_model.bin`` state dict, ``.safetensors``, or a checkpoint dict
    holding it under ``state_dict`` / ``model``) as ``{key: float32 tensor}``.

    Raises :class:`WeightsError` (with where to get the weights) when the file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise missing_weights_error("uni2h", path)
    try:
        obj = load_checkpoint_file(path)
    except ValueError as e:
        raise WeightsError(f"uni2h: {e}. {how_to_get('uni2h')}") from e
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for k in ("state_dict", "model"):
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"uni2h: {path} does not hold a state dict of tensors. {how_to_get('uni2h')}")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in obj.items()}


def _check_keys(model: torch.nn.Module, sd: dict, path) -> dict:
    report = compare_state_dicts(model.state_dict(), sd)
    if report["missing"] or report["unexpected"] or report["mismatched"]:
        raise WeightsError(
            f"uni2h: {path} does not match the UNI2-h architecture ({TIMM_NAME} with the model-card kwargs): "
            f"{len(report['missing'])} missing keys {report['missing'][:5]}, "
            f"{len(report['unexpected'])} unexpected keys {report['unexpected'][:5]}, "
            f"{len(report['mismatched'])} shape mismatches {report['mismatched'][:3]}. "
            f"Is it the MahmoodLab/UNI2-h pytorch_model.bin? {how_to_get('uni2h')}"
        )
    return report


def load_uni2h(
    weights: str | Path | None,
    device: torch.device | str = "cpu",
    arch: dict | None = None,
    tiny: bool = False,
    allow_random_weights: bool = False,
    seed: int = 0,
) -> torch.nn.Module:
    """UNI2-h in eval mode on ``device`` with the weights at ``weights`` (strict).

    The model is built on the meta device and the checked state dict is assigned to it
    (``load_state_dict(strict=True, assign=True)``), so peak host memory is one copy of the weights.
    ``weights=None`` requires ``allow_random_weights=True`` (random init seeded with ``seed``; logged as a
    warning). Raises :class:`WeightsError` when the file is missing / unreadable / mismatched.
    """
    device = torch.device(device)
    if weights in (None, ""):
        if not allow_random_weights:
            raise missing_weights_error("uni2h", weights)
        log.warning("uni2h: RANDOM WEIGHTS (weights: null, allow_random_weights: true) - for tests/benchmarks only")
        seed_everything(seed)
        model = build_uni2h(arch, tiny, device="cpu")
    else:
        t0 = time.perf_counter()
        sd = read_uni2h_state_dict(weights)
        model = build_uni2h(arch, tiny, device="meta")
        _check_keys(model, sd, weights)
        model.load_state_dict(sd, strict=True, assign=True)
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:  # pragma: no cover - timm ViT has no non-persistent buffers today
            raise WeightsError(f"uni2h: tensors not set by {weights}: {left[:5]}")
        log.info("uni2h: loaded %d tensors from %s in %.1f s (strict)", len(sd), weights, time.perf_counter() - t0)
    n = sum(p.numel() for p in model.parameters())
    log.info("uni2h: %s, %d parameters, output dim %d", TIMM_NAME, n, model.num_features)
    return model.to(device).eval()


@register_weights_check("uni2h")
def check_uni2h_weights(path: str | Path, arch: dict | None = None) -> dict:
    """Key report of a UNI2-h weights file against the architecture built on the meta device.

    Returns ``{"missing": [], "unexpected": [], "mismatched": [], "n_tensors": int, "n_params": int}``;
    raises :class:`WeightsError` on any mismatch (see :func:`load_uni2h`).
    """
    sd = read_uni2h_state_dict(path)
    model = build_uni2h(arch, device="meta")
    report = _check_keys(model, sd, path)
    report.update(n_tensors=len(sd), n_params=int(sum(v.numel() for v in sd.values())))
    return report


@torch.no_grad()
def embed_batch(model: torch.nn.Module, batch_uint8: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """CLS embeddings of a ``(B, 3, H, W)`` uint8 batch: ImageNet normalisation on ``device``, forward under
    autocast ``dtype``; returns ``(B, D)`` float32 on the CPU."""
    x = normalize_uint8(batch_uint8.to(device, non_blocking=True), IMAGENET_MEAN, IMAGENET_STD)
    with autocast(device, dtype):
        out = model(x)
    return out.float().cpu()


def embed_patches(model, dataset: PatchDataset, device, batch_size: int, num_workers: int, precision: str = "auto") -> tuple[np.ndarray, int]:
    """Run ``model`` over every patch of ``dataset``.

    Returns ``(emb, n_border)``: ``emb`` is ``(n_spots_in_reader, D)`` float32 in spot-row order (rows not
    in ``dataset.indices`` stay NaN); ``n_border`` counts patches that extended beyond their image.
    """
    device = torch.device(device)
    dtype = autocast_dtype(device, precision)
    loader = make_loader(dataset, batch_size, num_workers, device)
    emb = None
    n_border = 0
    for x, idx, border in tqdm(loader, desc="uni2h", unit="batch", mininterval=5):
        out = embed_batch(model, x, device, dtype)
        if emb is None:
            emb = np.full((len(dataset.reader), out.shape[1]), np.nan, dtype=np.float32)
        emb[idx.numpy()] = out.numpy()
        n_border += int(border.sum())
    if emb is None:
        emb = np.full((len(dataset.reader), model.num_features), np.nan, dtype=np.float32)
    return emb, n_border


def check_params(params: dict | None) -> dict:
    """Merge ``params`` over :data:`DEFAULTS`; raise ValueError naming unknown keys."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"encoders.uni2h: unknown parameter(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **params}


@register("uni2h", "img", needs_gpu=True, description="UNI2-h ViT-g/14 CLS token of the H&E patch (1536-d)")
def encode_uni2h(adata, params: dict, ctx: EncodeContext) -> pd.DataFrame:
    """UNI2-h CLS embedding of every spot's H&E patch (see the module docstring for every step).

    Parameters
    ----------
    adata : spots AnnData (:mod:`workflow_scripts.data.model`): ``obs.slide``, ``obs.px_x``, ``obs.px_y``
        (px) and ``uns['slides'][slide] = {image_path, um_per_px}``.
    params : see :data:`DEFAULTS`; ``weights`` is the path of ``pytorch_model.bin``.
    ctx : ``device`` (auto/cpu/cuda), ``batch_size``, ``num_workers`` (processes cutting patches),
        ``patch_um`` (µm), ``patch_px`` (224), ``seed`` (random weights only).

    Returns
    -------
    DataFrame (n_spots, 1536) float32 indexed by spot id (``adata.obs_names`` order).

    Raises
    ------
    WeightsError when weights are missing or do not match; ValueError for unknown params;
    FileNotFoundError for a missing slide image.
    """
    p = check_params(params)
    device = resolve_device(ctx.device)
    if ctx.patch_px != INPUT_PX:
        log.warning("uni2h: patches are %d px; the model card uses %d px (dynamic_img_size accepts it)", ctx.patch_px, INPUT_PX)
    model = load_uni2h(p["weights"], device, p["arch"], bool(p["tiny"]), bool(p["allow_random_weights"]), ctx.seed)
    reader = patch_reader(adata, ctx.patch_um, ctx.patch_px)
    ds = PatchDataset(reader)
    t0 = time.perf_counter()
    emb, n_border = embed_patches(model, ds, device, ctx.batch_size, ctx.num_workers, p["precision"])
    dt = time.perf_counter() - t0
    log.info(
        "uni2h: %d patches (%.0f um -> %d px) in %.1f s (%.2f patches/s) on %s, batch %d, %d workers; "
        "%d patches extend beyond their image (white-filled)",
        len(ds), ctx.patch_um, ctx.patch_px, dt, len(ds) / max(dt, 1e-9), device, ctx.batch_size, ctx.num_workers, n_border,
    )
    return embedding_frame(emb, adata.obs_names)
