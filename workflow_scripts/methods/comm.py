"""CoMM (Dufumier & Castillo-Navarro et al., ICLR 2025) on frozen embeddings, as in the reference
(docs/reference.md#fusion-methods).

Architecture (reference ``CoMMBaseline`` wrapping upstream ``MMFusion`` with ``fusion="x-attn"``, ``pool="mean"``):

* adapters: Linear(d_img, D), Linear(d_gex, D), each producing one token (B, 1, D); D = ``embed_dim`` (512, docs/reference.md#flaw-3).
* fusion: two stacks of ``n_layers`` residual cross-attention blocks, stack 0 updates the image token attending to
  the (fixed) GEX token, stack 1 the GEX token attending to the image token. Block: x ← x + MHA(LN_x(x), LN_y(y),
  LN_y(y)); x ← x + MLP(LN(x)), MLP = Linear(D, 4D) → QuickGELU (x·σ(1.702x)) → Linear(4D, D); ``n_heads`` heads.
  Output: LayerNorm over the concatenated 2 tokens, then the mean of the 2 tokens → fused (B, D).
  Init: attention in_proj ~ N(0, std D^-½), out_proj and MLP c_proj ~ N(0, std D^-½·(2·n_layers)^-½),
  c_fc ~ N(0, std (2D)^-½); biases and LayerNorms at PyTorch defaults.
* projector (shared): Linear(D, D) → ReLU → Linear(D, D).
* loss: for each of the two views v, z_v = [proj(adapter_img(img_v)), proj(adapter_gex(gex_v)),
  proj(fused(img_v, gex_v))]; loss = mean over i ∈ {img, gex, fused} of ½[InfoNCE(z1_i, z2_fused) +
  InfoNCE(z2_i, z1_fused)], τ = ``temperature`` (0.07). InfoNCE is the SimCLR NT-Xent over the 2B×2B similarity
  matrix of L2-normalised vectors; we use ``lightly.loss.NTXentLoss(temperature)`` which computes exactly that
  (positives (a_i, b_i), self-similarities excluded, mean over all 2B rows).
* Z3 = L2-normalised fused vector (pre-projector), (n, D). Views = L2-normalised projected unimodal embeddings
  proj(adapter(x)) (the reference's ``get_embeddings``), (n, D) each.

Deliberate fix (deviation from the reference): two stochastic views
-------------------------------------------------------------------
The reference feeds the *same* inputs as both views (no augmentation), which makes the fused-vs-fused InfoNCE term
trivial (its positive pair is a vector with itself). Following CoMM's own recipe for tabular/time-series inputs
(MultiBench "noise" + "drop" augmentations), each view here is made by feature-level augmentation of the frozen
embeddings, independently per modality, spot and view:

* masking: each input feature is replaced by its training mean with probability ``mask_prob`` (default 0.2);
* noise: Gaussian noise of standard deviation ``noise_std`` × (the feature's training SD) is added (default 0.1).

Feature means/SDs are computed once on the training spots (:meth:`CoMM.prepare`) so that the augmentation is
scale-free across heterogeneous embedding features (e.g. PCA components). ``augment: false`` reproduces the
reference exactly (identical views). Augmentation is applied in the training and validation objective (validation
uses a fixed random seed, see :mod:`.training`), never when computing Z3 or the views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from torch import nn

from .base import AlignModel

DEFAULTS = {
    "embed_dim": 512,
    "n_heads": 8,
    "n_layers": 1,
    "temperature": 0.07,
    "dropout": 0.0,
    "augment": True,
    "noise_std": 0.1,
    "mask_prob": 0.2,
}


class QuickGELU(nn.Module):
    """x·σ(1.702x) (the CLIP/CoMM activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CrossAttentionBlock(nn.Module):
    """Residual cross-attention block: x ← x + MHA(LN(x), LN(y), LN(y)); x ← x + MLP(LN(x)). Tokens (B, L, D)."""

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)
        self.ln_x = nn.LayerNorm(dim)
        self.ln_y = nn.LayerNorm(dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.act = QuickGELU()
        self.c_proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y_n = self.ln_y(y)
        x = x + self.attn(self.ln_x(x), y_n, y_n, need_weights=False)[0]
        return x + self.c_proj(self.act(self.c_fc(self.ln_2(x))))


class CoMM(AlignModel):
    """CoMM fusion (module docstring). ``params``: embed_dim, n_heads, n_layers, temperature, dropout, augment,
    noise_std, mask_prob."""

    method = "comm"

    def __init__(self, d_img: int, d_gex: int, params: dict):
        super().__init__()
        dim, heads, layers = int(params["embed_dim"]), int(params["n_heads"]), int(params["n_layers"])
        if dim % heads:
            raise ValueError(
                f"comm: embed_dim {dim} must be divisible by n_heads {heads} (training.method_params.comm)"
            )
        if not 0.0 <= float(params["mask_prob"]) < 1.0 or float(params["noise_std"]) < 0:
            raise ValueError("comm: mask_prob must be in [0, 1) and noise_std >= 0 (training.method_params.comm)")
        self.augment = bool(params["augment"])
        self.noise_std, self.mask_prob = float(params["noise_std"]), float(params["mask_prob"])
        self.adapter_img = nn.Linear(d_img, dim)
        self.adapter_gex = nn.Linear(d_gex, dim)
        drop = float(params["dropout"])
        self.stacks = nn.ModuleList(
            [nn.ModuleList([CrossAttentionBlock(dim, heads, drop) for _ in range(layers)]) for _ in range(2)]
        )
        self.norm = nn.LayerNorm(dim)
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.loss_fn = NTXentLoss(temperature=float(params["temperature"]))
        for name, size in (("img", d_img), ("gex", d_gex)):
            self.register_buffer(f"mean_{name}", torch.zeros(size))
            self.register_buffer(f"std_{name}", torch.ones(size))
        self._init_fusion(dim, layers)
        self.z3_dim = self.view_dim = dim

    def _init_fusion(self, dim: int, layers: int) -> None:
        attn_std, proj_std, fc_std = dim**-0.5, dim**-0.5 * (2 * layers) ** -0.5, (2 * dim) ** -0.5
        for stack in self.stacks:
            for blk in stack:
                nn.init.normal_(blk.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(blk.c_fc.weight, std=fc_std)
                nn.init.normal_(blk.c_proj.weight, std=proj_std)

    @torch.no_grad()
    def prepare(self, x_img, x_gex):
        """Store per-feature training means and SDs (used by the augmentations only)."""
        for name, x in (("img", x_img), ("gex", x_gex)):
            getattr(self, f"mean_{name}").copy_(x.mean(0))
            sd = x.std(0) if x.shape[0] > 1 else torch.ones_like(x[0])
            getattr(self, f"std_{name}").copy_(torch.where(sd > 0, sd, torch.ones_like(sd)))

    def augment_view(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """One stochastic view of a (B, d) input: feature masking to the mean, then scaled Gaussian noise."""
        if not self.augment:
            return x
        mean, std = getattr(self, f"mean_{modality}"), getattr(self, f"std_{modality}")
        if self.mask_prob > 0:
            x = torch.where(torch.rand_like(x) < self.mask_prob, mean.expand_as(x), x)
        if self.noise_std > 0:
            x = x + self.noise_std * std * torch.randn_like(x)
        return x

    def fuse(self, x_img: torch.Tensor, x_gex: torch.Tensor) -> torch.Tensor:
        """Fused representation (B, D) before the projector (x-attn fusion, mean pool)."""
        t_img, t_gex = self.adapter_img(x_img).unsqueeze(1), self.adapter_gex(x_gex).unsqueeze(1)
        a, b = t_img, t_gex
        for blk in self.stacks[0]:
            a = blk(a, t_gex)
        for blk in self.stacks[1]:
            b = blk(b, t_img)
        return self.norm(torch.cat([a, b], dim=1)).mean(dim=1)

    def _projected(self, x_img, x_gex) -> list[torch.Tensor]:
        return [
            self.projector(self.adapter_img(x_img)),
            self.projector(self.adapter_gex(x_gex)),
            self.projector(self.fuse(x_img, x_gex)),
        ]

    def two_views(self, x_img, x_gex):
        """The two (augmented) input views ((img_1, gex_1), (img_2, gex_2)) fed to the objective."""
        return tuple((self.augment_view(x_img, "img"), self.augment_view(x_gex, "gex")) for _ in range(2))

    def loss(self, x_img, x_gex):
        (i1, g1), (i2, g2) = self.two_views(x_img, x_gex)
        z1, z2 = self._projected(i1, g1), self._projected(i2, g2)
        terms = [0.5 * (self.loss_fn(z1[i], z2[-1]) + self.loss_fn(z2[i], z1[-1])) for i in range(3)]
        return torch.stack(terms).mean()

    def embed(self, x_img, x_gex):
        return F.normalize(self.fuse(x_img, x_gex), dim=-1)

    def views(self, x_img, x_gex):
        return (F.normalize(self.projector(self.adapter_img(x_img)), dim=-1),
                F.normalize(self.projector(self.adapter_gex(x_gex)), dim=-1))

