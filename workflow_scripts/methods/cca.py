"""Classical regularised linear CCA (the reference's ``cca.py::LinearCCA``, docs/reference.md#fusion-methods).

Closed form, in numpy/scipy (not scikit-learn's iterative NIPALS ``CCA``, which solves a different, deflation-based
problem and does not use the ridge ``reg`` of the reference):

* centre each view with its training mean: H1 = X_img − μ_img, H2 = X_gex − μ_gex (m training spots);
* Σ11 = H1ᵀH1/(m−1) + reg·I, Σ22 = H2ᵀH2/(m−1) + reg·I, Σ12 = H1ᵀH2/(m−1), reg = 1e-4;
* T = Σ11^{-1/2} Σ12 Σ22^{-1/2} (inverse square roots by symmetric eigendecomposition, ``scipy.linalg.eigh``);
* SVD T = U S Vᵀ; W_img = Σ11^{-1/2} U[:, :k], W_gex = Σ22^{-1/2} V[:, :k];
* canonical variates Z_img = (X_img − μ_img) W_img, Z_gex = (X_gex − μ_gex) W_gex; Z3 = [Z_img ‖ Z_gex] (n, 2k).

``k = min(projection_dim, d_img, d_gex)`` (the reference uses k = projection_dim = 256 ≤ both input dims; with
smaller inputs there are only min(d_img, d_gex) canonical pairs). "Loss" (reported, never optimised) =
−Σ_i corr(Z_img[:, i], Z_gex[:, i]) over the k pairs on the validation split.

Fit data: the training split (1 − ``val_fraction`` of the spots, random, seeded), as the reference's
"collect all training embeddings, fit once"; Z3 is computed for every spot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.linalg

log = logging.getLogger(__name__)

DEFAULTS = {"reg": 1.0e-4}


def inv_sqrt_psd(mat: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Σ^{-1/2} of a symmetric positive (semi-)definite (d, d) matrix by eigendecomposition.

    Eigenvalues ≤ ``eps`` are dropped (pseudo-inverse root, as in the reference's DCCA loss;
    docs/reference.md#fusion-methods).
    """
    w, v = scipy.linalg.eigh(mat)
    keep = w > eps
    return (v[:, keep] / np.sqrt(w[keep])) @ v[:, keep].T


@dataclass
class LinearCCA:
    """A fitted linear CCA: ``mean_img`` (d_img,), ``mean_gex`` (d_gex,), ``w_img`` (d_img, k), ``w_gex`` (d_gex, k),
    ``corr`` (k,) the training canonical correlations (singular values of T), largest first."""

    mean_img: np.ndarray
    mean_gex: np.ndarray
    w_img: np.ndarray
    w_gex: np.ndarray
    corr: np.ndarray

    @property
    def k(self) -> int:
        return self.w_img.shape[1]

    def transform(self, x_img: np.ndarray, x_gex: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Canonical variates (Z_img, Z_gex), each (n, k) float64, for inputs (n, d_img), (n, d_gex)."""
        return (np.asarray(x_img, np.float64) - self.mean_img) @ self.w_img, (
            np.asarray(x_gex, np.float64) - self.mean_gex
        ) @ self.w_gex

    def state_dict(self) -> dict:
        """The fitted matrices as a dict of arrays (for saving)."""
        return {"mean_img": self.mean_img, "mean_gex": self.mean_gex, "w_img": self.w_img, "w_gex": self.w_gex,
                "corr": self.corr}

    @classmethod
    def from_state_dict(cls, state: dict) -> "LinearCCA":
        """Inverse of :meth:`state_dict` (accepts numpy arrays or torch tensors)."""
        return cls(**{k: np.asarray(state[k], dtype=np.float64) for k in ("mean_img", "mean_gex", "w_img", "w_gex",
                                                                          "corr")})


def fit_linear_cca(x_img: np.ndarray, x_gex: np.ndarray, k: int, reg: float = 1e-4) -> LinearCCA:
    """Fit regularised CCA (module docstring) on m paired rows; returns the top-``k`` canonical directions.

    ``x_img`` (m, d_img), ``x_gex`` (m, d_gex); ``k`` ≤ min(d_img, d_gex). Raises ValueError on m < 2 or bad k.
    """
    x1 = np.asarray(x_img, dtype=np.float64)
    x2 = np.asarray(x_gex, dtype=np.float64)
    m = x1.shape[0]
    if m < 2 or x2.shape[0] != m:
        raise ValueError(f"CCA needs >= 2 paired rows, got {x1.shape[0]} and {x2.shape[0]}")
    if not 1 <= k <= min(x1.shape[1], x2.shape[1]):
        raise ValueError(f"CCA rank k={k} must be in [1, min(d_img={x1.shape[1]}, d_gex={x2.shape[1]})]")
    mu1, mu2 = x1.mean(0), x2.mean(0)
    h1, h2 = x1 - mu1, x2 - mu2
    s11 = h1.T @ h1 / (m - 1) + reg * np.eye(x1.shape[1])
    s22 = h2.T @ h2 / (m - 1) + reg * np.eye(x2.shape[1])
    s12 = h1.T @ h2 / (m - 1)
    r11, r22 = inv_sqrt_psd(s11), inv_sqrt_psd(s22)
    u, s, vt = np.linalg.svd(r11 @ s12 @ r22, full_matrices=False)
    return LinearCCA(mu1, mu2, r11 @ u[:, :k], r22 @ vt[:k].T, s[:k])


def cca_loss(z_img: np.ndarray, z_gex: np.ndarray) -> float:
    """−Σ_i Pearson corr(z_img[:, i], z_gex[:, i]) over the k columns of (m, k) variates (reference "val loss")."""
    a = z_img - z_img.mean(0)
    b = z_gex - z_gex.mean(0)
    den = np.sqrt((a**2).sum(0) * (b**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, (a * b).sum(0) / den, 0.0)
    return -float(r.sum())
