"""Deep CCA (Andrew et al., ICML 2013), as coded in the reference's ``dcca.py``
(docs/reference.md#fusion-methods).

Architecture, per modality (``MlpNet`` with layer sizes [1024, 1024, k]):
Linear(d, 1024) → Sigmoid → BatchNorm1d(1024, affine=False) → Linear(1024, 1024) → Sigmoid →
BatchNorm1d(1024, affine=False) → BatchNorm1d(1024, affine=False) → Linear(1024, k).
Xavier-uniform weights, zero biases. Z3 = [out_img ‖ out_gex] (raw, not normalised), (n, 2k).

Output size: ``k = min(projection_dim, d_img, d_gex)`` (logged). For the paper's inputs (1536, 512) this is the
reference's 256; for small inputs (e.g. 50 PCA components) it keeps DCCA's output rank comparable with linear CCA.

Loss (Andrew et al.; reference ``CCALoss`` with ``use_all_singular_values=False``), written by hand in torch:
centre the (m, k) outputs; Σ11 = H1ᵀH1/(m−1) + r·I, Σ22 likewise, Σ12 = H1ᵀH2/(m−1), r = 1e-3;
T = Σ11^{-1/2} Σ12 Σ22^{-1/2}; λ = eigenvalues of TᵀT + r·I, clamped to ≥ eps = 1e-12;
loss = −Σ_{top-k} sqrt(λ) (≈ minus the sum of the canonical correlations).

Deliberate numerical fix: the same loss value is computed with Cholesky whitening instead of inverse square roots
by eigendecomposition, because the latter's gradient is NaN whenever eigenvalues repeat, i.e. whenever the batch
is not larger than the output dimension (the reference's setting: B = 32 < 256). See :func:`dcca_loss`.

Caveat (kept as in the reference): with batch_size B ≤ k a batch's covariances have rank ≤ B − 1, so B − 1 batch
canonical correlations are trivially ≈ 1 and the loss saturates near −(B − 1) − (k − B + 1)·√r from the first
epochs; the validation loss is then almost constant and early stopping / best-epoch selection carry little
information. A DCCA batch well above k (``training.method_params.dcca.batch_size``) avoids this.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AlignModel

DEFAULTS = {"hidden_dims": [1024, 1024], "reg": 1.0e-3, "eps": 1.0e-12}


class MlpNet(nn.Module):
    """DCCA tower: hidden blocks Linear → Sigmoid → BatchNorm1d(affine=False); last block BatchNorm1d(affine=False)
    → Linear(h, d_out). Input (B, d_in) → output (B, d_out). Reference: docs/reference.md#fusion-methods."""

    def __init__(self, d_in: int, hidden: list[int], d_out: int):
        super().__init__()
        sizes = [d_in] + list(hidden)
        blocks = [
            nn.Sequential(nn.Linear(a, b), nn.Sigmoid(), nn.BatchNorm1d(b, affine=False))
            for a, b in zip(sizes[:-1], sizes[1:])
        ]
        blocks.append(nn.Sequential(nn.BatchNorm1d(sizes[-1], affine=False), nn.Linear(sizes[-1], d_out)))
        self.layers = nn.Sequential(*blocks)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def dcca_loss(h1: torch.Tensor, h2: torch.Tensor, k: int, reg: float = 1e-3, eps: float = 1e-12) -> torch.Tensor:
    """Negative total canonical correlation of two (m, o) outputs (Andrew et al. 2013; module docstring).

    Uses the top-``k`` eigenvalues of TᵀT + reg·I. Returns a 0-d tensor (float64 internally, input dtype out).
    Raises ValueError when m < 2.

    T is computed as L1⁻¹ Σ12 L2⁻ᵀ with Cholesky factors Σ11 = L1 L1ᵀ, Σ22 = L2 L2ᵀ instead of the reference's
    Σ11^{-1/2} Σ12 Σ22^{-1/2}: both differ only by orthogonal factors (L⁻¹ = Q Σ^{-1/2} with Q orthogonal), so TᵀT has
    the same eigenvalues and the loss has the same value. The reason is the gradient: the backward pass of an
    eigendecomposition divides by eigenvalue gaps and returns NaN when eigenvalues repeat, which happens whenever
    the batch is not larger than the output dimension (e.g. the reference's B = 32, k = 256: Σ11 then has k − B + 1
    eigenvalues equal to ``reg``). The reference's "drop eigenpairs ≤ eps" step never applies because Σ + reg·I has
    all eigenvalues ≥ reg. The final ``eigvalsh`` needs no eigenvector gradients and is stable.
    """
    m = h1.shape[0]
    if m < 2:
        raise ValueError(f"DCCA loss needs a batch of >= 2 rows, got {m}")
    out_dtype = h1.dtype
    h1 = h1.double() - h1.double().mean(0, keepdim=True)
    h2 = h2.double() - h2.double().mean(0, keepdim=True)
    eye1 = torch.eye(h1.shape[1], dtype=h1.dtype, device=h1.device)
    eye2 = torch.eye(h2.shape[1], dtype=h2.dtype, device=h2.device)
    l1 = torch.linalg.cholesky(h1.T @ h1 / (m - 1) + reg * eye1)
    l2 = torch.linalg.cholesky(h2.T @ h2 / (m - 1) + reg * eye2)
    s12 = h1.T @ h2 / (m - 1)
    a = torch.linalg.solve_triangular(l1, s12, upper=False)  # L1⁻¹ Σ12
    t = torch.linalg.solve_triangular(l2, a.T, upper=False).T  # L1⁻¹ Σ12 L2⁻ᵀ
    lam = torch.clamp(torch.linalg.eigvalsh(t.T @ t + reg * eye2), min=eps)
    return (-torch.sqrt(torch.topk(lam, min(k, lam.shape[0])).values).sum()).to(out_dtype)


class DCCA(AlignModel):
    """Deep CCA fusion (module docstring). ``params``: projection_dim, hidden_dims, reg, eps."""

    method = "dcca"

    def __init__(self, d_img: int, d_gex: int, params: dict):
        super().__init__()
        self.k = int(min(params["projection_dim"], d_img, d_gex))
        self.reg, self.eps = float(params["reg"]), float(params["eps"])
        hidden = [int(h) for h in params["hidden_dims"]]
        self.net_img = MlpNet(d_img, hidden, self.k)
        self.net_gex = MlpNet(d_gex, hidden, self.k)
        self.z3_dim, self.view_dim = 2 * self.k, self.k

    def views(self, x_img, x_gex):
        return self.net_img(x_img), self.net_gex(x_gex)

    def loss(self, x_img, x_gex):
        return dcca_loss(*self.views(x_img, x_gex), k=self.k, reg=self.reg, eps=self.eps)

    def embed(self, x_img, x_gex):
        return torch.cat(self.views(x_img, x_gex), dim=1)
