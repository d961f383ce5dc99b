"""Interface shared by every trainable fusion method.

The reference's models are ``src/cell_synergy/models/*.py`` (docs/reference.md#alignment).

A method is an :class:`AlignModel` (a ``torch.nn.Module``) built as ``Model(d_img, d_gex, params)``.
Every method takes its inputs in the reference's call order ``(x_img, x_gex)``:

* ``x_img``: (B, d_img) float32 tensor, the frozen image embedding Z2;
* ``x_gex``: (B, d_gex) float32 tensor, the frozen gene-expression embedding Z1.

The training loop (:mod:`workflow_scripts.methods.training`) only uses :meth:`AlignModel.loss`,
:meth:`AlignModel.after_step` and :meth:`AlignModel.prepare`; the fused embedding Z3 and the two
per-modality views come from :meth:`AlignModel.embed` and :meth:`AlignModel.views` (eval mode, no_grad).
"""

from __future__ import annotations

import torch
from torch import nn


class AlignModel(nn.Module):
    """Base class of the neural fusion methods.

    Subclasses set ``method`` (the method name), ``z3_dim`` (columns of Z3) and ``view_dim``
    (columns of each view) in ``__init__`` and implement :meth:`loss`, :meth:`embed`, :meth:`views`.
    """

    method: str = ""
    z3_dim: int = 0
    view_dim: int = 0

    def prepare(self, x_img: torch.Tensor, x_gex: torch.Tensor) -> None:
        """Hook called once with the full training inputs (n_train, d) before the first epoch.

        Default: nothing. CoMM uses it to store per-feature means/SDs for its augmentations.
        """

    def loss(self, x_img: torch.Tensor, x_gex: torch.Tensor) -> torch.Tensor:
        """Scalar training objective on one batch (B, d_img), (B, d_gex); lower is better."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Hook called after every optimiser step (BYOL: EMA update of the target encoders)."""

    def embed(self, x_img: torch.Tensor, x_gex: torch.Tensor) -> torch.Tensor:
        """Fused embedding Z3 of a batch, shape (B, ``z3_dim``) (docs/reference.md#fused-embeddings)."""
        raise NotImplementedError

    def views(self, x_img: torch.Tensor, x_gex: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two per-modality projections compared by the objective, each (B, ``view_dim``)."""
        raise NotImplementedError


def mlp_ln_gelu(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """Linear(d_in, hidden) → LayerNorm → GELU → Linear(hidden, d_out) → LayerNorm → GELU → Linear(d_out, d_out).

    The three-layer encoder that the reference uses for SimSiam and DIM (docs/reference.md#fusion-methods).
    """
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.LayerNorm(hidden),
        nn.GELU(),
        nn.Linear(hidden, d_out),
        nn.LayerNorm(d_out),
        nn.GELU(),
        nn.Linear(d_out, d_out),
    )
