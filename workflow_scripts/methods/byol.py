"""BYOL (Grill et al., NeurIPS 2020) across modalities, as in the reference's ``byol.py``
(docs/reference.md#fusion-methods).

* online encoders: Linear(d, P) per modality (P = ``projection_dim``, 256);
* predictors per modality: Linear(P, P/2, bias=False) → LayerNorm(P/2) → GELU → Linear(P/2, P) (``pred_dim`` = P/2);
* target encoders: Linear(d, P) per modality, evaluated without gradient;
* loss = ½[MSE(n(p_img), n(t_gex)) + MSE(n(p_gex), n(t_img))], n = L2-normalisation, MSE = mean over elements
  (``F.mse_loss``, as in the reference, not the 2 − 2cos form); p = predictor(online(x)), t = target(x).

Z3 = [z_img ‖ z_gex] of the online encoders, not normalised (n, 2P); views = (z_img, z_gex).

Deliberate fix (deviation from the reference): EMA target update
----------------------------------------------------------------
The reference never updates its target encoders (they stay at their random initialisation, docs/reference.md#flaw-9). Here the
targets are initialised as copies of the online encoders and, after every optimiser step, updated by the BYOL
exponential moving average θ_target ← d·θ_target + (1 − d)·θ_online with d = ``ema_decay`` (config 0.99). Target
parameters have ``requires_grad=False`` and are not in the optimiser (no gradient, no weight decay).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .base import AlignModel

DEFAULTS = {"ema_decay": 0.99, "pred_dim": None}


def _predictor(p: int, h: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(p, h, bias=False), nn.LayerNorm(h), nn.GELU(), nn.Linear(h, p))


class BYOL(AlignModel):
    """Cross-modal BYOL with EMA targets (module docstring). ``params``: projection_dim, ema_decay, pred_dim."""

    method = "byol"

    def __init__(self, d_img: int, d_gex: int, params: dict):
        super().__init__()
        p = int(params["projection_dim"])
        h = int(params["pred_dim"] or max(p // 2, 1))
        self.decay = float(params["ema_decay"])
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"byol: ema_decay must be in [0, 1], got {self.decay} (training.method_params.byol)")
        self.online_img, self.online_gex = nn.Linear(d_img, p), nn.Linear(d_gex, p)
        self.pred_img, self.pred_gex = _predictor(p, h), _predictor(p, h)
        self.target_img, self.target_gex = copy.deepcopy(self.online_img), copy.deepcopy(self.online_gex)
        for prm in list(self.target_img.parameters()) + list(self.target_gex.parameters()):
            prm.requires_grad_(False)
        self.z3_dim, self.view_dim = 2 * p, p

    def loss(self, x_img, x_gex):
        p_img = self.pred_img(self.online_img(x_img))
        p_gex = self.pred_gex(self.online_gex(x_gex))
        with torch.no_grad():
            t_img, t_gex = self.target_img(x_img), self.target_gex(x_gex)
        n = lambda t: F.normalize(t, dim=-1)  # noqa: E731
        return 0.5 * (F.mse_loss(n(p_img), n(t_gex)) + F.mse_loss(n(p_gex), n(t_img)))

    @torch.no_grad()
    def after_step(self):
        """EMA update of the target encoders from the online encoders."""
        for online, target in ((self.online_img, self.target_img), (self.online_gex, self.target_gex)):
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.mul_(self.decay).add_(po.detach(), alpha=1.0 - self.decay)

    def views(self, x_img, x_gex):
        return self.online_img(x_img), self.online_gex(x_gex)

    def embed(self, x_img, x_gex):
        return torch.cat(self.views(x_img, x_gex), dim=1)
