"""Shared fixtures: the repository root and small synthetic spot datasets that follow the data model."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]

# Subprocesses (snakemake jobs run in temporary working directories, CLIs) import this checkout's package, not
# whichever copy happens to be installed.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture
def tiny_spots(tmp_path):
    """A 2-slide, 6 x 6-grid spot AnnData (200 µm pitch) with a synthetic PNG slide image per slide."""
    from PIL import Image

    rng = np.random.default_rng(0)
    obs_rows, slides = [], {}
    for s in ("S1", "S2"):
        img = (rng.uniform(150, 255, size=(400, 400, 3))).astype(np.uint8)
        path = tmp_path / f"{s}.png"
        Image.fromarray(img).save(path)
        slides[s] = {"image_path": str(path), "um_per_px": 4.0}
        for i in range(6):
            for j in range(6):
                obs_rows.append(
                    dict(spot=f"{s}_{i}x{j}", slide=s, donor="D" + s, x_um=200.0 * i, y_um=200.0 * j,
                         px_x=50 + 50.0 * i, px_y=50 + 50.0 * j, split="eval",
                         cluster="a" if i < 3 else "b")
                )
    obs = pd.DataFrame(obs_rows).set_index("spot")
    for c in ("slide", "donor", "split", "cluster"):
        obs[c] = obs[c].astype("category")
    X = sp.csr_matrix(rng.poisson(2.0, size=(len(obs), 30)).astype(np.float32))
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"G{k}" for k in range(30)]))
    comp = rng.dirichlet(np.ones(3), size=len(obs))
    a.obsm["composition"] = comp
    a.uns["composition_names"] = ["t1", "t2", "t3"]
    a.uns["slides"] = slides
    a.uns["dataset"] = "tiny"
    return a
