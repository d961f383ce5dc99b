"""``synthetic`` — a planted-information dataset: discrete latent factors, two modalities, tasks of known PID.

The generative model (user guide and expectations: ``docs/synthetic.md``):

1. **Latent factors** (discrete, independent, uniform): ``shared`` s ∈ {0..K_s−1}, seen by both modalities;
   ``gex`` g ∈ {0..K_g−1}, seen by GEX only; ``img`` i ∈ {0..K_i−1}, seen by IMG only. The shared factor is drawn
   once per square block of ``block_um`` µm of a slide (spatially smooth; null = once per spot); g and i once per
   spot.
2. **Modalities**: for m ∈ {gex, img}, u_m = [E_m^s[s] ‖ E_m^own[own] ‖ ν_m] with random codes E (one N(0, I_c) vector
   per factor value, c = ``code_dim``, drawn per modality, so the shared factor looks different in each) and a
   nuisance ν_m ~ N(0, nuisance_sd² I) that no task uses; then a random two-layer network (the nonlinear mixing)
   z_m = W2_m tanh(W1_m u_m + b1_m) + δ_slide + ε, with W1 ~ N(0, gain²/fan_in), W2 ~ N(0, 1/hidden_dim), a
   per-slide shift δ ~ N(0, slide_shift_sd² I) and noise ε ~ N(0, noise_sd² I): the ``d``-dimensional
   "embeddings" of the two frozen encoders, written to ``obsm['gex_embedding']`` and ``obsm['img_embedding']``
   for the ``precomputed`` encoder.
3. **Tasks** (obs label columns; regression targets in obsm):

   ==============  ==============================================  ================================
   name            label                                           planted information
   ==============  ==============================================  ================================
   redundant       s                                               redundancy (log2 K_s bits)
   unique_gex      g                                               unique to GEX (log2 K_g)
   unique_img      i                                               unique to IMG (log2 K_i)
   synergy         (g + i) mod min(K_g, K_i)  (XOR for K = 2)      synergy (1 bit for XOR)
   product         obsm, y = g̃ · ĩ + N(0, product_noise_sd²),      regression; for K = 2 the XOR
                   g̃ = 2g/(K_g − 1) − 1 ∈ [−1, 1], ĩ likewise      of the signs (1 bit of synergy)
   <mixture>       per spot, the label of a mechanism drawn from   a mix, exact terms from the
                   ``mixtures.<name>`` weights (hidden selector)    joint (``pid_truth``)
   ==============  ==============================================  ================================

4. **Slides, donors, coordinates**: ``n_slides`` slides on a ``grid`` (rows × columns) of spots ``spacing_um`` µm
   apart, slide j from donor j mod ``n_donors``. There is no H&E image: ``uns['slides'][s]`` has
   ``image_path = ""`` (no image; :mod:`workflow_scripts.data.model`) and ``um_per_px = 1``, ``px_x = x_um``.
   ``X`` has no genes (n × 0): use the ``precomputed`` encoder for both modalities.

The ground-truth PID of each task is computed on the exact joint p(x1, x2, y) of the latents each modality sees,
x1 = (s, g), x2 = (s, i) (:func:`task_joint`; the terms by :func:`workflow_scripts.evaluation.pid.pid_broja`).
"""

from __future__ import annotations

import itertools
import logging
from typing import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..io import lazy_module

ad = lazy_module("anndata")  # imported on first use: readers are imported while the DAG is planned
log = logging.getLogger(__name__)

MECHANISMS = ("redundant", "unique_gex", "unique_img", "synergy")
REGRESSION = ("product",)
GENERATOR_DEFAULTS = {
    "seed": 0,
    "n_slides": 4,
    "n_donors": 2,
    "grid": [15, 20],
    "spacing_um": 100.0,
    "block_um": 300.0,
    "latent": {"shared": 3, "gex": 2, "img": 2},
    "code_dim": 8,
    "nuisance_dim": 2,
    "nuisance_sd": 0.3,
    "hidden_dim": 32,
    "gain": 1.5,
    "dims": {"gex": 32, "img": 32},
    "noise_sd": 0.3,
    "slide_shift_sd": 0.1,
    "product_noise_sd": 0.1,
    "mixtures": {},
}


