"""SimCLR/CLIP-style cross-modal contrastive alignment, as in the reference's ``simclr.py``
(docs/reference.md#fusion-methods).

Per modality: Linear(d, P) → LayerNorm(P) → GELU → Linear(P, P), P = ``projection_dim`` (256); outputs L2-normalised.
Loss: logits = f_img f_gexᵀ / τ (τ = ``temperature``, 0.07); ½[CE(logits, i) + CE(logitsᵀ, i)] with the diagonal
as the positive class. The reference passes the identity matrix as soft targets to ``F.cross_entropy``; we pass
the class indices ``arange(B)``, which gives the identical value and gradient (docs/reference.md#flaw-11). Written by hand with
``torch.nn.functional.cross_entropy`` (lightly's NTXentLoss is the 2B×2B SimCLR form, not this B×B CLIP form).

Z3 = [n(f_img) ‖ n(f_gex)] (n, 2P); views = (n(f_img), n(f_gex)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AlignModel

DEFAULTS = {"temperature": 0.07}


def clip_loss(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of two (B, P) L2-normalised batches, positives on the diagonal (CLIP, Radford 2021)."""
    logits = a @ b.T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class SimCLR(AlignModel):
    """Cross-modal SimCLR/CLIP (module docstring). ``params``: projection_dim, temperature."""

    method = "simclr"

    def __init__(self, d_img: int, d_gex: int, params: dict):
        super().__init__()
        p = int(params["projection_dim"])
        self.temperature = float(params["temperature"])
        self.proj_img = nn.Sequential(nn.Linear(d_img, p), nn.LayerNorm(p), nn.GELU(), nn.Linear(p, p))
        self.proj_gex = nn.Sequential(nn.Linear(d_gex, p), nn.LayerNorm(p), nn.GELU(), nn.Linear(p, p))
        self.z3_dim, self.view_dim = 2 * p, p

    def views(self, x_img, x_gex):
        return F.normalize(self.proj_img(x_img), dim=-1), F.normalize(self.proj_gex(x_gex), dim=-1)

    def loss(self, x_img, x_gex):
        return clip_loss(*self.views(x_img, x_gex), self.temperature)

    def embed(self, x_img, x_gex):
        return torch.cat(self.views(x_img, x_gex), dim=1)
