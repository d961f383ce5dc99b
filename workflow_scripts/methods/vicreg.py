"""VICReg (Bardes et al., ICLR 2022) across modalities, as in the reference's ``vicreg.py``
(docs/reference.md#fusion-methods).

* projector per modality: Linear(d, P) → BatchNorm1d(P) → ReLU → Linear(P, P, bias=False);
* loss = 25·MSE(x, y) + 25·½[mean ReLU(1 − sqrt(Var(x) + 1e-4)) + mean ReLU(1 − sqrt(Var(y) + 1e-4))]
  + 1·[Σ offdiag(Cov(x))² / P + Σ offdiag(Cov(y))² / P], Var unbiased, Cov with 1/(B − 1)
  (coefficients ``sim_coeff``, ``std_coeff``, ``cov_coeff``).

The loss is ``lightly.loss.VICRegLoss(lambda_param=sim_coeff, mu_param=std_coeff, nu_param=cov_coeff, eps=1e-4)``,
whose terms are exactly the above (checked against a hand computation in tests/test_methods.py).

Z3 = [n(x) ‖ n(y)] (n, 2P); views = (x, y), unnormalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.loss import VICRegLoss
from torch import nn

from .base import AlignModel

DEFAULTS = {"sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0}


def _projector(d: int, p: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, p), nn.BatchNorm1d(p), nn.ReLU(), nn.Linear(p, p, bias=False))


class VICReg(AlignModel):
    """Cross-modal VICReg (module docstring). ``params``: projection_dim, sim_coeff, std_coeff, cov_coeff."""

    method = "vicreg"

    def __init__(self, d_img: int, d_gex: int, params: dict):
        super().__init__()
        p = int(params["projection_dim"])
        self.proj_img, self.proj_gex = _projector(d_img, p), _projector(d_gex, p)
        self.criterion = VICRegLoss(
            lambda_param=float(params["sim_coeff"]),
            mu_param=float(params["std_coeff"]),
            nu_param=float(params["cov_coeff"]),
            eps=1e-4,
        )
        self.z3_dim, self.view_dim = 2 * p, p

    def views(self, x_img, x_gex):
        return self.proj_img(x_img), self.proj_gex(x_gex)

    def loss(self, x_img, x_gex):
        return self.criterion(*self.views(x_img, x_gex))

    def embed(self, x_img, x_gex):
        x, y = self.views(x_img, x_gex)
        return torch.cat([F.normalize(x, dim=-1), F.normalize(y, dim=-1)], dim=1)