def generator_params(params: Mapping | None) -> dict:
    """``datasets.<d>.generator`` merged over :data:`GENERATOR_DEFAULTS` and checked.

    Raises ValueError naming the key (``datasets.<d>.generator.<key>``) for an unknown key, a latent factor with
    fewer than 2 values, a non-positive size, or a mixture whose weights are negative, do not sum to 1 or name an
    unknown mechanism.
    """
    params = dict(params or {})
    unknown = sorted(set(params) - set(GENERATOR_DEFAULTS))
    if unknown:
        raise ValueError(f"datasets.<d>.generator: unknown key(s) {unknown}; allowed: {sorted(GENERATOR_DEFAULTS)}")
    p = {**GENERATOR_DEFAULTS, **params}
    p["latent"] = {**GENERATOR_DEFAULTS["latent"], **(params.get("latent") or {})}
    p["dims"] = {**GENERATOR_DEFAULTS["dims"], **(params.get("dims") or {})}
    for k in p["latent"]:
        if k not in GENERATOR_DEFAULTS["latent"]:
            raise ValueError(f"datasets.<d>.generator.latent: unknown factor {k!r}; factors: shared, gex, img")
        if int(p["latent"][k]) < 2:
            raise ValueError(f"datasets.<d>.generator.latent.{k} must be >= 2 values, got {p['latent'][k]!r}")
    for k in ("n_slides", "n_donors", "code_dim", "hidden_dim"):
        if int(p[k]) < 1:
            raise ValueError(f"datasets.<d>.generator.{k} must be >= 1, got {p[k]!r}")
    if int(p["n_donors"]) > int(p["n_slides"]):
        raise ValueError(f"datasets.<d>.generator.n_donors ({p['n_donors']}) exceeds n_slides ({p['n_slides']})")
    if len(p["grid"]) != 2 or min(int(v) for v in p["grid"]) < 1:
        raise ValueError(f"datasets.<d>.generator.grid must be [rows, columns] >= 1, got {p['grid']!r}")
    for m in ("gex", "img"):
        if int(p["dims"][m]) < 1:
            raise ValueError(f"datasets.<d>.generator.dims.{m} must be >= 1, got {p['dims'][m]!r}")
    for k in ("noise_sd", "nuisance_sd", "slide_shift_sd", "product_noise_sd"):
        if float(p[k]) < 0:
            raise ValueError(f"datasets.<d>.generator.{k} must be >= 0, got {p[k]!r}")
    for name, w in (p["mixtures"] or {}).items():
        if name in MECHANISMS or name in REGRESSION:
            raise ValueError(f"datasets.<d>.generator.mixtures: name {name!r} is taken by a built-in task")
        bad = sorted(set(w) - set(MECHANISMS))
        if bad:
            raise ValueError(f"datasets.<d>.generator.mixtures.{name}: unknown mechanism(s) {bad}; "
                             f"mechanisms: {list(MECHANISMS)}")
        vals = np.array([float(v) for v in w.values()])
        if (vals < 0).any() or not np.isclose(vals.sum(), 1.0):
            raise ValueError(f"datasets.<d>.generator.mixtures.{name}: weights must be >= 0 and sum to 1, got {w}")
    return p


def label_names(params: Mapping | None) -> list[str]:
    """Every label (obs column) and regression target (obsm key) the generator writes."""
    p = generator_params(params)
    return [*MECHANISMS, *REGRESSION, *(p["mixtures"] or {})]


def mechanism_label(mechanism: str, s, g, i, k_xor: int):
    """Integer label of ``mechanism`` (:data:`MECHANISMS`) for latent values s, g, i (scalars or arrays)."""
    if mechanism == "redundant":
        return s
    if mechanism == "unique_gex":
        return g
    if mechanism == "unique_img":
        return i
    if mechanism == "synergy":
        return (g + i) % k_xor
    raise ValueError(f"unknown mechanism {mechanism!r}; mechanisms: {list(MECHANISMS)}")


def _centred(v, k: int):
    return 2.0 * np.asarray(v, dtype=float) / (k - 1) - 1.0


