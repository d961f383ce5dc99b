"""Reader for the HER2ST legacy Spatial Transcriptomics data shipped in ``resources/her2st``.

Andersson et al., Nat Commun 12:6012 (2021); CC BY 4.0 (see ``resources/her2st/PROVENANCE.md``).
Spots are 100 µm across on a 200 µm centre-to-centre grid. ``sections.tsv`` lists, per section, the file
paths (relative to the resource folder) and how spot pixels map onto the shipped image:
image pixel = ``pixel_{x,y}`` × ``coord_scale``; µm = ``pixel_{x,y}`` × ``orig_um_per_px``.

Labels built here (all per spot):
* ``cluster`` – the authors' expression-cluster annotation (``motivation.csv``) harmonised across
  patients with ``clusters/harmonisation.tsv`` (numbered sub-clusters merged, e.g. "cancer 2" → "cancer").
  Being derived from expression clustering, this target favours GEX by construction.
* ``dominant_celltype`` – argmax of the stereoscope "major" cell-type proportions.
* ``pathology`` – pathologist region labels, only for section A1 (NaN elsewhere).
* ``obsm['composition']`` – the 8 stereoscope major cell-type proportions (rows renormalised to 1).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..io import lazy_module, read_table
from .model import validate_spots

ad = lazy_module("anndata")  # imported on first use: readers are imported while the DAG is planned
log = logging.getLogger(__name__)

#: How to restore a missing or damaged HER2ST file (appended to every error about one).
RESTORE = (
    "The repository ships the HER2ST files under resources/her2st (checksums in resources/her2st/SHA256SUMS); "
    "restore them with `git checkout -- resources/her2st` or fix `resource_dir` in the config."
)
#: Columns each HER2ST table must have (keyed by the `sections.tsv` column that holds its path, or its name).
COLUMNS = {
    "sections": ("section", "patient", "counts_path", "spots_path", "clusters_path", "deconv_path", "image_path",
                 "coord_scale", "um_per_px", "orig_um_per_px"),
    "harmonisation": ("patient", "cluster", "harmonised"),
    "spots_path": ("x", "y", "pixel_x", "pixel_y"),
    "clusters_path": ("patient_id", "label", "x", "y"),
    "pathology_path": ("x", "y", "label"),
}


def _need(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"HER2ST input file missing: {path}. {RESTORE}")
    return path


def _table(path: Path, columns: tuple[str, ...] = (), **kw) -> pd.DataFrame:
    """A HER2ST table; FileNotFoundError / DataFileError (truncated, corrupt, missing columns) name the file."""
    return read_table(_need(path), required=columns, hint=RESTORE, sep="\t", **kw)


def read_sections_table(resource_dir: str | Path) -> pd.DataFrame:
    """Read ``sections.tsv`` (one row per section) from the HER2ST resource folder.

    Raises FileNotFoundError naming the file when absent, DataFileError when it lacks a column it needs.
    """
    resource_dir = Path(resource_dir)
    return _table(resource_dir / "sections.tsv", COLUMNS["sections"], dtype={"section": str}).set_index("section")


def _read_section(resource_dir: Path, row: pd.Series, section: str, harmon: pd.DataFrame) -> ad.AnnData:
    counts = _table(resource_dir / row["counts_path"], index_col=0)
    counts.index = counts.index.astype(str)
    spots = _table(resource_dir / row["spots_path"], COLUMNS["spots_path"])
    spots.index = spots["x"].astype(int).astype(str) + "x" + spots["y"].astype(int).astype(str)
    spots = spots[~spots.index.duplicated()]
    missing = counts.index.difference(spots.index)
    if len(missing):
        log.warning("%s: %d of %d count rows have no spot coordinates and are dropped", section, len(missing), len(counts))
        counts = counts.drop(index=missing)
    spots = spots.loc[counts.index]
    n0 = len(counts)
    empty = counts.sum(axis=1).to_numpy() == 0
    if empty.any():
        log.warning("%s: %d spots with zero total counts dropped", section, int(empty.sum()))
        counts, spots = counts.loc[~empty], spots.loc[~empty]

    obs = pd.DataFrame(index=[f"{section}_{i}" for i in counts.index])
    obs["slide"] = section
    obs["donor"] = str(row["patient"])
    obs["array_x"] = spots["x"].to_numpy(int)
    obs["array_y"] = spots["y"].to_numpy(int)
    obs["x_um"] = spots["pixel_x"].to_numpy(float) * float(row["orig_um_per_px"])
    obs["y_um"] = spots["pixel_y"].to_numpy(float) * float(row["orig_um_per_px"])
    obs["px_x"] = spots["pixel_x"].to_numpy(float) * float(row["coord_scale"])
    obs["px_y"] = spots["pixel_y"].to_numpy(float) * float(row["coord_scale"])

    # expression-cluster labels, keyed by integer array x,y
    cl = _table(resource_dir / row["clusters_path"], COLUMNS["clusters_path"], index_col=0)
    cl.index = cl["x"].astype(int).astype(str) + "x" + cl["y"].astype(int).astype(str)
    cl = cl[~cl.index.duplicated()]
    key = pd.MultiIndex.from_arrays([cl["patient_id"].astype(str), cl["label"].astype(int)])
    names = harmon.reindex(key)["harmonised"].to_numpy()
    cl_name = pd.Series(names, index=cl.index)
    obs["cluster"] = cl_name.reindex(counts.index).to_numpy()
    n_nolab = int(pd.isna(obs["cluster"]).sum())
    if n_nolab:
        log.warning("%s: %d of %d spots have no expression-cluster label", section, n_nolab, len(obs))

    # stereoscope major cell-type proportions, keyed by "{x}x{y}"
    dec = _table(resource_dir / row["deconv_path"], index_col=0)
    dec.index = dec.index.astype(str)
    comp = dec.reindex(counts.index)
    n_nocomp = int(comp.isna().any(axis=1).sum())
    if n_nocomp:
        log.warning("%s: %d of %d spots have no deconvolution proportions", section, n_nocomp, len(obs))

    # pathologist labels (fitted array coordinates, rounded to match count rows)
    obs["pathology"] = np.nan
    ppath = row.get("pathology_path")
    if isinstance(ppath, str) and ppath:
        pat = _table(resource_dir / ppath, COLUMNS["pathology_path"])
        pat.index = pat["x"].round().astype(int).astype(str) + "x" + pat["y"].round().astype(int).astype(str)
        pat = pat[~pat.index.duplicated()]
        obs["pathology"] = pat["label"].reindex(counts.index).to_numpy()
        log.info(
            "%s: pathologist labels matched for %d of %d spots (%d label rows)",
            section, int(obs["pathology"].notna().sum()), len(obs), len(pat),
        )

    X = sp.csr_matrix(counts.to_numpy(dtype=np.float32))
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=counts.columns.astype(str)))
    a.obsm["composition"] = comp.to_numpy(dtype=float)
    a.uns["composition_names"] = [str(c) for c in dec.columns]
    log.info("%s: %d spots kept of %d, %d genes", section, a.n_obs, n0, a.n_vars)
    return a


def read_her2st(
    resource_dir: str | Path,
    sections: Sequence[str] | None = None,
    max_spots_per_slide: int | None = None,
    seed: int = 0,
) -> ad.AnnData:
    """Build the spots AnnData (see :mod:`workflow_scripts.data.model`) for the HER2ST sections.

    Parameters
    ----------
    resource_dir : folder with ``sections.tsv`` and the files it names.
    sections : section ids to read (None: every row of ``sections.tsv``; an empty list is an error).
    max_spots_per_slide : if set, keep a random subset of at most this many spots per section
        (seeded by ``seed``), for quick test runs.

    Genes are the union over sections (absent genes are zero-filled). Spots without labels keep NaN
    labels; spots without composition get an all-NaN composition row (the probes drop them, with a log).
    Raises FileNotFoundError naming any missing input file, ValueError for unknown section ids or an empty
    ``sections``, :class:`workflow_scripts.io.DataFileError` naming a truncated or corrupt file or a missing column.
    """
    resource_dir = Path(resource_dir)
    table = read_sections_table(resource_dir)
    if sections is not None and len(sections) == 0:
        raise ValueError("sections is empty: list section ids, or leave it out (null) to read every section of "
                         f"{resource_dir / 'sections.tsv'} (config key datasets.<name>.sections)")
    sections = list(table.index) if sections is None else list(sections)
    unknown = [s for s in sections if s not in table.index]
    if unknown:
        raise ValueError(f"unknown HER2ST sections {unknown}; {resource_dir / 'sections.tsv'} lists {list(table.index)}")
    harmon = _table(resource_dir / "clusters" / "harmonisation.tsv", COLUMNS["harmonisation"])
    harmon = harmon.set_index(["patient", "cluster"])
    harmon.index = harmon.index.set_levels([harmon.index.levels[0].astype(str), harmon.index.levels[1].astype(int)])

    rng = np.random.default_rng(seed)
    parts = []
    for s in sections:
        a = _read_section(resource_dir, table.loc[s], s, harmon)
        if max_spots_per_slide and a.n_obs > max_spots_per_slide:
            keep = np.sort(rng.choice(a.n_obs, size=max_spots_per_slide, replace=False))
            log.info("%s: subsampled to %d of %d spots (max_spots_per_slide)", s, max_spots_per_slide, a.n_obs)
            a = a[keep].copy()
        parts.append(a)
    names = parts[0].uns["composition_names"]
    adata = ad.concat(parts, join="outer", fill_value=0, merge="first")
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.uns["composition_names"] = names
    comp = np.asarray(adata.obsm["composition"], dtype=float)
    sums = comp.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        adata.obsm["composition"] = np.where(sums > 0, comp / sums, comp)
    for c in ("slide", "donor"):
        adata.obs[c] = adata.obs[c].astype("category")
    for c in ("cluster", "pathology"):
        adata.obs[c] = adata.obs[c].astype(object).where(adata.obs[c].notna(), None).astype("category")
    dom = np.full(adata.n_obs, None, dtype=object)
    ok = np.isfinite(comp).all(axis=1) & (comp.sum(axis=1) > 0)
    dom[ok] = np.asarray(names, dtype=object)[np.argmax(comp[ok], axis=1)]
    adata.obs["dominant_celltype"] = pd.Categorical(dom)
    adata.obs["split"] = pd.Categorical(["eval"] * adata.n_obs)
    adata.uns["slides"] = {
        s: {
            "image_path": str(resource_dir / table.loc[s, "image_path"]),
            "um_per_px": float(table.loc[s, "um_per_px"]),
        }
        for s in sections
    }
    adata.uns["dataset"] = "her2st"
    validate_spots(adata, source=resource_dir)
    return adata


def input_files(params: dict) -> list[str]:
    """Every resource file ``read_her2st`` opens for the configured sections (for Snakemake's input list)."""
    resource_dir = Path(params["resource_dir"])
    files = [resource_dir / "sections.tsv", resource_dir / "clusters" / "harmonisation.tsv"]
    if not files[0].exists():
        return [str(f) for f in files]
    table = read_sections_table(resource_dir)
    sections = list(table.index) if params.get("sections") is None else params["sections"]
    cols = ["counts_path", "spots_path", "clusters_path", "deconv_path", "pathology_path", "image_path"]
    for s in sections:
        if s not in table.index:
            continue  # read_her2st raises a clear error for unknown sections
        for c in cols:
            v = table.loc[s, c]
            if isinstance(v, str) and v:
                files.append(resource_dir / v)
    return [str(f) for f in files]
