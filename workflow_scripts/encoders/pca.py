"""``pca`` — the offline default GEX encoder: PCA of log-normalised highly variable genes.

This is the classic scanpy preprocessing chain (Wolf et al., Genome Biol 19:15, 2018; HVG selection
of Satija et al., Nat Biotechnol 33:495, 2015, ``flavor="seurat"``), used here as a weight-free
stand-in for the paper's Nicheformer GEX encoder (docs/reference.md#nicheformer), which needs downloaded weights.

Steps, on a copy of the spots AnnData (``X`` = raw counts, spots × genes):

1. spots with zero total counts are set aside (their embedding row is NaN, logged; the align rule's
   ``drop_invalid_rows`` removes them later, logged again);
2. genes detected in 0 of the remaining spots are removed (count logged) — they carry no
   information and give undefined dispersions in the HVG step;
3. ``sc.pp.normalize_total(target_sum)`` — every spot scaled to ``target_sum`` counts;
4. ``sc.pp.log1p`` — natural log(1 + x);
5. ``sc.pp.highly_variable_genes(n_top_genes, flavor="seurat")`` on the log data (count logged), then
   restricted to the HVGs;
6. *no* per-gene unit-variance scaling by default: PCA runs on the centred log-normalised HVGs
   (``sc.tl.pca`` centres each gene; scaling would give lowly expressed, noisy genes the same weight as
   strongly expressed ones). Set ``scale: true`` to apply ``sc.pp.scale(max_value=10)`` first;
7. ``sc.tl.pca(n_comps, svd_solver="arpack", random_state=ctx.seed)`` — ``X_pca`` is the embedding.
   ``n_comps`` is clipped to ``min(n_comps, n_spots - 1, n_hvg - 1)`` (ARPACK needs strictly fewer
   components than either dimension); clipping is logged.

Output: spots × n_comps float32 table indexed by spot id, columns f0 … f{n_comps-1} (= PC1 …);
``df.attrs`` carries ``feature_names`` ("PC1", …), ``explained_variance_ratio``, ``n_hvg``,
``n_genes_zero`` and ``n_spots_zero`` for the embedding metadata. Deterministic for a given seed.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..io import embedding_frame
from . import EncodeContext, register

log = logging.getLogger(__name__)

DEFAULTS = {"target_sum": 10000.0, "n_top_genes": 2000, "n_comps": 50, "scale": False}


def _check_params(params: dict | None) -> dict:
    """Merge ``params`` over :data:`DEFAULTS`; raise ValueError naming unknown or invalid keys."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"encoders.pca: unknown parameter(s) {unknown}; allowed: {sorted(DEFAULTS)} (fix config encoders.pca)"
        )
    p = {**DEFAULTS, **params}
    if not float(p["target_sum"]) > 0:
        raise ValueError(f"encoders.pca.target_sum must be > 0, got {p['target_sum']!r}")
    for k in ("n_top_genes", "n_comps"):
        if int(p[k]) < 1 or int(p[k]) != p[k]:
            raise ValueError(f"encoders.pca.{k} must be a positive integer, got {p[k]!r}")
    return p