def task_joint(params: Mapping | None, name: str) -> np.ndarray:
    """Exact joint p(x1, x2, y) of task ``name`` on the latents: x1 = (s, g) (index s·K_g + g), x2 = (s, i)
    (index s·K_i + i), y the noise-free label (regression: the product g̃ · ĩ, its distinct values in order).

    Returns an array of shape (K_s·K_g, K_s·K_i, |Y|) that sums to 1. Raises ValueError for an unknown ``name``.
    """
    p = generator_params(params)
    ks, kg, ki = (int(p["latent"][f]) for f in ("shared", "gex", "img"))
    k_xor = min(kg, ki)
    mixtures = p["mixtures"] or {}
    if name not in label_names(p):
        raise ValueError(f"synthetic dataset has no task {name!r}; tasks: {label_names(p)}")
    entries = []  # (x1, x2, y value, probability)
    for s, g, i in itertools.product(range(ks), range(kg), range(ki)):
        pr = 1.0 / (ks * kg * ki)
        x1, x2 = s * kg + g, s * ki + i
        if name in MECHANISMS:
            entries.append((x1, x2, int(mechanism_label(name, s, g, i, k_xor)), pr))
        elif name == "product":
            entries.append((x1, x2, round(float(_centred(g, kg) * _centred(i, ki)), 12), pr))
        else:
            for mech, w in mixtures[name].items():
                if float(w) > 0:
                    entries.append((x1, x2, int(mechanism_label(mech, s, g, i, k_xor)), pr * float(w)))
    y_values = sorted({e[2] for e in entries})
    joint = np.zeros((ks * kg, ks * ki, len(y_values)))
    for x1, x2, y, pr in entries:
        joint[x1, x2, y_values.index(y)] += pr
    return joint


def task_joints(params: Mapping | None, tasks: Mapping[str, str] | list[str]) -> dict[str, np.ndarray]:
    """{task: :func:`task_joint`} for ``tasks`` (a list of label names, or {task: label or obsm name})."""
    mapping = dict(tasks) if isinstance(tasks, Mapping) else {t: t for t in tasks}
    return {task: task_joint(params, src) for task, src in mapping.items()}


def _mixing(rng: np.random.Generator, k_shared: int, k_own: int, p: dict, d: int) -> dict:
    c, nn, h = int(p["code_dim"]), int(p["nuisance_dim"]), int(p["hidden_dim"])
    fan_in = 2 * c + nn
    return dict(
        code_shared=rng.standard_normal((k_shared, c)),
        code_own=rng.standard_normal((k_own, c)),
        w1=rng.standard_normal((h, fan_in)) * float(p["gain"]) / np.sqrt(fan_in),
        b1=rng.standard_normal(h) * 0.5,
        w2=rng.standard_normal((d, h)) / np.sqrt(h),
    )


def modality_embedding(mix: dict, s: np.ndarray, own: np.ndarray, nuisance: np.ndarray) -> np.ndarray:
    """Noise-free embedding W2 tanh(W1 [E^s[s] ‖ E^own[own] ‖ ν] + b1), shape (n, d) (module docstring, step 2)."""
    u = np.concatenate([mix["code_shared"][s], mix["code_own"][own], nuisance], axis=1)
    return np.tanh(u @ mix["w1"].T + mix["b1"]) @ mix["w2"].T


