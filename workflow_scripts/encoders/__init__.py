"""Registry of unimodal encoders.

An encoder maps a spots AnnData (:mod:`workflow_scripts.data.model`) to an embedding table
(:func:`workflow_scripts.io.embedding_frame`: spots × dims, indexed by spot id). Encoders register
themselves with :func:`register`; the embed rule and the CLI (``python -m workflow_scripts.embed``)
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

# modules that register encoders when imported; kept lazy so that heavy deps (torch/timm) load only when used
_BUILTIN_MODULES = {
    "morphology": "workflow_scripts.encoders.morphology",
    "pca": "workflow_scripts.encoders.pca",
    "uni2h": "workflow_scripts.encoders.uni2h",
    "nicheformer": "workflow_scripts.encoders.nicheformer",
}


def register(name: str, modality: str, needs_gpu: bool = False, description: str = ""):
    """Decorator that registers ``fn`` as encoder ``name`` for ``modality`` ("gex" or "img")."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")

    def deco(fn):
        _REGISTRY[name] = EncoderSpec(name, modality, fn, needs_gpu, description or (fn.__doc__ or "").strip())
        return fn

    return deco


def get_encoder(name: str) -> EncoderSpec:
    """Return the registered encoder ``name``; raises KeyError listing the known encoders."""
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _REGISTRY:
        raise KeyError(f"unknown encoder {name!r}; known: {sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))}")
    return _REGISTRY[name]


def known_encoders() -> list[str]:
    """Names of all built-in and registered encoders."""
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))
