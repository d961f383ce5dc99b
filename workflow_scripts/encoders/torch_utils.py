"""Shared torch plumbing for the foundation-model encoders (UNI2-h, Nicheformer).

* :func:`resolve_device` — ``"auto"`` → CUDA when available, else CPU (logged);
* :func:`autocast_dtype` / :func:`autocast` — mixed precision on the GPU (bf16 where supported, else
  fp16; the reference runs UNI2-h under fp16 autocast, docs/reference.md#uni2-h), full fp32 on the CPU unless asked otherwise;
* :class:`PatchDataset` + :func:`make_loader` — a DataLoader whose worker processes cut H&E patches
  from the slide images in parallel (:class:`workflow_scripts.data.patches.PatchReader`), in slide order,
  into pinned memory when the target is a GPU;
* :func:`load_checkpoint_file` — reads ``.safetensors`` or torch pickles (``.bin``/``.pt``/``.ckpt``)
  with ``torch.load(weights_only=True)``; classes a Lightning checkpoint names but that need not be
  importable here (e.g. ``pytorch_lightning`` objects in ``hyper_parameters``) are replaced by inert
  placeholders instead of executing arbitrary pickled code;
* :func:`peak_memory_mb` — peak GPU memory (``torch.cuda.max_memory_allocated``) or peak resident
  memory of this process (Linux ``VmHWM``, reset via ``/proc/self/clear_refs``; ``ru_maxrss`` otherwise).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import pickle
import random
import resource
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# ----------------------------------------------------------------------------------------------- devices


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` into a :class:`torch.device`.

    ``"auto"`` picks CUDA when ``torch.cuda.is_available()`` and falls back to the CPU otherwise (logged).
    Raises RuntimeError when CUDA is requested explicitly but not available (fix: ``--device auto|cpu``
    or config ``embed.device``), ValueError for an unknown name.
    """
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = str(device or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            dev = torch.device("cuda")
            log.info("device auto -> cuda (%s)", torch.cuda.get_device_name(dev))
            return dev
        log.warning("device auto -> cpu (no CUDA device visible); foundation-model extraction will be slow")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {name!r} requested but CUDA is not available on this machine; "
                "use --device auto or cpu (config key embed.device)"
            )
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """Autocast dtype for ``device`` and ``precision`` (``auto | fp32 | bf16 | fp16``); None = no autocast.

    ``auto``: bf16 on GPUs that support it (Ampere and newer), fp16 on older GPUs, fp32 (None) on the CPU.
    Raises ValueError for an unknown precision or fp16 on the CPU (not supported by CPU autocast kernels
    for every op used here).
    """
    precision = str(precision).lower()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 is for GPUs; on the CPU use fp32 or bf16")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` context for ``device``/``dtype``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _worker_init(worker_id: int) -> None:
    # one BLAS/torch thread per worker: the workers cut images, the main process runs the model
    torch.set_num_threads(1)
    seed = torch.initial_seed() % (2**32)
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    collate_fn=None,
    batch_sampler=None,
) -> DataLoader:
    """A deterministic (no shuffling) DataLoader for inference.

    ``num_workers`` > 0 starts that many worker processes that build items in parallel (2 batches
    prefetched each); ``pin_memory`` is on when ``device`` is a GPU so that host→device copies can be
    asynchronous (``tensor.to(device, non_blocking=True)``). Raises ValueError for batch_size < 1 or
    num_workers < 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    kw: dict[str, Any] = dict(
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_fn,
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )
    if num_workers > 0:
        kw["prefetch_factor"] = 2
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kw)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, **kw)


# ----------------------------------------------------------------------------------------------- patches


class PatchDataset(Dataset):
    """Spot patches as uint8 tensors, cut on demand by a :class:`~workflow_scripts.data.patches.PatchReader`.

    Item ``k`` is ``(patch, spot_index, border)``: ``patch`` a ``(3, out_px, out_px)`` uint8 tensor
    (channels first, RGB), ``spot_index`` the row of the spot in the spots AnnData, ``border`` 1 if the
    patch extends beyond the slide image (white-filled, see :mod:`workflow_scripts.data.patches`).
    ``indices`` default to the reader's slide-sorted order, so each worker decodes each slide image once
    (the reader caches the last slide per process). Normalisation happens on the target device (uint8
    transfers are 4× smaller than float32).
    """

    def __init__(self, reader, indices: Sequence[int] | None = None):
        self.reader = reader
        self.indices = np.asarray(reader.order() if indices is None else indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        before = self.reader.n_border
        patch = self.reader[i]
        border = int(self.reader.n_border > before)
        t = torch.from_numpy(np.array(patch, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        return t, i, border


def normalize_uint8(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(B, 3, H, W)`` uint8 → float32 ``(x / 255 - mean) / std`` (per channel), on ``batch``'s device.

    This is torchvision's ``ToTensor`` followed by ``Normalize(mean, std)``.
    """
    x = batch.float().div_(255.0)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


