"""SimSiam (Chen & He, CVPR 2021) across modalities, as in the reference's ``simsiam.py``
(docs/reference.md#fusion-methods).

* encoder per modality: Linear(d, H) → LN → GELU → Linear(H, P) → LN → GELU → Linear(P, P), H = ``hidden_dim``
  (the reference's ``projection_hidden_dim``, 512), P = ``projection_dim`` (256);
* predictor per modality: Linear(P, P/2, bias=False) → BatchNorm1d(P/2) → ReLU → Linear(P/2, P)
  (``pred_dim`` = P/2 = 128);
* loss = −½[cos(p_img, sg(z_gex)) + cos(p_gex, sg(z_img))], batch mean, sg = stop-gradient. Each term is
  ``lightly.loss.NegativeCosineSimilarity`` (−mean cosine similarity), which is exactly the reference's formula
  (its explicit L2-normalisation before the cosine does not change the cosine).

Z3 = [n(z_img) ‖ n(z_gex)] (n, 2P); views = (n(z_img), n(z_gex)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.loss import NegativeCosineSimilarity
from torch import nn

from .base import AlignModel, mlp_ln_gelu

DEFAULTS = {"hidden_dim": 512, "pred_dim": None}


def _predictor(p: int, h: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(p, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, p))


class SimSiam(AlignModel):
    """Cross-modal SimSiam (module docstring). ``params``: projection_dim, hidden_dim, pred_dim."""

    method = "simsiam"

    def __init__(self, d_img: int, d_gex: int, params: dict):
        super().__init__()
        p, hid = int(params["projection_dim"]), int(params["hidden_dim"])
        h = int(params["pred_dim"] or max(p // 2, 1))
        self.enc_img, self.enc_gex = mlp_ln_gelu(d_img, hid, p), mlp_ln_gelu(d_gex, hid, p)
        self.pred_img, self.pred_gex = _predictor(p, h), _predictor(p, h)
        self.criterion = NegativeCosineSimilarity()
        self.z3_dim, self.view_dim = 2 * p, p

    def loss(self, x_img, x_gex):
        z_img, z_gex = self.enc_img(x_img), self.enc_gex(x_gex)
        p_img, p_gex = self.pred_img(z_img), self.pred_gex(z_gex)
        return 0.5 * (self.criterion(p_img, z_gex.detach()) + self.criterion(p_gex, z_img.detach()))

    def views(self, x_img, x_gex):
        return F.normalize(self.enc_img(x_img), dim=-1), F.normalize(self.enc_gex(x_gex), dim=-1)

    def embed(self, x_img, x_gex):
        return torch.cat(self.views(x_img, x_gex), dim=1)
