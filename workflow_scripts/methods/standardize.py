"""Per-feature standardisation of the frozen embeddings before alignment (``training.standardize``).

The frozen embeddings reach the fusion methods on very different scales: the 48 offline morphology features have
standard deviations from about 0.0014 to 544 on HER2ST, PCA components shrink with their rank, foundation-model
features have their own ranges. A method's initial weights, learning rate, weight decay and CCA's ridge then act
on some features much more than on others. The reference feeds the raw embeddings (docs/reference.md#alignment);
here each feature of each modality is z-scored,

    x' = (x − μ) / σ,   μ, σ = mean and standard deviation (ddof 0) of the feature over the fitting rows,

with μ and σ estimated on the rows the method is fitted on only (its training split; under the inductive protocol
only the ``fit_mask`` rows), stored in the fitted state and applied unchanged to every row that is embedded later
(:func:`workflow_scripts.methods.embed_with_state`), as scikit-learn's ``StandardScaler`` does for a model. A
feature that is constant on the fitting rows (σ = 0) is only centred (σ replaced by 1) and counted in the log.

``concat`` is not standardised: it stays the raw [Z_img ‖ Z_gex] of the reference. Every consumer of a fused
embedding (probes, ring probes, spatial consistency, UMAP) z-scores each feature itself, so standardising
concat's inputs first would change none of its results beyond rounding.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

#: Names of the arrays kept in the fitted state (``state["input_scaling"]``).
KEYS = ("mean_img", "sd_img", "mean_gex", "sd_gex")


def feature_stats(x: np.ndarray, what: str = "embedding") -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ddof 0) of each column of ``x`` (m, d), float64, σ = 0 replaced by 1.

    Constant columns are counted in the log (with up to 10 column indices). Raises ValueError for m < 1.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{what}: need a 2-D array with >= 1 row to standardise, got shape {x.shape}")
    mean = x.mean(axis=0)
    sd = x.std(axis=0)
    const = ~(sd > 0)
    if const.any():
        cols = np.flatnonzero(const)
        log.warning("%s: %d of %d features are constant on the %d fitting rows (columns %s%s); they are centred, "
                    "not scaled", what, len(cols), x.shape[1], x.shape[0], cols[:10].tolist(),
                    " ..." if len(cols) > 10 else "")
        sd = np.where(const, 1.0, sd)
    return mean, sd


def fit_input_scaling(x_img: np.ndarray, x_gex: np.ndarray) -> dict:
    """Per-feature statistics of both modalities on the fitting rows: (m, d_img) and (m, d_gex) → a dict of
    float64 tensors :data:`KEYS` (savable with ``torch.save``, loadable with ``weights_only=True``)."""
    mean_img, sd_img = feature_stats(x_img, "IMG embedding")
    mean_gex, sd_gex = feature_stats(x_gex, "GEX embedding")
    log.info("standardised inputs: IMG feature SDs %.3g to %.3g, GEX feature SDs %.3g to %.3g (on %d fitting rows)",
             sd_img.min(), sd_img.max(), sd_gex.min(), sd_gex.max(), np.asarray(x_img).shape[0])
    return {k: torch.as_tensor(v) for k, v in zip(KEYS, (mean_img, sd_img, mean_gex, sd_gex))}


def apply_input_scaling(scaling: dict | None, x_img: np.ndarray, x_gex: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x − μ) / σ per feature with the statistics of :func:`fit_input_scaling`, as float32 arrays of the input
    shapes; ``scaling=None`` returns the inputs unchanged. Raises ValueError when the widths do not match."""
    if scaling is None:
        return x_img, x_gex
    out = []
    for name, x in (("img", x_img), ("gex", x_gex)):
        mean = np.asarray(scaling[f"mean_{name}"], dtype=np.float64)
        sd = np.asarray(scaling[f"sd_{name}"], dtype=np.float64)
        if x.shape[1] != len(mean):
            raise ValueError(f"input scaling was fitted on {len(mean)} {name.upper()} features, got {x.shape[1]}")
        out.append(((np.asarray(x, dtype=np.float64) - mean) / sd).astype(np.float32))
    return out[0], out[1]
