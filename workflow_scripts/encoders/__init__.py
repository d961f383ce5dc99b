"""Registry of unimodal encoders.

An encoder maps a spots AnnData (:mod:`workflow_scripts.data.model`) to an embedding table
(:func:`workflow_scripts.io.embedding_frame`: spots × dims, indexed by spot id). Encoders register
themselves with :func:`register`; the embed rule and the CLI (``python -m workflow_scripts.encoders.embed``)
look them up by name, so new encoders need no change to the rules.

Encoder call signature::

    fn(adata: AnnData, params: dict, ctx: EncodeContext) -> pandas.DataFrame

``params`` comes from the config (``encoders.<name>`` merged with per-dataset overrides);
``ctx`` carries the device, batch size, number of workers, seed and the patch geometry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

MODALITIES = ("gex", "img")
#: modality of an encoder that serves both modalities (``precomputed``); the embed CLI passes the modality it is
#: run for in ``ctx.extra['modality']``
ANY_MODALITY = "any"


@dataclass
class EncodeContext:
    """Run-time settings every encoder may use.

    ``patch_um``: physical patch side in µm; ``patch_px``: side after resampling (px);
    ``device``: "cpu", "cuda" or "auto"; ``num_workers``: DataLoader workers cutting patches.
    """

    seed: int = 0
    device: str = "auto"
    batch_size: int = 64
    num_workers: int = 0
    patch_um: float = 200.0
    patch_px: int = 224
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    modality: str
    fn: Callable
    needs_gpu: bool = False
    description: str = ""


_REGISTRY: dict[str, EncoderSpec] = {}
_WEIGHT_CHECKS: dict[str, Callable] = {}

# built-in encoders: name -> (module that registers it when imported, modality, needs a GPU). Kept lazy so that
# heavy dependencies (torch, timm) load only when an encoder is used, and so that planning the workflow
# (``needs_gpu`` for the SLURM routing) imports nothing.
_BUILTIN = {
    "morphology": ("workflow_scripts.encoders.morphology", "img", False),
    "pca": ("workflow_scripts.encoders.pca", "gex", False),
    "uni2h": ("workflow_scripts.encoders.uni2h", "img", True),
    "nicheformer": ("workflow_scripts.encoders.nicheformer", "gex", True),
    "precomputed": ("workflow_scripts.encoders.precomputed", ANY_MODALITY, False),
}


def register(name: str, modality: str, needs_gpu: bool = False, description: str = ""):
    """Decorator that registers ``fn`` as encoder ``name`` for ``modality`` ("gex", "img", or "any" for an encoder
    that serves both and reads ``ctx.extra['modality']``)."""
    if modality not in (*MODALITIES, ANY_MODALITY):
        raise ValueError(f"modality must be one of {(*MODALITIES, ANY_MODALITY)}, got {modality!r}")

    def deco(fn):
        _REGISTRY[name] = EncoderSpec(name, modality, fn, needs_gpu, description or (fn.__doc__ or "").strip())
        return fn

    return deco


def register_weights_check(name: str):
    """Decorator that registers ``fn(path, arch=None) -> dict`` as the weight check of encoder ``name``.

    The check loads a weights file into the encoder's exact architecture and returns a key report
    (``python -m workflow_scripts.encoders.weights check``).
    """

    def deco(fn):
        _WEIGHT_CHECKS[name] = fn
        return fn

    return deco


def _load_builtin(name: str) -> None:
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name][0])


def get_encoder(name: str) -> EncoderSpec:
    """Return the registered encoder ``name``; raises KeyError listing the known encoders."""
    _load_builtin(name)
    if name not in _REGISTRY:
        raise KeyError(f"unknown encoder {name!r}; known: {known_encoders()}")
    return _REGISTRY[name]


def get_weights_check(name: str) -> Callable:
    """Return the weight check registered for encoder ``name``; KeyError when it has none."""
    _load_builtin(name)
    if name not in _WEIGHT_CHECKS:
        raise KeyError(f"encoder {name!r} has no weight check; encoders with weights: {sorted(_WEIGHT_CHECKS)}")
    return _WEIGHT_CHECKS[name]


def encoder_needs_gpu(name: str) -> bool:
    """Whether encoder ``name`` declares a GPU, without importing a built-in encoder's module.

    Raises KeyError listing the known encoders.
    """
    if name in _BUILTIN:
        return _BUILTIN[name][2]
    return get_encoder(name).needs_gpu


def encoder_modalities() -> dict[str, str]:
    """Modality ("gex" or "img") of every built-in and registered encoder, without importing a built-in's module."""
    out = {name: spec[1] for name, spec in _BUILTIN.items()}
    out.update({name: spec.modality for name, spec in _REGISTRY.items()})
    return out


def known_encoders() -> list[str]:
    """Names of all built-in and registered encoders."""
    return sorted(set(_REGISTRY) | set(_BUILTIN))