def simulate(params: Mapping | None) -> ad.AnnData:
    """Draw the synthetic dataset (module docstring) as a spots AnnData of the data model.

    Parameters
    ----------
    params : ``datasets.<d>.generator`` (:data:`GENERATOR_DEFAULTS`); ``seed`` fixes the mixing networks and the
        draws, so the same parameters give the same data.

    Returns
    -------
    AnnData with n = n_slides · rows · columns spots and no genes; obs: slide, donor, x_um, y_um, px_x, px_y,
    split (``eval``), the label columns of :func:`label_names` (strings, categorical) and the latents
    ``latent_shared``, ``latent_gex``, ``latent_img`` (int); obsm: ``gex_embedding`` (n, dims.gex),
    ``img_embedding`` (n, dims.img), ``product`` (n, 1); uns: ``slides`` (no image), ``generator`` (the
    parameters as JSON).
    """
    import json

    p = generator_params(params)
    rng = np.random.default_rng(int(p["seed"]))
    ks, kg, ki = (int(p["latent"][f]) for f in ("shared", "gex", "img"))
    k_xor = min(kg, ki)
    d_gex, d_img = int(p["dims"]["gex"]), int(p["dims"]["img"])
    mix = {"gex": _mixing(rng, ks, kg, p, d_gex), "img": _mixing(rng, ks, ki, p, d_img)}
    rows, cols = (int(v) for v in p["grid"])
    spacing = float(p["spacing_um"])
    n_slides, n_donors = int(p["n_slides"]), int(p["n_donors"])
    obs_parts, s_all = [], []
    for j in range(n_slides):
        slide = f"S{j + 1}"
        rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        x_um, y_um = cc.ravel() * spacing, rr.ravel() * spacing
        if p["block_um"]:
            bx = np.floor(x_um / float(p["block_um"])).astype(int)
            by = np.floor(y_um / float(p["block_um"])).astype(int)
            block = bx * (by.max() + 1) + by
            block_value = rng.integers(0, ks, size=block.max() + 1)
            s_all.append(block_value[block])
        else:
            s_all.append(rng.integers(0, ks, size=len(x_um)))
        obs_parts.append(pd.DataFrame({
            "spot_id": [f"{slide}_{r}x{c}" for r, c in zip(rr.ravel(), cc.ravel())],
            "slide": slide, "donor": f"D{j % n_donors + 1}", "x_um": x_um, "y_um": y_um,
        }))
    obs = pd.concat(obs_parts, ignore_index=True).set_index("spot_id")
    n = len(obs)
    s = np.concatenate(s_all)
    g = rng.integers(0, kg, size=n)
    i = rng.integers(0, ki, size=n)
    slide_idx = pd.factorize(obs["slide"])[0]
    emb = {}
    for m, own, d in (("gex", g, d_gex), ("img", i, d_img)):
        nuisance = rng.standard_normal((n, int(p["nuisance_dim"]))) * float(p["nuisance_sd"])
        shift = rng.standard_normal((n_slides, d)) * float(p["slide_shift_sd"])
        noise = rng.standard_normal((n, d)) * float(p["noise_sd"])
        emb[m] = (modality_embedding(mix[m], s, own, nuisance) + shift[slide_idx] + noise).astype(np.float32)
    obs["px_x"], obs["px_y"], obs["split"] = obs["x_um"], obs["y_um"], "eval"
    labels = {mech: mechanism_label(mech, s, g, i, k_xor) for mech in MECHANISMS}
    prefix = {"redundant": "s", "unique_gex": "g", "unique_img": "i", "synergy": "y"}
    for mech in MECHANISMS:
        obs[mech] = [f"{prefix[mech]}{v}" for v in labels[mech]]
    for name, w in (p["mixtures"] or {}).items():
        mechs = list(w)
        pick = rng.choice(len(mechs), size=n, p=np.array([float(w[m]) for m in mechs]))
        value = np.choose(pick, [labels[m] for m in mechs])
        obs[name] = [f"y{v}" for v in value]
    product = _centred(g, kg) * _centred(i, ki) + rng.standard_normal(n) * float(p["product_noise_sd"])
    obs["latent_shared"], obs["latent_gex"], obs["latent_img"] = s, g, i
    for c in ("slide", "donor", "split", *MECHANISMS, *(p["mixtures"] or {})):
        obs[c] = obs[c].astype("category")
    a = ad.AnnData(X=sp.csr_matrix((n, 0), dtype=np.float32), obs=obs)
    a.obsm["gex_embedding"] = emb["gex"]
    a.obsm["img_embedding"] = emb["img"]
    a.obsm["product"] = product[:, None].astype(np.float64)
    a.uns["slides"] = {sl: {"image_path": "", "um_per_px": 1.0} for sl in obs["slide"].cat.categories}
    a.uns["generator"] = json.dumps(p)
    a.uns["spot_diameter_um"] = 0.5 * float(p["spacing_um"])  # drawn as circles in sdata.zarr
    log.info("synthetic: %d spots on %d slides (%d donors); latents K_s=%d, K_g=%d, K_i=%d; GEX %d-d, IMG %d-d",
             n, n_slides, n_donors, ks, kg, ki, d_gex, d_img)
    return a


def build_dataset(params: dict, seed: int):
    """Reader adapter (``reader: synthetic``): :func:`simulate` of ``params['generator']``; returns (spots, None).

    The generator's own ``seed`` (default 0) fixes the data, not the workflow's ``seeds``, so that training seeds
    vary the training only.
    """
    return simulate(params.get("generator") or {}), None


def input_files(params: dict) -> list[str]:
    """A synthetic dataset reads no file."""
    return []
