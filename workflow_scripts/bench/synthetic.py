"""Lung-scale synthetic embeddings with planted structure, for the benchmarks (:mod:`workflow_scripts.bench`).

The paper's lung dataset has about 71,000 patches of 108.8 µm on a 54.4 µm grid from 7 test donors, 1,536-d
UNI2-h (IMG) and 512-d Nicheformer (GEX) embeddings, 22 region classes and a 9-d cell-type composition
(README of microsoft/cell_synergy; the lung entry of ``config/paper.yaml``). :func:`synthetic_dataset` builds data
of that shape whose labels and embeddings are related the way the benchmarks need:

* **slides and coordinates**: ``n_slides`` slides, each a rectangular patch grid with ``pitch_um`` spacing
  (``obs['x_um'], obs['y_um']``, µm); one donor per slide;
* **regions** (``obs['region']``, ``n_classes`` classes): per slide, ``regions_per_slide`` random seed points
  with random classes; every patch takes the class of its nearest seed (Voronoi cells), so labels are
  spatially coherent and the neighbour-ring majorities depend on the distance;
* **composition** (``obsm['composition']``, ``n_comp`` proportions): a Dirichlet draw around a
  class-specific mean;
* **embeddings**: a ``n_latent``-d latent = class effect + composition effect + noise, mapped to ``d_img`` and
  ``d_gex`` dimensions by random linear maps, plus isotropic noise (float32). The two modalities see
  different halves of the class effect, so neither alone holds all of the label information.

Deterministic for a seed. Memory: about ``n × (d_img + d_gex) × 4`` bytes (570 MB at lung scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

#: lung scale (README of microsoft/cell_synergy: "~71k samples, 7 test donors"; UNI2-h 1536-d, Nicheformer 512-d;
#: 22 classes after the two exclusions; 9 composition entries after removing the unmapped one)
LUNG_SCALE = dict(n_spots=71_000, n_slides=7, d_img=1536, d_gex=512, n_classes=22, n_comp=9, pitch_um=54.4)
#: ring edges (µm) of the lung entry in config/paper.yaml: 8, 16, …, 64 neighbours on the 54.4 µm patch grid
LUNG_RING_EDGES_UM = [0, 92.9, 158.5, 220.9, 274.7, 337.5, 394.2, 463.2, 514.6]


@dataclass
class SyntheticData:
    """Synthetic dataset: spot table, embeddings and targets (rows aligned, index = spot id)."""

    obs: pd.DataFrame            # slide, donor, x_um, y_um, region
    img: np.ndarray              # (n, d_img) float32
    gex: np.ndarray              # (n, d_gex) float32
    composition: np.ndarray      # (n, n_comp) float64, rows sum to 1

    def anndata(self):
        """The spots AnnData of the data model (``obs``, ``obsm['composition']``; ``X`` an empty sparse matrix)."""
        import anndata as ad
        import scipy.sparse as sp

        a = ad.AnnData(X=sp.csr_matrix((len(self.obs), 1), dtype=np.float32), obs=self.obs.copy())
        a.obsm["composition"] = self.composition
        return a

    def frame(self, which: str) -> pd.DataFrame:
        """The ``img`` or ``gex`` embedding as an embedding table (:func:`workflow_scripts.io.embedding_frame`)."""
        from ..io import embedding_frame

        return embedding_frame(getattr(self, which), self.obs.index)


def scaled(scale: float = 1.0, **over) -> dict:
    """Lung-scale sizes multiplied by ``scale`` (spots and dimensions; classes and slides kept), then ``over``."""
    p = dict(LUNG_SCALE)
    if scale != 1.0:
        p["n_spots"] = max(200, int(round(p["n_spots"] * scale)))
        p["d_img"] = max(8, int(round(p["d_img"] * min(1.0, scale ** 0.5))))
        p["d_gex"] = max(8, int(round(p["d_gex"] * min(1.0, scale ** 0.5))))
    p.update(over)
    return p


def synthetic_dataset(n_spots: int = 71_000, n_slides: int = 7, d_img: int = 1536, d_gex: int = 512,
                      n_classes: int = 22, n_comp: int = 9, pitch_um: float = 54.4,
                      regions_per_slide: int | None = None, n_latent: int = 32, signal: float = 0.04, noise: float = 1.0,
                      seed: int = 0) -> SyntheticData:
    """Build a :class:`SyntheticData` (module docstring).

    Parameters
    ----------
    n_spots : total patches, split as evenly as possible over ``n_slides``.
    d_img, d_gex : embedding dimensions.
    n_classes : region classes (each appears on some slide; rare ones may be small).
    n_comp : composition entries.
    pitch_um : grid spacing in µm (the lung's 54.4 µm tiling stride).
    regions_per_slide : Voronoi seeds per slide (default: one per ~150 patches, at least ``n_classes``).
    n_latent : dimension of the shared latent.
    signal : standard deviation of the class effects in the latent; the default 0.04 makes the regions about as
        hard to tell apart as real ones at lung scale (macro-F1 of a logistic probe of a spot's own region about
        0.73 from IMG, 0.89 from GEX; L-BFGS needs about 300 iterations from zero).
    noise : standard deviation of the isotropic embedding noise (signal variance per latent unit is ~1).
    seed : everything is drawn from ``numpy.random.default_rng(seed)``.

    Raises ValueError for sizes below 2 slides × 10 spots or fewer than 2 classes.
    """
    if n_slides < 1 or n_spots < 10 * n_slides or n_classes < 2 or min(d_img, d_gex, n_comp) < 1:
        raise ValueError(f"synthetic_dataset: need >= 10 spots per slide and >= 2 classes, got n_spots={n_spots}, "
                         f"n_slides={n_slides}, n_classes={n_classes}")
    rng = np.random.default_rng(seed)
    per = np.full(n_slides, n_spots // n_slides)
    per[: n_spots % n_slides] += 1
    frames = []
    for s, n_s in enumerate(per):
        cols = int(np.ceil(np.sqrt(n_s)))
        row, col = np.divmod(np.arange(n_s), cols)
        xy = np.stack([col, row], axis=1) * pitch_um
        k = regions_per_slide or max(n_classes, n_s // 150)
        seeds_xy = rng.uniform(0, xy.max(axis=0) + pitch_um, size=(k, 2))
        seed_cls = rng.integers(0, n_classes, size=k)
        nearest = _nearest(xy, seeds_xy)
        frames.append(pd.DataFrame({
            "slide": f"S{s}", "donor": f"D{s}", "x_um": xy[:, 0], "y_um": xy[:, 1],
            "region": np.char.add("R", seed_cls[nearest].astype(str)),
        }, index=[f"S{s}_{i}" for i in range(n_s)]))
    obs = pd.concat(frames)
    obs.index.name = "spot_id"
    cls = pd.Categorical(obs["region"]).codes
    comp_mean = rng.dirichlet(np.ones(n_comp), size=n_classes)
    comp = _dirichlet_rows(rng, 20 * comp_mean[cls] + 0.05)
    class_eff = rng.normal(size=(n_classes, n_latent)).astype(np.float32) * np.float32(signal)
    comp_eff = rng.normal(size=(n_comp, n_latent)).astype(np.float32) * 3
    half = n_latent // 2
    lat_img = class_eff[cls].copy()
    lat_gex = class_eff[cls].copy()
    lat_img[:, half:] *= 0.3              # IMG sees the first half of the class effect clearly
    lat_gex[:, :half] *= 0.3              # GEX the second half
    lat_gex += (comp.astype(np.float32) - comp.mean(0, dtype=np.float32)) @ comp_eff
    img = _project(rng, lat_img, d_img, noise)
    gex = _project(rng, lat_gex, d_gex, noise)
    obs["slide"] = obs["slide"].astype("category")
    obs["donor"] = obs["donor"].astype("category")
    return SyntheticData(obs=obs, img=img, gex=gex, composition=comp)


def _nearest(xy: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    from scipy.spatial import cKDTree

    return cKDTree(seeds).query(xy)[1]


def _dirichlet_rows(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """One Dirichlet draw per row of ``alpha`` (normalised Gamma draws)."""
    g = rng.standard_gamma(alpha)
    return g / g.sum(axis=1, keepdims=True)


def _project(rng: np.random.Generator, lat: np.ndarray, d: int, noise: float) -> np.ndarray:
    """``lat @ P + F @ Q + e`` (float32): a random (n_latent, d) map P of the signal, plus correlated noise.

    The noise has ``m = min(d, 256)`` factors F with variances falling as 1/k (a power-law spectrum, as the
    principal components of foundation-model embeddings do) mapped by a random (m, d) map Q, and a small
    isotropic part e; its total variance per dimension is about ``noise**2``.
    """
    n = len(lat)
    P = rng.standard_normal((lat.shape[1], d), dtype=np.float32) / np.float32(np.sqrt(lat.shape[1]))
    out = lat @ P
    m = min(d, 256)
    w = 1.0 / np.arange(1, m + 1)
    scale = (noise * np.sqrt(0.9 * m * w / w.sum())).astype(np.float32)  # factor sd, sum of variances 0.9 m noise²
    Q = rng.standard_normal((m, d), dtype=np.float32) / np.float32(np.sqrt(m))
    F = rng.standard_normal((n, m), dtype=np.float32) * scale
    out += F @ Q
    out += rng.standard_normal((n, d), dtype=np.float32) * np.float32(noise * np.sqrt(0.1))
    return out
