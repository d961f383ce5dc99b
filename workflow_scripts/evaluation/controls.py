"""Dimension-matched controls: untrained random linear re-encodings of the unimodal embeddings.

A fused embedding of dimension D differs from its inputs in two ways: it combines the two modalities, and it is
a different *encoding* (another dimension, other scales, mixed features). A linear probe can react to the second
alone: a random, information-preserving linear map of one modality's embedding to D dimensions moves the probe
score, and hence SIS, by itself. A control separates the two. For every fused method of dimension D the probes
also score, with exactly the same folds,

* ``control_gex@<method>``: ``std(Z_gex) @ R_gex``, a random linear re-encoding of GEX to D dimensions;
* ``control_img@<method>``: ``std(Z_img) @ R_img``, the same for IMG;
* ``control_concat@<method>``: ``[std(Z_img) ‖ std(Z_gex)] @ R_concat``, the same for the concatenation (in the
  reference's order, IMG first; docs/reference.md#fused-embeddings).

``std`` standardises every input feature to mean 0 and variance 1 with the statistics of the spots the method's
interface was fitted on (all spots under the transductive protocol, the training donors of the outer fold under the
inductive one), so a control sees its inputs on the same footing as a method that standardises them; without it,
features with large variance dominate every random mixture and the rest are lost below the float32 resolution.
``R`` is a (d_in, D) matrix of independent N(0, 1/d_in) entries drawn from
``numpy.random.default_rng([seed, crc32("control_<kind>"), D])``: it depends on the run seed, the kind of control
and D only, so every method of the same dimension is compared with the same control, and a control is the same in
every protocol. A Gaussian matrix with D ≥ d_in has full column rank with probability 1 (the map loses nothing);
with D < d_in the control keeps a random D-dimensional projection, as a D-dimensional interface would have to.

Untrained random maps as baselines for learned representations: Saxe et al. 2011 (ICML, "On random weights and
unsupervised feature learning"); the D-matched linear form used here: docs/evaluation.md#controls.
"""

from __future__ import annotations

import zlib
from typing import Literal, Sequence

import numpy as np

ControlKind = Literal["gex", "img", "concat"]
CONTROL_KINDS: tuple[str, ...] = ("gex", "img", "concat")
CONTROL_PREFIX = "control_"
SEPARATOR = "@"


def control_name(kind: str, method: str) -> str:
    """Embedding name of a control in the result tables: ``control_<kind>@<method>``.

    Raises ValueError for an unknown ``kind`` (one of :data:`CONTROL_KINDS`).
    """
    if kind not in CONTROL_KINDS:
        raise ValueError(f"unknown control kind {kind!r}; expected one of {CONTROL_KINDS}")
    return f"{CONTROL_PREFIX}{kind}{SEPARATOR}{method}"


def parse_control_name(name: str) -> tuple[str, str] | None:
    """``(kind, method)`` of a control's embedding name, or None when ``name`` is not a control."""
    if not name.startswith(CONTROL_PREFIX) or SEPARATOR not in name:
        return None
    kind, method = name[len(CONTROL_PREFIX):].split(SEPARATOR, 1)
    return (kind, method) if kind in CONTROL_KINDS and method else None


def control_matrix(d_in: int, d_out: int, seed: int, kind: str) -> np.ndarray:
    """The random map R of a control, shape (d_in, d_out), entries i.i.d. N(0, 1/d_in), float64.

    Drawn from ``numpy.random.default_rng([seed, crc32("control_" + kind), d_out])`` (module docstring), so it
    is the same for every method of dimension ``d_out``. Raises ValueError for non-positive sizes, a negative
    seed or an unknown kind.
    """
    if kind not in CONTROL_KINDS:
        raise ValueError(f"unknown control kind {kind!r}; expected one of {CONTROL_KINDS}")
    if d_in < 1 or d_out < 1:
        raise ValueError(f"control sizes must be positive, got d_in={d_in}, d_out={d_out}")
    if seed < 0:
        raise ValueError(f"control seed must be >= 0, got {seed}")
    rng = np.random.default_rng([int(seed), zlib.crc32(f"{CONTROL_PREFIX}{kind}".encode()), int(d_out)])
    return rng.standard_normal((int(d_in), int(d_out))) / np.sqrt(d_in)


def standardise(x: np.ndarray, fit_rows: np.ndarray | None = None) -> np.ndarray:
    """Columns of ``x`` (n, d) scaled to mean 0 and variance 1 with the statistics of ``fit_rows``.

    ``fit_rows``: boolean (n,) mask or integer row positions (None = all rows). Constant columns (sd 0 over the fit
    rows) become 0. Returns float64 (n, d). Raises ValueError when ``x`` is not 2-D or ``fit_rows`` selects no row.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D (n_spots, n_features) array, got shape {x.shape}")
    ref = x if fit_rows is None else x[np.asarray(fit_rows)]
    if len(ref) == 0:
        raise ValueError("standardise: fit_rows selects no row")
    mu = ref.mean(axis=0)
    sd = ref.std(axis=0)
    sd[sd == 0] = np.inf
    return (x - mu) / sd


def random_reencoding(
    inputs: Sequence[np.ndarray], d_out: int, seed: int, kind: str, fit_rows: np.ndarray | None = None
) -> np.ndarray:
    """A control embedding: the standardised, concatenated ``inputs`` mapped by :func:`control_matrix`.

    Parameters
    ----------
    inputs : arrays of shape (n_spots, d_k), concatenated along features in the given order (one array for
        ``gex``/``img``; ``[img, gex]`` for ``concat``). Each is standardised separately (:func:`standardise`).
    d_out : D, the dimension of the fused embedding being controlled.
    seed : run seed.
    kind : ``gex``, ``img`` or ``concat``.
    fit_rows : rows whose statistics standardise the inputs (the interface's fit spots; None = all).

    Returns
    -------
    (n_spots, d_out) float64 array. Raises ValueError for mismatched row counts (or the errors of the helpers).
    """
    if not inputs:
        raise ValueError("random_reencoding needs at least one input array")
    n = {np.asarray(a).shape[0] for a in inputs}
    if len(n) != 1:
        raise ValueError(f"inputs of a control must have the same number of rows, got {sorted(n)}")
    x = np.hstack([standardise(a, fit_rows) for a in inputs])
    return x @ control_matrix(x.shape[1], d_out, seed, kind)