# ----------------------------------------------------------------------------------------------- loading


def _placeholder(name: str) -> type:
    """A class standing in for ``name`` (a class the checkpoint names but that is not imported here).

    Creating it — by the pickle's NEWOBJ or REDUCE — yields an ``OrderedDict`` (which the weights-only
    unpickler lets receive items and state) tagged with ``checkpoint_class`` and the constructor ``args``.
    Nothing from the checkpoint is executed.
    """

    def new(cls, *args, **kwargs):
        od = OrderedDict()
        od.__dict__.update(checkpoint_class=name, args=args)
        return od

    return type(name.rpartition(".")[2], (), {"__new__": new, "checkpoint_name": name})


_NUMPY_OK = {
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
}


def _resolve_numpy(name: str):
    mod, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError):
        return None


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with placeholders for unknown, non-torch globals (see module doc)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - the original error is the informative one
            raise first from None
        if not names:
            raise
        allow = []
        stubs = []
        for name in sorted(set(names)):
            obj = _resolve_numpy(name) if name.startswith("numpy") else None
            if obj is not None and (name in _NUMPY_OK or name.startswith("numpy.dtypes.")):
                allow.append((obj, name))
                continue
            allow.append((_placeholder(name), name))
            stubs.append(name)
        log.info("%s: %d non-tensor classes read as inert placeholders: %s", path, len(stubs), stubs[:10])
        with torch.serialization.safe_globals(allow):
            return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint_file(path: str | Path) -> Any:
    """Read a weights file without executing pickled code.

    ``.safetensors`` → ``{key: tensor}`` (:func:`safetensors.torch.load_file`); anything else is read with
    ``torch.load(map_location="cpu", weights_only=True)`` (``.bin``, ``.pt``, ``.pth``, Lightning
    ``.ckpt``), returning whatever object was saved (a state dict or a checkpoint dict).
    Raises FileNotFoundError naming the path, ValueError when the file cannot be parsed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        return _torch_load(path)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read as a torch checkpoint ({type(e).__name__}: {e})") from e


def compare_state_dicts(expected: dict, found: dict) -> dict:
    """Compare key sets and shapes of two state dicts (values: tensors or shapes).

    Returns ``{"missing": [...], "unexpected": [...], "mismatched": [(key, expected_shape, found_shape)]}``:
    missing = in ``expected`` only, unexpected = in ``found`` only.
    """

    def shape(v):
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [(k, shape(expected[k]), shape(found[k])) for k in expected if k in found and shape(expected[k]) != shape(found[k])]
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}


REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_resource(path: str | Path, what: str, config_key: str) -> Path:
    """Find a resource file: as given (absolute or relative to the working directory), else relative to
    the repository root (so the CLI works from any directory).

    Raises FileNotFoundError naming both places tried, ``what`` the file is and the ``config_key`` to fix.
    """
    p = Path(path).expanduser()
    if p.exists():
        return p
    if not p.is_absolute() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    raise FileNotFoundError(
        f"{what} not found at {p}" + ("" if p.is_absolute() else f" (nor at {REPO_ROOT / p})") + f"; set {config_key}"
    )


# ----------------------------------------------------------------------------------------------- memory


def reset_peak_memory(device: torch.device) -> None:
    """Reset the peak-memory counter read by :func:`peak_memory_mb` (GPU allocator or process RSS)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM of this process


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory since the last :func:`reset_peak_memory` in MiB and what was measured.

    GPU: ``torch.cuda.max_memory_allocated`` (tensors only, not the CUDA context). CPU: the peak resident
    set size of this process (``VmHWM`` from ``/proc/self/status``; ``ru_maxrss`` — lifetime peak — where
    that is unavailable). DataLoader worker processes are not included.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "peak RSS (VmHWM)"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS (ru_maxrss, process lifetime)"


def merge_arch(full: dict, tiny_overrides: dict, arch: dict | None, tiny: bool, key: str) -> dict:
    """An encoder's architecture: ``full``, then ``tiny_overrides`` (if ``tiny``), then the config's ``arch``.

    ``key`` names the config key in the error (e.g. ``encoders.uni2h.arch``). Raises ValueError for override keys
    that are not in ``full``.
    """
    arch = dict(arch or {})
    unknown = sorted(set(arch) - set(full))
    if unknown:
        raise ValueError(f"{key}: unknown key(s) {unknown}; allowed: {sorted(full)}")
    out = dict(full)
    if tiny:
        out.update(tiny_overrides)
    out.update(arch)
    return out
