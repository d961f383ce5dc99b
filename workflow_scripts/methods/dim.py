"""Deep InfoMax-style cross-modal MI maximisation, as in the reference's ``dim.py``
(docs/reference.md#fusion-methods).

* encoder per modality: Linear(d, H) → LN → GELU → Linear(H, P) → LN → GELU → Linear(P, P), H = ``hidden_dim``
  (512), P = ``projection_dim`` (256); outputs L2-normalised;
* critic (``mi_estimator: mlp``): Linear(2P, P) → GELU → Linear(P, 1) applied to every pair [z_img_i ‖ z_gex_j]
  (a B×B×2P tensor) → logits (B, B), divided by τ = ``temperature`` (0.1);
* loss = CE(logits, arange(B)): InfoNCE in one direction, image → GEX (each image spot must pick its own GEX spot).

Decision on direction (docs/reference.md#flaw-11): the reference's one-directional contrast is kept as the default
(``symmetric: false``) to stay faithful; ``symmetric: true`` averages it with the GEX → image direction
(CE over the columns of the same critic matrix). The loss is written by hand (no library has this pairwise critic).

Z3 = [n(z_img) ‖ n(z_gex)] (n, 2P); views = (n(z_img), n(z_gex)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AlignModel, mlp_ln_gelu

DEFAULTS = {"temperature": 0.1, "hidden_dim": 512, "symmetric": False}


class DIM(AlignModel):
    """DIM with an MLP critic (module docstring). ``params``: projection_dim, hidden_dim, temperature, symmetric."""

    method = "dim"

    def __init__(self, d_img: int, d_gex: int, params: dict):
        super().__init__()
        p, hid = int(params["projection_dim"]), int(params["hidden_dim"])
        self.temperature, self.symmetric = float(params["temperature"]), bool(params["symmetric"])
        self.enc_img, self.enc_gex = mlp_ln_gelu(d_img, hid, p), mlp_ln_gelu(d_gex, hid, p)
        self.critic = nn.Sequential(nn.Linear(2 * p, p), nn.GELU(), nn.Linear(p, 1))
        self.z3_dim, self.view_dim = 2 * p, p

    def views(self, x_img, x_gex):
        return F.normalize(self.enc_img(x_img), dim=-1), F.normalize(self.enc_gex(x_gex), dim=-1)

    def scores(self, z_img: torch.Tensor, z_gex: torch.Tensor) -> torch.Tensor:
        """Critic logits (B, B): entry (i, j) scores the pair (image i, GEX j), divided by the temperature."""
        b = z_img.shape[0]
        pairs = torch.cat([z_img.unsqueeze(1).expand(b, b, -1), z_gex.unsqueeze(0).expand(b, b, -1)], dim=-1)
        return self.critic(pairs).squeeze(-1) / self.temperature

    def loss(self, x_img, x_gex):
        logits = self.scores(*self.views(x_img, x_gex))
        target = torch.arange(logits.shape[0], device=logits.device)
        loss = F.cross_entropy(logits, target)
        if self.symmetric:
            loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
        return loss

    def embed(self, x_img, x_gex):
        return torch.cat(self.views(x_img, x_gex), dim=1)
