"""Non-trained embeddings: ``concat`` (one of the ten methods) and the ``random`` baseline (docs/reference.md#fusion-methods,
docs/reference.md#fused-embeddings).

* concat: Z3 = [Z_img ‖ Z_gex], the raw concatenation of the frozen embeddings, (n, d_img + d_gex), no training.
* random: Z3 ~ N(0, 1) i.i.d. of shape (n, d_gex + d_img), drawn from ``numpy.random.default_rng(seed)``
  (reference: ``np.random.seed(42)``; here the run's seed).
"""

from __future__ import annotations

import numpy as np


def concat_embedding(z_img: np.ndarray, z_gex: np.ndarray) -> np.ndarray:
    """[img ‖ gex] as float32, (n, d_img + d_gex)."""
    return np.concatenate([np.asarray(z_img, np.float32), np.asarray(z_gex, np.float32)], axis=1)


def random_embedding(n: int, d: int, seed: int) -> np.ndarray:
    """N(0, 1) matrix (n, d) float32 from ``numpy.random.default_rng(seed)``."""
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
