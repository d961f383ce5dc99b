"""The ten fusion ("alignment") methods of the study and the random baseline (docs/reference.md#fusion-methods).

Inputs: Z1 = GEX embedding (n, d_gex), Z2 = IMG embedding (n, d_img), frozen, float, finite, rows paired by spot.
All sizes are read from the data. Entry point: :func:`fit_method`. Every model takes its inputs in the reference's
order (image, GEX); Z3 concatenations are [image ‖ GEX] as in the reference.

Z3 per method (docs/reference.md#fused-embeddings; P = ``projection_dim``, k = min(P, d_img, d_gex), D = CoMM ``embed_dim``):

============  =======================================  =====  ============================  ==========
method        Z3                                       dim    views (img, gex)              view dim
============  =======================================  =====  ============================  ==========
cca           [Z_img ‖ Z_gex] canonical variates        2k     canonical variates            k
dcca          [out_img ‖ out_gex] (raw)                 2k     tower outputs                 k
comm          n(fused) (pre-projector)                  D      n(projector(adapter(x)))      D
simclr        [n(f_img) ‖ n(f_gex)]                     2P     n(f_img), n(f_gex)            P
byol          [z_img ‖ z_gex] online encoders (raw)     2P     z_img, z_gex                  P
simsiam       [n(z_img) ‖ n(z_gex)]                     2P     n(z_img), n(z_gex)            P
barlow_twins  [n(z_img) ‖ n(z_gex)] (before shared BN)  2P     z_img, z_gex (raw)            P
vicreg        [n(x) ‖ n(y)]                             2P     x, y (raw)                    P
dim           [n(z_img) ‖ n(z_gex)]                     2P     n(z_img), n(z_gex)            P
concat        [Z_img ‖ Z_gex] raw inputs                d_img + d_gex  —                     —
random        N(0, 1) (seeded)                          d_gex + d_img  —                     —
============  =======================================  =====  ============================  ==========

n(·) = L2 normalisation per spot. With the default offline inputs (d_gex = 50, d_img = 60, P = 256, D = 512):
cca 100, dcca 100, comm 512, simclr/byol/simsiam/barlow_twins/vicreg/dim 512, concat 110, random 110.

Deliberate deviations from the reference (each documented in its module): BYOL EMA target update (:mod:`.byol`);
CoMM feature-level augmentations for two stochastic views (:mod:`.comm`); DCCA/CCA rank k = min(P, d_img, d_gex)
(:mod:`.dcca`, :mod:`.cca`); once-per-epoch validation and run-seeded splits (:mod:`.training`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from . import barlow_twins, byol, cca, comm, dcca, dim, simclr, simsiam, tensor_fusion, vicreg
from .baselines import concat_embedding, random_embedding
from .base import AlignModel
from .training import HISTORY_COLUMNS, predict, resolve_device, resolve_params, split_indices, train_model

log = logging.getLogger(__name__)

#: The ten fusion methods of the study (docs/reference.md#fusion-methods), in the reference's order.
METHODS = ("cca", "dcca", "comm", "simclr", "byol", "simsiam", "barlow_twins", "vicreg", "dim", "concat")
#: Methods with an explicit spectral (CCA-type) objective.
SPECTRAL_METHODS = ("cca", "dcca")
#: Baselines that fit_method also produces.
BASELINES = ("random",)
#: Positive controls that fit_method also produces (not among the ten methods): parameter-free embeddings that can
#: express cross-modal interactions (:mod:`.tensor_fusion`).
CONTROLS = ("tensor_fusion",)

#: Neural methods: name → AlignModel class.
MODELS: dict[str, type[AlignModel]] = {
    "dcca": dcca.DCCA,
    "comm": comm.CoMM,
    "simclr": simclr.SimCLR,
    "byol": byol.BYOL,
    "simsiam": simsiam.SimSiam,
    "barlow_twins": barlow_twins.BarlowTwins,
    "vicreg": vicreg.VICReg,
    "dim": dim.DIM,
}
#: Method-specific parameter defaults (merged under the config's ``training.method_params[method]``).
METHOD_DEFAULTS: dict[str, dict] = {
    "cca": cca.DEFAULTS,
    "dcca": dcca.DEFAULTS,
    "comm": comm.DEFAULTS,
    "simclr": simclr.DEFAULTS,
    "byol": byol.DEFAULTS,
    "simsiam": simsiam.DEFAULTS,
    "barlow_twins": barlow_twins.DEFAULTS,
    "vicreg": vicreg.DEFAULTS,
    "dim": dim.DEFAULTS,
    "concat": {},
    "random": {},
    "tensor_fusion": tensor_fusion.DEFAULTS,
}


@dataclass
class AlignResult:
    """Output of :func:`fit_method`.

    ``z3``: (n, d3) float32 fused embedding, rows in input order.
    ``history``: one row per epoch, columns epoch, train_loss, val_loss, val_loss_smooth, lr (one row for cca,
    empty for concat/random).
    ``state``: dict with ``state_dict`` (tensors: model weights, or the CCA matrices) and metadata (method, seed,
    params, d_img, d_gex, d_z3, view_dim, best_epoch, best_val_loss_smooth, n_epochs, stopped_early, n_spots,
    n_train, n_val); loadable with ``torch.load(..., weights_only=True)`` once saved.
    ``views``: (view_img, view_gex), each (n, view_dim) float32, the per-modality projections compared by the
    objective (table in the module docstring); None for concat and random.
    """

    z3: np.ndarray
    history: pd.DataFrame
    state: dict
    views: tuple[np.ndarray, np.ndarray] | None = field(default=None)


def _check_inputs(z_gex: np.ndarray, z_img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z_gex, z_img = np.asarray(z_gex), np.asarray(z_img)
    if z_gex.ndim != 2 or z_img.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n_spots, dims); got GEX {z_gex.shape}, IMG {z_img.shape}")
    if z_gex.shape[0] != z_img.shape[0]:
        raise ValueError(f"GEX has {z_gex.shape[0]} rows but IMG has {z_img.shape[0]}; intersect spot ids first "
                         "(workflow_scripts.io.intersect_tables)")
    for name, z in (("GEX", z_gex), ("IMG", z_img)):
        if not np.isfinite(z).all():
            raise ValueError(f"{name} embedding has NaN/inf values; drop those rows first "
                             "(workflow_scripts.io.drop_invalid_rows)")
    return z_gex.astype(np.float32, copy=False), z_img.astype(np.float32, copy=False)


def _meta(method, seed, p, d_img, d_gex, d_z3, view_dim, n, **extra) -> dict:
    meta = {
        "method": method,
        "seed": int(seed),
        "params": {k: v for k, v in p.items()},
        "d_img": int(d_img),
        "d_gex": int(d_gex),
        "d_z3": int(d_z3),
        "view_dim": None if view_dim is None else int(view_dim),
        "n_spots": int(n),
        "best_epoch": 0,
        "best_val_loss_smooth": float("nan"),
        "n_epochs": 0,
        "stopped_early": False,
        "n_train": 0,
        "n_val": 0,
        "state_dict": {},
    }
    meta.update(extra)
    return meta


def build_model(method: str, d_img: int, d_gex: int, params: dict | None = None) -> AlignModel:
    """Instantiate the neural model of ``method`` for input dims d_img, d_gex (weights from the current torch RNG).

    ``params`` as for :func:`fit_method`. Raises ValueError for a non-neural or unknown method.
    """
    if method not in MODELS:
        raise ValueError(f"{method!r} is not a neural method; neural methods: {sorted(MODELS)}")
    p = resolve_params(method, params, METHOD_DEFAULTS[method])
    return MODELS[method](int(d_img), int(d_gex), p)


def fit_method(
    method: str,
    z_gex: np.ndarray,
    z_img: np.ndarray,
    params: dict | None,
    seed: int,
    device: str = "auto",
    progress: bool = True,
    fit_mask: np.ndarray | None = None,
) -> AlignResult:
    """Fit fusion ``method`` (one of :data:`METHODS`, or ``"random"``) on paired embeddings and return Z3.

    ``z_gex`` (n, d_gex) and ``z_img`` (n, d_img): frozen embeddings, rows paired, finite.
    ``params``: the config's ``training`` block updated with ``training.method_params[method]`` (keys: batch_size,
    max_epochs, lr, weight_decay, projection_dim, early_stopping_patience, ema_smoothing, val_fraction,
    val_fraction_unsupervised, plus the method's own keys; ``device``/``threads``/``method_params`` are ignored).
    ``seed``: seeds torch (weights, augmentations) and numpy (split, batch order); same seed → same result.
    ``device``: "auto" (cuda if available else cpu), "cpu", "cuda", ...; ``progress``: tqdm bar on stderr.
    ``fit_mask``: optional (n,) boolean; when given, the method is fitted (training and validation split) on the
    rows where it is True only, and Z3 and the views are then computed for all n rows with the fitted state
    (:func:`embed_with_state`): the inductive protocol, where no held-out spot reaches the interface.
    Raises ValueError on an unknown method or parameter, mismatched rows, non-finite inputs, or a ``fit_mask`` of
    the wrong shape or with fewer than 2 rows selected.
    """
    if method not in METHODS + BASELINES + CONTROLS:
        raise ValueError(f"unknown method {method!r}; known: {list(METHODS + BASELINES + CONTROLS)}")
    z_gex, z_img = _check_inputs(z_gex, z_img)
    if fit_mask is not None:
        return _fit_on_subset(method, z_gex, z_img, params, seed, device, progress, fit_mask)
    n, d_gex = z_gex.shape
    d_img = z_img.shape[1]
    p = resolve_params(method, params, METHOD_DEFAULTS[method])
    empty_history = pd.DataFrame({c: pd.Series(dtype=float) for c in HISTORY_COLUMNS})

    if method == "concat":
        z3 = concat_embedding(z_img, z_gex)
        return AlignResult(z3, empty_history, _meta(method, seed, p, d_img, d_gex, z3.shape[1], None, n), None)
    if method == "random":
        z3 = random_embedding(n, d_gex + d_img, seed)
        return AlignResult(z3, empty_history, _meta(method, seed, p, d_img, d_gex, z3.shape[1], None, n), None)
    if method == "cca":
        return _fit_cca(z_gex, z_img, p, seed)
    if method == "tensor_fusion":
        tf_state = tensor_fusion.fit_tensor_fusion(z_img, z_gex, p["rank"])
        z3 = tensor_fusion.tensor_fusion_embedding(tf_state, z_img, z_gex)
        log.info("tensor_fusion: rank img %d, gex %d, Z3 dim %d", len(tf_state["img"]["sd"]),
                 len(tf_state["gex"]["sd"]), z3.shape[1])
        flat = {k: torch.as_tensor(v) for k, v in tensor_fusion.state_to_flat(tf_state).items()}
        state = _meta(method, seed, p, d_img, d_gex, z3.shape[1], None, n, n_train=n, state_dict=flat)
        return AlignResult(z3, empty_history, state, None)

    dev = resolve_device(device)
    torch.manual_seed(int(seed))
    model = MODELS[method](d_img, d_gex, p)
    if method == "dcca":
        log.info("dcca: output dim k = min(projection_dim=%d, d_img=%d, d_gex=%d) = %d", p["projection_dim"], d_img,
                 d_gex, model.k)
    n_par = sum(q.numel() for q in model.parameters() if q.requires_grad)
    log.info("%s: d_img=%d, d_gex=%d, Z3 dim %d, %d trainable parameters, device %s", method, d_img, d_gex,
             model.z3_dim, n_par, dev)
    out = train_model(model, z_img, z_gex, p, int(seed), dev, progress=progress)
    xi = torch.as_tensor(z_img, device=dev)
    xg = torch.as_tensor(z_gex, device=dev)
    z3, views = predict(model, xi, xg)
    state = _meta(
        method, seed, p, d_img, d_gex, model.z3_dim, model.view_dim, n,
        best_epoch=out.best_epoch, best_val_loss_smooth=out.best_val_loss_smooth, n_epochs=out.n_epochs,
        stopped_early=out.stopped_early, n_train=out.n_train, n_val=out.n_val,
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
    )
    return AlignResult(z3, out.history, state, views)


def _fit_on_subset(method, z_gex, z_img, params, seed, device, progress, fit_mask) -> AlignResult:
    mask = np.asarray(fit_mask)
    if mask.dtype != bool or mask.shape != (z_gex.shape[0],):
        raise ValueError(f"fit_mask must be a boolean array of shape ({z_gex.shape[0]},), got {mask.dtype} {mask.shape}")
    n, n_fit = len(mask), int(mask.sum())
    if n_fit < 2:
        raise ValueError(f"fit_mask selects {n_fit} rows; at least 2 are needed to fit {method}")
    log.info("%s: fitting on %d of %d spots; Z3 for all %d", method, n_fit, n, n)
    res = fit_method(method, z_gex[mask], z_img[mask], params, seed, device=device, progress=progress)
    if method == "random":
        z3, views = random_embedding(n, z_gex.shape[1] + z_img.shape[1], seed), None
    else:
        z3, views = embed_with_state(res.state, z_gex, z_img, device=device)
    state = dict(res.state, n_spots=n, n_fit=n_fit)
    return AlignResult(z3, res.history, state, views)


def _fit_cca(z_gex: np.ndarray, z_img: np.ndarray, p: dict, seed: int) -> AlignResult:
    n, d_gex = z_gex.shape
    d_img = z_img.shape[1]
    rng = np.random.default_rng(seed)
    train_idx, val_idx = split_indices(n, "cca", p, rng)
    k = int(min(p["projection_dim"], d_img, d_gex))
    log.info("cca: rank k = min(projection_dim=%d, d_img=%d, d_gex=%d) = %d; fit on %d training spots, "
             "%d held out", p["projection_dim"], d_img, d_gex, k, len(train_idx), len(val_idx))
    model = cca.fit_linear_cca(z_img[train_idx], z_gex[train_idx], k, float(p["reg"]))
    log.info("cca: top training canonical correlations %s", np.round(model.corr[:5], 4).tolist())
    train_loss = cca.cca_loss(*model.transform(z_img[train_idx], z_gex[train_idx]))
    val_loss = cca.cca_loss(*model.transform(z_img[val_idx], z_gex[val_idx])) if len(val_idx) >= 2 else float("nan")
    history = pd.DataFrame([(1, train_loss, val_loss, val_loss, float("nan"))], columns=HISTORY_COLUMNS)
    v_img, v_gex = model.transform(z_img, z_gex)
    v_img, v_gex = v_img.astype(np.float32), v_gex.astype(np.float32)
    state = _meta(
        "cca", seed, p, d_img, d_gex, 2 * k, k, n, best_epoch=1, best_val_loss_smooth=float(val_loss), n_epochs=1,
        n_train=len(train_idx), n_val=len(val_idx),
        state_dict={key: torch.as_tensor(val) for key, val in model.state_dict().items()},
    )
    return AlignResult(np.concatenate([v_img, v_gex], axis=1), history, state, (v_img, v_gex))


def embed_with_state(state: dict, z_gex: np.ndarray, z_img: np.ndarray, device: str = "auto"):
    """Apply a fitted method (``AlignResult.state`` or the dict saved by the align CLI) to new paired embeddings.

    Returns (z3 (n, d3) float32, (view_img, view_gex) or None). Works for every method except ``random``
    (whose values are not a function of the inputs; raises ValueError).
    """
    method = state["method"]
    z_gex, z_img = _check_inputs(z_gex, z_img)
    if (z_img.shape[1], z_gex.shape[1]) != (state["d_img"], state["d_gex"]):
        raise ValueError(f"{method}: fitted on d_img={state['d_img']}, d_gex={state['d_gex']} but got "
                         f"{z_img.shape[1]}, {z_gex.shape[1]}")
    if method == "concat":
        return concat_embedding(z_img, z_gex), None
    if method == "tensor_fusion":
        tf_state = tensor_fusion.state_from_flat(state["state_dict"])
        return tensor_fusion.tensor_fusion_embedding(tf_state, z_img, z_gex), None
    if method == "cca":
        model = cca.LinearCCA.from_state_dict({k: v.numpy() if torch.is_tensor(v) else v
                                               for k, v in state["state_dict"].items()})
        v_img, v_gex = (v.astype(np.float32) for v in model.transform(z_img, z_gex))
        return np.concatenate([v_img, v_gex], axis=1), (v_img, v_gex)
    if method not in MODELS:
        raise ValueError(f"cannot re-apply method {method!r} to new data")
    dev = resolve_device(device)
    model = MODELS[method](state["d_img"], state["d_gex"], state["params"])
    model.load_state_dict(state["state_dict"])
    model.to(dev)
    return predict(model, torch.as_tensor(z_img, device=dev), torch.as_tensor(z_gex, device=dev))


__all__ = [
    "METHODS",
    "SPECTRAL_METHODS",
    "BASELINES",
    "CONTROLS",
    "MODELS",
    "METHOD_DEFAULTS",
    "AlignModel",
    "AlignResult",
    "build_model",
    "fit_method",
    "embed_with_state",
]