@register("pca", "gex", description="PCA of log-normalised highly variable genes (scanpy)")
def encode_pca(adata, params: dict, ctx: EncodeContext) -> pd.DataFrame:
    """PCA embedding of the spots' expression (see module docstring for every step and its source).

    Parameters
    ----------
    adata : spots AnnData, ``X`` raw counts of shape (n_spots, n_genes), obs index = spot ids.
    params : ``{target_sum: float (counts per spot after normalisation), n_top_genes: int,
        n_comps: int, scale: bool}``; missing keys take :data:`DEFAULTS`.
    ctx : :class:`EncodeContext`; only ``ctx.seed`` is used (ARPACK start vector).

    Returns
    -------
    DataFrame of shape (n_spots, n_comps') float32, indexed by spot id, where
    ``n_comps' = min(n_comps, n_nonzero_spots - 1, n_hvg - 1)``; rows of zero-count spots are NaN.

    Raises
    ------
    ValueError for unknown/invalid params, or when fewer than 2 spots with counts or fewer than 2
    expressed genes remain (PCA impossible).
    """
    import scanpy as sc

    p = _check_params(params)
    n_spots = adata.n_obs
    X = adata.X
    totals = np.asarray(X.sum(axis=1)).ravel()
    finite = np.isfinite(totals)
    if not finite.all():
        raise ValueError(f"pca: {int((~finite).sum())} spots have non-finite counts in X; fix the dataset reader")
    nonzero = totals > 0
    n_zero_spots = int((~nonzero).sum())
    if n_zero_spots:
        log.warning("pca: %d of %d spots have zero total counts; their embedding rows are NaN", n_zero_spots, n_spots)
    if nonzero.sum() < 2:
        raise ValueError(f"pca: only {int(nonzero.sum())} spots with counts; PCA needs at least 2")

    a = sc.AnnData(
        X=sp.csr_matrix(X[nonzero], dtype=np.float32) if sp.issparse(X) else np.asarray(X[nonzero], dtype=np.float32),
        obs=pd.DataFrame(index=adata.obs_names[nonzero]),
        var=pd.DataFrame(index=adata.var_names),
    )
    n_detected = np.asarray((a.X > 0).sum(axis=0)).ravel()
    keep_genes = n_detected > 0
    n_zero_genes = int((~keep_genes).sum())
    log.info("pca: %d of %d genes are detected in 0 spots and are dropped", n_zero_genes, a.n_vars)
    a = a[:, keep_genes].copy()
    if a.n_vars < 2:
        raise ValueError(f"pca: only {a.n_vars} genes with counts; PCA needs at least 2")

    sc.pp.normalize_total(a, target_sum=float(p["target_sum"]))
    sc.pp.log1p(a)
    n_top = int(p["n_top_genes"])
    if n_top >= a.n_vars:
        log.warning("pca: n_top_genes=%d >= %d expressed genes; using all genes", n_top, a.n_vars)
        n_hvg = a.n_vars
    else:
        sc.pp.highly_variable_genes(a, n_top_genes=n_top, flavor="seurat")
        hvg = a.var["highly_variable"].to_numpy()
        n_hvg = int(hvg.sum())
        a = a[:, hvg].copy()
    log.info("pca: %d highly variable genes (flavor='seurat', n_top_genes=%d) of %d expressed genes",
             n_hvg, n_top, len(keep_genes) - n_zero_genes)
    if n_hvg < 2:
        raise ValueError(f"pca: only {n_hvg} highly variable genes; PCA needs at least 2")
    if p["scale"]:
        sc.pp.scale(a, max_value=10)
        log.info("pca: genes scaled to unit variance (clipped at 10)")

    n_comps = int(p["n_comps"])
    n_eff = min(n_comps, a.n_obs - 1, n_hvg - 1)
    if n_eff < n_comps:
        log.warning(
            "pca: n_comps clipped from %d to %d (n_spots with counts=%d, n_hvg=%d; ARPACK needs fewer "
            "components than either)", n_comps, n_eff, a.n_obs, n_hvg,
        )
    sc.tl.pca(a, n_comps=n_eff, svd_solver="arpack", random_state=int(ctx.seed))
    evr = a.uns["pca"]["variance_ratio"]
    log.info("pca: %d components explain %.1f%% of the HVG variance (PC1 %.1f%%)", n_eff, 100 * evr.sum(), 100 * evr[0])

    values = np.full((n_spots, n_eff), np.nan, dtype=np.float32)
    values[nonzero] = a.obsm["X_pca"]
    df = embedding_frame(values, adata.obs_names)
    df.attrs.update(
        feature_names=[f"PC{i + 1}" for i in range(n_eff)],
        explained_variance_ratio=[float(v) for v in evr],
        n_hvg=n_hvg,
        n_genes_zero=n_zero_genes,
        n_spots_zero=n_zero_spots,
    )
    return df
