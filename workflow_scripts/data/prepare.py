"""Stage 1, ``prepare``: read a dataset's raw files into the spot data model.

Writes ``results/{dataset}/spots.h5ad`` (see :mod:`workflow_scripts.data.model`), ``cells.h5ad`` (the
per-cell counts of cell-level data; for spot-level data each spot is its own "cell"), the SpatialData view
``sdata.zarr`` (H&E, spot shapes, labelled table; :mod:`workflow_scripts.data.sdata`) and a QC figure with
sample patches and their spot ids.

CLI::

    python -m workflow_scripts.data.prepare --dataset her2st --params '{...dataset config...}' \
        --seed 0 --spots results/her2st/spots.h5ad --cells results/her2st/cells.h5ad \
        --sdata results/her2st/sdata.zarr --qc-figure results/her2st/qc/patches.png --log logs/her2st/prepare.log
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .model import validate_spots
from .sdata import DEFAULT_IMAGE_UM_PER_PX, write_sdata
from ..io import setup_logging

log = logging.getLogger(__name__)

# reader name -> "module:function"; every function has the signature (params: dict, seed: int) -> (spots, cells|None)
READERS = {
    "her2st": "workflow_scripts.data.prepare:build_her2st",
    "xenium": "workflow_scripts.data.xenium:build_dataset",
    "visium": "workflow_scripts.data.visium:build_dataset",
    "synthetic": "workflow_scripts.data.synthetic:build_dataset",
    "precomputed": "workflow_scripts.data.precomputed:build_dataset",
}

HER2ST_SPOT_UM = 100.0  # legacy ST spots are 100 µm across (workflow_scripts/data/her2st.py)


def build_her2st(params: dict, seed: int):
    """Reader adapter for HER2ST (``reader: her2st``); returns ``(spots, None)``."""
    from .her2st import read_her2st

    spots = read_her2st(
        params["resource_dir"],
        sections=params.get("sections"),
        max_spots_per_slide=params.get("max_spots_per_slide"),
        seed=seed,
    )
    spots.uns["spot_diameter_um"] = HER2ST_SPOT_UM
    return spots, None


def get_reader(name: str):
    """Return the reader function registered under ``name``; KeyError lists the known readers."""
    if name not in READERS:
        raise KeyError(f"unknown dataset reader {name!r}; known: {sorted(READERS)} (config key datasets.<name>.reader)")
    mod, fn = READERS[name].split(":")
    return getattr(importlib.import_module(mod), fn)


def spots_as_cells(spots: ad.AnnData) -> ad.AnnData:
    """Spot-level data: one "cell" per spot, ``obs['spot_id']`` = the spot id."""
    cells = ad.AnnData(X=spots.X.copy(), var=spots.var.copy())
    cells.obs_names = spots.obs_names.copy()
    cells.obs["spot_id"] = spots.obs_names.to_numpy()
    return cells


def spot_map_figure(spots: ad.AnnData, out: str | Path) -> None:
    """QC figure of a dataset without H&E images: the spots of each slide at their µm coordinates, coloured by the
    first label column (or the donor), saved to ``out``. No patch is cut."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slides = sorted(spots.obs["slide"].astype(str).unique())
    label_col = next((c for c in spots.obs.columns if c not in ("slide", "donor", "split")
                      and isinstance(spots.obs[c].dtype, pd.CategoricalDtype)), "donor")
    codes, names = pd.factorize(spots.obs[label_col].astype(str), sort=True)
    ncol = min(len(slides), 4)
    nrow = int(np.ceil(len(slides) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.0 * ncol, 3.0 * nrow), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for ax, s in zip(axes.ravel(), slides):
        m = spots.obs["slide"].astype(str).to_numpy() == s
        ax.axis("on")
        ax.scatter(spots.obs["x_um"][m], spots.obs["y_um"][m], c=[cmap(c % cmap.N) for c in codes[m]], s=6)
        ax.set_title(f"{s} ({int(m.sum())} spots)", fontsize=8)
        ax.set_xlabel("x (µm)", fontsize=7)
        ax.set_ylabel("y (µm)", fontsize=7)
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.tick_params(labelsize=6)
    handles = [plt.Line2D([], [], ls="", marker="o", color=cmap(i % cmap.N), label=n) for i, n in enumerate(names)]
    fig.legend(handles=handles[:20], title=label_col, fontsize=7, title_fontsize=7, loc="center right")
    fig.suptitle(f"{spots.uns.get('dataset', '')}: spots (no H&E images; coloured by {label_col})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.85, 1 - 0.35 / fig.get_figheight()))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def qc_figure(spots: ad.AnnData, patch_um: float, out: str | Path, n_per_slide: int = 3, seed: int = 0) -> None:
    """Save a grid of sample patches (``n_per_slide`` per slide, titled with their spot ids) to ``out``.

    A dataset without slide images (:func:`workflow_scripts.data.model.has_images` false) gets the spot map of
    :func:`spot_map_figure` instead; no patch is cut.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .model import has_images

    if not has_images(spots):
        log.info("no slide images: the QC figure shows the spot layout instead of patches")
        spot_map_figure(spots, out)
        return

    from .patches import patch_reader

    rng = np.random.default_rng(seed)
    reader = patch_reader(spots, patch_um, out_px=224)
    slides = spots.obs["slide"].astype(str)
    picks = []
    for s in sorted(slides.unique()):
        idx = np.flatnonzero(slides.to_numpy() == s)
        picks += list(rng.choice(idx, size=min(n_per_slide, len(idx)), replace=False))
    ncol = n_per_slide
    nrow = int(np.ceil(len(picks) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.4 * ncol, 2.5 * nrow), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    label_col = next((c for c in ("cluster", "region", "annotation") if c in spots.obs), None)
    for ax, i in zip(axes.ravel(), picks):
        ax.imshow(reader[int(i)])
        title = spots.obs_names[i]
        if label_col is not None and pd.notna(spots.obs[label_col].iloc[i]):
            title += f"\n{spots.obs[label_col].iloc[i]}"
        ax.set_title(title, fontsize=7)
    fig.suptitle(f"{spots.uns.get('dataset', '')}: sample patches ({patch_um:g} µm, resampled to 224 px)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def prepare(dataset: str, params: dict, seed: int, spots_out, cells_out, qc_out=None, sdata_out=None) -> ad.AnnData:
    """Run the dataset's reader, validate, write spots/cells AnnData, the SpatialData zarr and the QC figure.

    ``sdata_out`` (optional) receives :func:`workflow_scripts.data.sdata.write_sdata` with the H&E at
    ``params['sdata_um_per_px']`` µm/px (default 2; null = full resolution). Returns the spots.
    """
    reader = get_reader(params.get("reader", dataset))
    spots, cells = reader(params, seed)
    spots.uns["dataset"] = dataset
    validate_spots(spots, source=f"dataset {dataset!r}")
    if cells is None:
        cells = spots_as_cells(spots)
    missing = set(cells.obs["spot_id"].astype(str)) - set(spots.obs_names)
    if missing:
        raise ValueError(f"{len(missing)} cells point at unknown spot ids (e.g. {sorted(missing)[:3]})")
    log.info(
        "%s: %d spots on %d slides, %d genes, %d cells",
        dataset, spots.n_obs, spots.obs["slide"].nunique(), spots.n_vars, cells.n_obs,
    )
    for c in spots.obs.columns:
        if isinstance(spots.obs[c].dtype, pd.CategoricalDtype) and c not in ("slide", "donor", "split"):
            counts = spots.obs[c].value_counts(dropna=False)
            log.info("label %s: %s", c, "; ".join(f"{k}: {v}" for k, v in counts.items()))
    Path(spots_out).parent.mkdir(parents=True, exist_ok=True)
    spots.write_h5ad(spots_out, compression="gzip")
    cells.write_h5ad(cells_out, compression="gzip")
    if sdata_out:
        write_sdata(spots, sdata_out, params.get("sdata_um_per_px", DEFAULT_IMAGE_UM_PER_PX),
                    float(params.get("patch_um", 200)))
    if qc_out:
        qc_figure(spots, float(params.get("patch_um", 200)), qc_out, seed=seed)
    return spots


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--params", required=True, help="the dataset's config entry as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spots", required=True)
    p.add_argument("--cells", required=True)
    p.add_argument("--sdata", help="SpatialData zarr store to write (optional)")
    p.add_argument("--qc-figure")
    p.add_argument("--log")
    a = p.parse_args(argv)
    setup_logging(a.log)
    prepare(a.dataset, json.loads(a.params), a.seed, a.spots, a.cells, a.qc_figure, a.sdata)


if __name__ == "__main__":
    main()
