"""QC figure of a prepared dataset: sample patches of every slide at the patch size the image encoder sees.

Its own rule (``qc_patches``), apart from ``prepare``: the figure depends on ``patch_um``, the spots do not, so
changing the patch size redraws the figure and re-embeds the images without rebuilding the spots.

CLI::

    python -m workflow_scripts.data.qc --spots results/her2st/spots.h5ad --patch-um 200 \
        --out results/her2st/qc/patches.png --log logs/her2st/qc_patches.log
"""

from __future__ import annotations

import argparse
import logging

import anndata as ad

from ..io import setup_logging
from .prepare import qc_figure

log = logging.getLogger(__name__)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spots", required=True, help="spots AnnData (results/<dataset>/spots.h5ad)")
    p.add_argument("--patch-um", type=float, required=True, help="physical patch side (µm)")
    p.add_argument("--n-per-slide", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="draws the spots shown")
    p.add_argument("--out", required=True, help="PNG")
    p.add_argument("--log")
    a = p.parse_args(argv)
    setup_logging(a.log)
    spots = ad.read_h5ad(a.spots)
    qc_figure(spots, a.patch_um, a.out, n_per_slide=a.n_per_slide, seed=a.seed)
    log.info("QC figure: %d slides, %g µm patches -> %s", spots.obs["slide"].nunique(), a.patch_um, a.out)


if __name__ == "__main__":
    main()
