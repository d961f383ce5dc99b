"""Tensor fusion, a parameter-free positive control that can express cross-modal interactions.

Zadeh, Chen, Poria, Cambria & Morency 2017, "Tensor Fusion Network for Multimodal Sentiment Analysis", EMNLP 2017,
arXiv:1707.07250: the fused representation is the outer product of the modality vectors, each extended by a
constant 1, so that it holds the unimodal terms and every bimodal product.

Here, with no training (r = ``rank``, 8):

1. per modality, standardise the columns and reduce to its r leading principal components, scaled to unit
   variance (whitened), with means, scales and components fitted on the fit rows only (all rows in the
   transductive protocol, the training spots under ``fit_mask``);
2. Z3 = vec([1, u_img] ⊗ [1, u_gex]), i.e. Z3[:, a·(r_gex + 1) + b] = [1, u_img][:, a] · [1, u_gex][:, b].

Z3 (n, (r_img + 1)(r_gex + 1)) holds the constant, u_img, u_gex and all r_img · r_gex products u_img,a · u_gex,b,
so a *linear* probe on it can fit any function of the form f(u_img) + h(u_gex) + u_imgᵀ A u_gex — e.g. the XOR of
the signs of one IMG and one GEX direction, which no linear probe on [Z_img ‖ Z_gex] can fit. With r = 8: 81 dims.
Each modality's r is clipped to min(r, d, n_fit − 1) (logged). No views (like concat).

It is not one of the study's ten methods: it is a control that shows a probe and SIS *can* register synergy
when a representation carries it (docs/synthetic.md).
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

DEFAULTS = {"rank": 8}


def _check_rank(rank) -> int:
    if int(rank) != rank or int(rank) < 1:
        raise ValueError(f"tensor_fusion: rank must be a positive integer, got {rank!r} "
                         "(fix config training.method_params.tensor_fusion.rank)")
    return int(rank)


def fit_reduction(z: np.ndarray, rank: int) -> dict:
    """Fit the per-modality reduction of step 1 on ``z`` (n_fit, d): returns ``mean`` (d,), ``scale`` (d,),
    ``components`` (r, d) and ``sd`` (r,) (the sd of each component's scores), r = min(rank, d, n_fit − 1).

    Columns with zero variance get scale 1. Principal components by ``sklearn.decomposition.PCA`` (full SVD,
    deterministic signs). Raises ValueError for fewer than 2 rows.
    """
    from sklearn.decomposition import PCA

    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or len(z) < 2:
        raise ValueError(f"tensor_fusion: need a 2-D array with >= 2 rows, got shape {z.shape}")
    rank = _check_rank(rank)
    r = min(rank, z.shape[1], len(z) - 1)
    if r < rank:
        log.info("tensor_fusion: rank clipped from %d to %d (d=%d, n_fit=%d)", rank, r, z.shape[1], len(z))
    mean = z.mean(axis=0)
    scale = z.std(axis=0)
    scale[scale == 0] = 1.0
    pca = PCA(n_components=r, svd_solver="full").fit((z - mean) / scale)
    sd = np.sqrt(pca.explained_variance_)
    sd[sd == 0] = 1.0
    return {"mean": mean, "scale": scale, "components": pca.components_.astype(np.float64), "sd": sd}


def reduce(z: np.ndarray, red: dict) -> np.ndarray:
    """Whitened principal-component scores (n, r) of ``z`` (n, d) under a fitted reduction (:func:`fit_reduction`)."""
    z = np.asarray(z, dtype=np.float64)
    return ((z - red["mean"]) / red["scale"]) @ red["components"].T / red["sd"]


def outer_fusion(u_img: np.ndarray, u_gex: np.ndarray) -> np.ndarray:
    """vec([1, u_img] ⊗ [1, u_gex]) per row: (n, r_img), (n, r_gex) → (n, (r_img + 1)(r_gex + 1)) float32
    (Zadeh et al. 2017, eq. of the tensor fusion layer); column a·(r_gex + 1) + b is [1, u_img]_a · [1, u_gex]_b."""
    u_img, u_gex = np.asarray(u_img, dtype=np.float64), np.asarray(u_gex, dtype=np.float64)
    if len(u_img) != len(u_gex):
        raise ValueError(f"tensor_fusion: {len(u_img)} IMG rows but {len(u_gex)} GEX rows")
    one = np.ones((len(u_img), 1))
    a, b = np.hstack([one, u_img]), np.hstack([one, u_gex])
    return np.einsum("na,nb->nab", a, b).reshape(len(a), -1).astype(np.float32)


def fit_tensor_fusion(z_img: np.ndarray, z_gex: np.ndarray, rank: int = DEFAULTS["rank"]) -> dict:
    """Fit both reductions (step 1) on paired rows ``z_img`` (n, d_img), ``z_gex`` (n, d_gex).

    Returns the state ``{"img": reduction, "gex": reduction}`` (arrays only; :func:`fit_reduction`).
    """
    return {"img": fit_reduction(z_img, rank), "gex": fit_reduction(z_gex, rank)}


def tensor_fusion_embedding(state: dict, z_img: np.ndarray, z_gex: np.ndarray) -> np.ndarray:
    """Z3 of the module docstring for paired rows, (n, (r_img + 1)(r_gex + 1)) float32, with a fitted ``state``."""
    return outer_fusion(reduce(z_img, state["img"]), reduce(z_gex, state["gex"]))


def state_to_flat(state: dict) -> dict:
    """Flat {"img.mean": array, ...} form of a state (for ``AlignResult.state['state_dict']``)."""
    return {f"{m}.{k}": np.asarray(v) for m, red in state.items() for k, v in red.items()}


def state_from_flat(flat: dict) -> dict:
    """Inverse of :func:`state_to_flat` (accepts torch tensors or arrays)."""
    out: dict = {"img": {}, "gex": {}}
    for key, v in flat.items():
        m, k = key.split(".", 1)
        out[m][k] = v.numpy() if hasattr(v, "numpy") else np.asarray(v)
    return out
