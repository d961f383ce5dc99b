"""Data-scaling experiment: probe scores as a function of the amount of data used to fit the models.

The reference's experiment: docs/reference.md#data-scaling (its post-training flaw: docs/reference.md#flaw-8).

Fractions (as in the reference, docs/reference.md#data-scaling): 0.01, 0.0316, 0.1, 0.316, 1.0 (half-decades), several seeds.

Subsets (:func:`fraction_subset`)
---------------------------------
For a seed, one random permutation of the eligible items is drawn (``numpy.random.default_rng(seed)``) and
fraction f takes its first max(``min_items``, ceil(f·n)) items, so the subsets of one seed are **nested**
(0.01 ⊂ 0.0316 ⊂ … ⊂ 1.0). The reference drew every fraction independently (``np.random.choice`` after one
``np.random.seed(42)``, docs/reference.md#data-scaling); nesting is a deliberate change: the curve then shows the effect of
adding data rather than of a different random draw per point, and the seeds give the spread.

Mode ``posttrain`` (the paper's experiment; :mod:`workflow_scripts.analysis.nicheformer_mlm` and the rules)
--------------------------------------------------------------------------------------------------
Nicheformer is post-trained with its masked-language-model objective on fraction f of the training cells
(3 lr/wd configurations), the evaluation spots are re-embedded with each checkpoint, CoMM is trained on all
evaluation spots (the alignment data are not subsampled, docs/reference.md#data-scaling) and GEX, concat and CoMM are probed
(:func:`evaluate_embeddings`; CLI ``evaluate``). The pretrained encoder is the fraction-0 reference point.

Mode ``offline`` (weight-free encoders; :func:`offline_scaling`, CLI ``offline``)
--------------------------------------------------------------------------------
The offline GEX encoder (``pca``: scanpy log-normalisation, HVGs, PCA; :mod:`workflow_scripts.encoders.pca`)
has parameters fitted to data, and so does the alignment interface. Fraction f of the spots (``subsample``:
``gex_encoder`` and/or ``alignment``) is used

* ``gex_encoder``: to select the HVGs and fit the PCA loadings (and the centring mean) on the subset's
  log-normalised counts; the fitted map is then applied to **all** spots (normalisation per spot needs no
  fitting);
* ``alignment``: to train CoMM (:func:`workflow_scripts.methods.fit_method`); the trained model then embeds
  **all** spots (:func:`workflow_scripts.methods.embed_with_state`).

The image embedding is frozen and never subsampled. Probes (:func:`workflow_scripts.evaluation.probes.run_probes`) always
run on all spots, for ``gex`` (the fraction-fitted GEX embedding), ``concat`` = [IMG ‖ GEX] (docs/reference.md#fused-embeddings)
and ``comm`` (Z3). Output: the probe table with leading columns ``dataset, mode, config, fraction, seed,
n_fit, embedding``.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..io import drop_invalid_rows, embedding_frame, intersect_tables, read_embedding, setup_logging, json_arg

log = logging.getLogger(__name__)

FRACTIONS = (0.01, 0.0316, 0.1, 0.316, 1.0)  # the reference's fractions, docs/reference.md#data-scaling
SUBSAMPLE_STAGES = ("gex_encoder", "alignment")
SCALING_EMBEDDINGS = ("gex", "concat", "comm")
LEAD_COLUMNS = ["dataset", "mode", "config", "fraction", "seed", "n_fit", "embedding"]


def fraction_subset(n: int, fraction: float, seed: int, min_items: int = 2) -> np.ndarray:
    """Sorted indices of the first max(min_items, ceil(fraction·n)) items of a seeded permutation of range(n).

    Nested across fractions for the same ``seed`` and ``n`` (module docstring). ``fraction`` in (0, 1].
    Raises ValueError for a fraction outside (0, 1] or n < 1.
    """
    if not 0 < float(fraction) <= 1:
        raise ValueError(f"scaling fraction must be in (0, 1], got {fraction!r} (fix config scaling.fractions)")
    if n < 1:
        raise ValueError(f"cannot subsample from {n} items")
    m = min(n, max(int(min_items), int(math.ceil(float(fraction) * n - 1e-9))))
    perm = np.random.default_rng(int(seed)).permutation(n)
    return np.sort(perm[:m])


# ------------------------------------------------------------------------------------------------ GEX encoder
class FractionPCA:
    """The offline ``pca`` GEX encoder with its data-dependent steps fitted on a subset of spots.

    Same chain as :mod:`workflow_scripts.encoders.pca` (scanpy): ``normalize_total(target_sum)`` → ``log1p``
    per spot; on the fit subset: genes detected in none of its spots dropped, ``highly_variable_genes(
    n_top_genes, flavor="seurat")``, optional ``scale`` (unit variance, clip 10, with the subset's mean/sd),
    PCA of the centred HVG matrix (``sklearn.decomposition.PCA``, ARPACK-free full SVD, ``random_state``);
    :meth:`transform` applies the same normalisation, gene selection, centring and loadings to any spots.
    ``n_comps`` is clipped to min(n_comps, n_fit − 1, n_hvg − 1) (logged), as the encoder does.
    """

    def __init__(self, params: Mapping | None = None, seed: int = 0):
        from ..encoders.pca import _check_params

        self.p = _check_params(dict(params or {}))
        self.seed = int(seed)

    @staticmethod
    def _lognorm(X, target_sum: float) -> sp.csr_matrix:
        X = sp.csr_matrix(X, dtype=np.float64)
        tot = np.asarray(X.sum(axis=1)).ravel()
        scale = np.divide(target_sum, tot, out=np.zeros_like(tot), where=tot > 0)
        Y = sp.diags(scale) @ X
        Y.data = np.log1p(Y.data)
        return sp.csr_matrix(Y)

    def fit(self, X, var_names: Sequence[str]) -> "FractionPCA":
        """Fit on raw counts ``X`` (n_fit, n_genes) of spots with counts > 0. Raises ValueError if PCA is impossible."""
        import anndata as ad
        import scanpy as sc
        from sklearn.decomposition import PCA

        Y = self._lognorm(X, float(self.p["target_sum"]))
        detected = np.asarray((Y > 0).sum(axis=0)).ravel() > 0
        log.info("fraction PCA: %d of %d genes detected in none of the %d fit spots; dropped",
                 int((~detected).sum()), len(detected), Y.shape[0])
        genes = np.flatnonzero(detected)
        n_top = int(self.p["n_top_genes"])
        if n_top < len(genes):
            a = ad.AnnData(X=Y[:, genes].tocsr().astype(np.float32))
            a.var_names = [str(v) for v in np.asarray(var_names)[genes]]
            a.uns["log1p"] = {"base": None}
            sc.pp.highly_variable_genes(a, n_top_genes=n_top, flavor="seurat")
            genes = genes[a.var["highly_variable"].to_numpy()]
        log.info("fraction PCA: %d highly variable genes selected on %d spots", len(genes), Y.shape[0])
        if len(genes) < 2 or Y.shape[0] < 2:
            raise ValueError(f"fraction PCA: {Y.shape[0]} fit spots and {len(genes)} genes; PCA needs >= 2 of each")
        Z = Y[:, genes].toarray()
        self.mean_, self.sd_ = Z.mean(axis=0), None
        if self.p["scale"]:
            sd = Z.std(axis=0, ddof=1)
            self.sd_ = np.where(sd > 0, sd, 1.0)
        n_eff = min(int(self.p["n_comps"]), Z.shape[0] - 1, len(genes) - 1)
        if n_eff < int(self.p["n_comps"]):
            log.warning("fraction PCA: n_comps clipped from %d to %d (%d fit spots, %d genes)",
                        int(self.p["n_comps"]), n_eff, Z.shape[0], len(genes))
        self.genes_ = genes
        self.pca_ = PCA(n_components=n_eff, svd_solver="full", random_state=self.seed).fit(self._prep(Z))
        log.info("fraction PCA: %d components explain %.1f%% of the fit spots' HVG variance", n_eff,
                 100 * float(self.pca_.explained_variance_ratio_.sum()))
        return self

    def _prep(self, Z: np.ndarray) -> np.ndarray:
        if self.sd_ is None:
            return Z
        return np.clip((Z - self.mean_) / self.sd_, None, 10.0)

    def transform(self, X) -> np.ndarray:
        """(n, n_comps) PCA coordinates of raw counts ``X`` (n, n_genes); rows of zero-count spots are NaN."""
        Y = self._lognorm(X, float(self.p["target_sum"]))
        Z = Y[:, self.genes_].toarray()
        out = self.pca_.transform(self._prep(Z)).astype(np.float32)
        out[np.asarray(sp.csr_matrix(X).sum(axis=1)).ravel() <= 0] = np.nan
        return out


# ------------------------------------------------------------------------------------------------ probes
def evaluate_embeddings(z_gex: pd.DataFrame, z_img: pd.DataFrame, adata, tasks: Mapping, probe_params: Mapping,
                        comm_params: Mapping, seed: int, min_class_size: int = 10, fit_rows: np.ndarray | None = None,
                        device: str = "auto", progress: bool = False) -> pd.DataFrame:
    """Train CoMM and probe GEX, concat and CoMM on all spots (module docstring).

    ``z_gex`` (n, d_gex) and ``z_img`` (n, d_img): embedding tables with the same spot ids in the same order,
    finite. ``fit_rows``: row positions CoMM is trained on (None = all); Z3 is computed for all rows.
    ``comm_params``: the ``training`` block merged with ``training.method_params.comm``.
    Returns the probe table (:data:`workflow_scripts.evaluation.probes.PROBE_COLUMNS`) with an ``embedding`` column first.
    """
    from ..methods import embed_with_state, fit_method
    from ..evaluation.probes import run_probes

    if not z_gex.index.equals(z_img.index):
        raise ValueError("evaluate_embeddings: GEX and IMG tables must have the same spot ids in the same order")
    g = z_gex.to_numpy(np.float32)
    i = z_img.to_numpy(np.float32)
    rows = np.arange(len(g)) if fit_rows is None else np.asarray(fit_rows)
    log.info("CoMM: trained on %d of %d spots", len(rows), len(g))
    res = fit_method("comm", g[rows], i[rows], dict(comm_params), int(seed), device, progress=progress)
    z3 = res.z3 if fit_rows is None else embed_with_state(res.state, g, i, device)[0]
    embs = {
        "gex": z_gex,
        "concat": embedding_frame(np.hstack([i, g]), z_gex.index),  # [IMG ‖ GEX], docs/reference.md#fused-embeddings
        "comm": embedding_frame(z3, z_gex.index),
    }
    out = []
    for name, emb in embs.items():
        df = run_probes(emb, adata, tasks, probe_params, int(seed), min_class_size)
        df.insert(0, "embedding", name)
        out.append(df)
        log.info("%s: %s", name, df.groupby("task")["value"].mean().round(4).to_dict())
    return pd.concat(out, ignore_index=True)


def offline_scaling(adata, z_img: pd.DataFrame, fraction: float, seed: int, params: Mapping, tasks: Mapping,
                    probe_params: Mapping, comm_params: Mapping, min_class_size: int = 10,
                    z_gex_frozen: pd.DataFrame | None = None, device: str = "auto") -> tuple[pd.DataFrame, int]:
    """One point (fraction, seed) of the offline scaling curve (module docstring, mode ``offline``).

    Parameters
    ----------
    adata : spots AnnData (raw counts ``X``; labels for the probes).
    z_img : (n_spots, d_img) frozen image embedding table.
    params : ``config: scaling.offline``: ``subsample`` (subset of :data:`SUBSAMPLE_STAGES`), ``pca`` (the
        ``encoders.pca`` parameters), ``min_spots`` (least fit spots, default 10).
    z_gex_frozen : the precomputed GEX embedding, required when ``gex_encoder`` is not subsampled.

    Returns ``(table, n_fit)``: the probe table of :func:`evaluate_embeddings` and the number of fit spots.
    Raises ValueError for an unknown stage or a missing frozen GEX embedding.
    """
    stages = list(params.get("subsample", SUBSAMPLE_STAGES))
    bad = [s for s in stages if s not in SUBSAMPLE_STAGES]
    if bad:
        raise ValueError(f"scaling.offline.subsample: unknown stage(s) {bad}; choose from {SUBSAMPLE_STAGES}")
    X = sp.csr_matrix(adata.X)
    ids = adata.obs_names.astype(str)
    has_counts = np.asarray(X.sum(axis=1)).ravel() > 0
    img = drop_invalid_rows(z_img, "IMG embedding")
    eligible = np.flatnonzero(has_counts & ids.isin(img.index))
    log.info("%d of %d spots have counts and a finite image embedding (eligible)", len(eligible), len(ids))
    sub = eligible[fraction_subset(len(eligible), fraction, seed, int(params.get("min_spots", 10)))]
    log.info("fraction %g, seed %d: %d of %d eligible spots fit the models (%s)", fraction, seed, len(sub),
             len(eligible), stages or "nothing subsampled")
    if "gex_encoder" in stages:
        enc = FractionPCA(params.get("pca"), seed).fit(X[sub], adata.var_names)
        gex = embedding_frame(enc.transform(X), ids)
    else:
        if z_gex_frozen is None:
            raise ValueError("offline scaling without 'gex_encoder' in subsample needs the precomputed GEX embedding")
        gex = z_gex_frozen
        if not stages:
            log.warning("scaling.offline.subsample is empty: every fraction gives the same models")
    t = intersect_tables({"GEX": drop_invalid_rows(gex, "GEX embedding"), "IMG": img})
    pos = pd.Series(np.arange(len(t["GEX"])), index=t["GEX"].index)
    fit_ids = ids[sub].intersection(t["GEX"].index, sort=False)
    fit_rows = pos.loc[fit_ids].to_numpy() if "alignment" in stages else None
    table = evaluate_embeddings(t["GEX"], t["IMG"], adata, tasks, probe_params, comm_params, seed, min_class_size,
                                fit_rows, device)
    return table, len(sub)


def _lead(df: pd.DataFrame, dataset: str, mode: str, config: str, fraction: float, seed: int, n_fit: int) -> pd.DataFrame:
    """Prepend :data:`LEAD_COLUMNS` (``embedding`` moved from the probe table) to a probe table."""
    lead = pd.DataFrame({"dataset": dataset, "mode": mode, "config": config, "fraction": float(fraction),
                         "seed": int(seed), "n_fit": int(n_fit), "embedding": df["embedding"]}, index=df.index)
    return pd.concat([lead, df.drop(columns="embedding")], axis=1)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI.

    ``python -m workflow_scripts.analysis.scaling offline --spots S.h5ad --img IMG.parquet [--gex GEX.parquet] --dataset D
    --fraction F --seed S --params JSON --tasks JSON --probe-params JSON --comm-params JSON --min-class-size N
    [--device auto] --out OUT.tsv --log LOG``: one point of the offline curve.

    ``python -m workflow_scripts.analysis.scaling evaluate --spots S.h5ad --gex GEX.parquet --img IMG.parquet --dataset D
    --config CFG --fraction F --seed S [--n-fit N | --history H.tsv] --tasks JSON --probe-params JSON --comm-params JSON ... --out OUT.tsv``:
    CoMM on all spots + probes of GEX / concat / CoMM for a post-trained GEX embedding (mode ``posttrain``).
    Both write the table with columns :data:`LEAD_COLUMNS` + the probe columns.
    """
    import torch

    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.analysis.scaling", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("offline", help="offline encoders: fraction of spots fits the GEX encoder and CoMM")
    o.add_argument("--gex", default=None, help="precomputed GEX embedding (when gex_encoder is not subsampled)")
    o.add_argument("--params", default="{}", help="JSON, config scaling.offline (+ pca: encoders.pca)")
    e = sub.add_parser("evaluate", help="CoMM + probes for a (post-trained) GEX embedding")
    e.add_argument("--gex", required=True)
    e.add_argument("--config", default="pretrained", help="post-training configuration name")
    e.add_argument("--n-fit", type=int, default=0, help="cells the GEX encoder was post-trained on")
    e.add_argument("--history", default=None, help="post-training history TSV; its n_cells column sets --n-fit")
    for s in (o, e):
        s.add_argument("--spots", required=True)
        s.add_argument("--img", required=True)
        s.add_argument("--dataset", required=True)
        s.add_argument("--fraction", type=float, required=True)
        s.add_argument("--seed", type=int, required=True)
        s.add_argument("--tasks", required=True)
        s.add_argument("--probe-params", required=True)
        s.add_argument("--comm-params", required=True)
        s.add_argument("--min-class-size", type=int, default=10)
        s.add_argument("--device", default="auto")
        s.add_argument("--threads", type=int, default=None)
        s.add_argument("--out", required=True)
        s.add_argument("--log", default=None)
    args = ap.parse_args(argv)
    setup_logging(args.log)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = json_arg(args.tasks, "--tasks")
    probe = json_arg(args.probe_params, "--probe-params")
    comm = json_arg(args.comm_params, "--comm-params")
    from ..evaluation.probes import read_spots

    adata = read_spots(args.spots)
    img = read_embedding(args.img)
    if args.cmd == "offline":
        params = json_arg(args.params, "--params")
        gex = read_embedding(args.gex) if args.gex else None
        table, n_fit = offline_scaling(adata, img, args.fraction, args.seed, params, tasks, probe, comm,
                                       args.min_class_size, gex, args.device)
        table = _lead(table, args.dataset, "offline", "pca", args.fraction, args.seed, n_fit)
    else:
        t = intersect_tables({"GEX": drop_invalid_rows(read_embedding(args.gex), "GEX embedding"),
                              "IMG": drop_invalid_rows(img, "IMG embedding")})
        table = evaluate_embeddings(t["GEX"], t["IMG"], adata, tasks, probe, comm, args.seed, args.min_class_size,
                                    None, args.device)
        n_fit = args.n_fit
        if args.history:
            h = pd.read_csv(args.history, sep="\t")
            if "n_cells" not in h.columns or not len(h):
                raise ValueError(f"{args.history}: no n_cells column/rows (written by workflow_scripts.analysis.nicheformer_mlm)")
            n_fit = int(h["n_cells"].iloc[0])
        table = _lead(table, args.dataset, "posttrain", args.config, args.fraction, args.seed, n_fit)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, sep="\t", index=False)
    log.info("wrote %d rows to %s", len(table), args.out)


if __name__ == "__main__":
    main()
