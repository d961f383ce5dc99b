"""Barlow Twins (Zbontar et al., ICML 2021) across modalities, as in the reference's
``barlowtwins.py`` (docs/reference.md#fusion-methods).

* projector per modality: Linear(d, P, bias=False) → BatchNorm1d(P) → ReLU → Linear(P, P, bias=False);
* one shared ``BatchNorm1d(P, affine=False)`` applied to both projections; c = BN(z_img)ᵀ BN(z_gex) / B;
* loss = Σ_i (c_ii − 1)² + λ Σ_{i≠j} c_ij², λ = ``lambda_offdiag`` (0.0051; the reference's ``scale_loss`` is unused).

Written by hand rather than with ``lightly.loss.BarlowTwinsLoss``: lightly standardises with batch statistics in
every mode, while the reference uses a BatchNorm *module*, which normalises with its running statistics in eval mode
(i.e. for the validation loss; the running statistics mix both modalities because the module is shared). In
training mode both are identical (tested in tests/test_methods.py).

Z3 = [n(z_img) ‖ n(z_gex)] of the projections before the shared BN (n, 2P); views = (z_img, z_gex), unnormalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AlignModel

DEFAULTS = {"lambda_offdiag": 0.0051}


def _projector(d: int, p: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, p, bias=False), nn.BatchNorm1d(p), nn.ReLU(), nn.Linear(p, p, bias=False))


def barlow_twins_loss(za: torch.Tensor, zb: torch.Tensor, lambda_offdiag: float) -> torch.Tensor:
    """Σ(c_ii − 1)² + λ Σ_{i≠j} c_ij² for c = zaᵀ zb / B of two already normalised (B, P) batches."""
    c = za.T @ zb / za.shape[0]
    diag = torch.diagonal(c)
    return (diag - 1).pow(2).sum() + lambda_offdiag * (c.pow(2).sum() - diag.pow(2).sum())


class BarlowTwins(AlignModel):
    """Cross-modal Barlow Twins (module docstring). ``params``: projection_dim, lambda_offdiag."""

    method = "barlow_twins"

    def __init__(self, d_img: int, d_gex: int, params: dict):
        super().__init__()
        p = int(params["projection_dim"])
        self.lambd = float(params["lambda_offdiag"])
        self.proj_img, self.proj_gex = _projector(d_img, p), _projector(d_gex, p)
        self.bn = nn.BatchNorm1d(p, affine=False)
        self.z3_dim, self.view_dim = 2 * p, p

    def views(self, x_img, x_gex):
        return self.proj_img(x_img), self.proj_gex(x_gex)

    def loss(self, x_img, x_gex):
        z_img, z_gex = self.views(x_img, x_gex)
        return barlow_twins_loss(self.bn(z_img), self.bn(z_gex), self.lambd)

    def embed(self, x_img, x_gex):
        z_img, z_gex = self.views(x_img, x_gex)
        return torch.cat([F.normalize(z_img, dim=-1), F.normalize(z_gex, dim=-1)], dim=1)
