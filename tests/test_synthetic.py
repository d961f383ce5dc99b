"""The synthetic dataset: data model, labels from the latents, exact joints, no patches, prepare end to end."""

import numpy as np
import pandas as pd
import pytest

from workflow_scripts.data import model, synthetic
from workflow_scripts.evaluation import pid

SMALL = {"n_slides": 2, "n_donors": 2, "grid": [6, 8]}


def test_simulate_follows_the_data_model_without_images():
    a = synthetic.simulate(SMALL)
    model.validate_spots(a, "synthetic", check_images=True)  # empty image paths are "no image", not missing files
    assert a.n_obs == 2 * 6 * 8 and a.n_vars == 0
    assert not model.has_images(a)
    assert a.obsm["gex_embedding"].shape == (96, 32) and a.obsm["img_embedding"].shape == (96, 32)
    assert set(a.obs["donor"]) == {"D1", "D2"} and set(a.obs["slide"]) == {"S1", "S2"}
    np.testing.assert_allclose(np.diff(np.sort(a.obs.loc[a.obs.slide == "S1", "x_um"].unique())), 100.0)


def test_simulate_is_deterministic_and_the_seed_matters():
    a, b = synthetic.simulate(SMALL), synthetic.simulate(SMALL)
    np.testing.assert_array_equal(a.obsm["gex_embedding"], b.obsm["gex_embedding"])
    c = synthetic.simulate({**SMALL, "seed": 1})
    assert not np.allclose(a.obsm["gex_embedding"], c.obsm["gex_embedding"])


def test_labels_are_the_planted_functions_of_the_latents():
    a = synthetic.simulate({**SMALL, "mixtures": {"m": {"redundant": 0.5, "synergy": 0.5}}})
    s, g, i = (a.obs[c].to_numpy() for c in ("latent_shared", "latent_gex", "latent_img"))
    assert (a.obs["redundant"].astype(str) == [f"s{v}" for v in s]).all()
    assert (a.obs["unique_gex"].astype(str) == [f"g{v}" for v in g]).all()
    assert (a.obs["synergy"].astype(str) == [f"y{v}" for v in (g ^ i)]).all()
    prod = a.obsm["product"][:, 0]
    assert np.corrcoef(prod, (2 * g - 1) * (2 * i - 1))[0, 1] > 0.95
    m = a.obs["m"].astype(str).to_numpy()
    from_rdn, from_syn = m == np.array([f"y{v}" for v in s]), m == np.array([f"y{v}" for v in g ^ i])
    assert (from_rdn | from_syn).all()  # every mixed label comes from one of its mechanisms
    # the shared factor is constant on 300 µm blocks
    blk = (a.obs.x_um // 300).astype(int).astype(str) + "_" + (a.obs.y_um // 300).astype(int).astype(str)
    assert (pd.Series(s).groupby([a.obs.slide.to_numpy(), blk.to_numpy()]).nunique() == 1).all()


def test_exact_joints_and_their_planted_pid():
    joints = synthetic.task_joints({}, ["redundant", "unique_img", "synergy", "product"])
    for p in joints.values():
        assert p.sum() == pytest.approx(1.0)
    t = pid.pid_truth_table("syn", joints).set_index("task")
    assert t.loc["redundant", "redundancy"] == pytest.approx(np.log2(3), abs=1e-4)
    assert t.loc["unique_img", "unique_img"] == pytest.approx(1.0, abs=1e-4)
    assert t.loc["synergy", "synergy"] == pytest.approx(1.0, abs=1e-4)
    assert t.loc["product", "synergy"] == pytest.approx(1.0, abs=1e-4)  # K = 2: the XOR of the signs


def test_plugin_pid_of_the_sampled_latents_approaches_the_exact_one():
    """The spots' own latents (no embedding, no clustering) give the planted terms up to sampling error."""
    gen = {"mixtures": {"m": {"redundant": 0.5, "synergy": 0.5}}}
    a = synthetic.simulate(gen)
    s, g, i = (a.obs[c].to_numpy() for c in ("latent_shared", "latent_gex", "latent_img"))
    exact = pid.pid_broja(synthetic.task_joint(gen, "m"))
    sampled = pid.pid_broja(pid.joint_from_samples(s * 2 + g, s * 2 + i, a.obs["m"].astype(str)))
    for term in ("redundancy", "synergy", "unique_1", "unique_2"):
        assert abs(sampled[term] - exact[term]) < 0.06, term


@pytest.mark.parametrize(
    "params, key",
    [
        ({"latnet": {}}, "latnet"),
        ({"latent": {"shared": 1}}, "latent.shared"),
        ({"mixtures": {"m": {"redundant": 0.3, "synergy": 0.3}}}, "sum to 1"),
        ({"mixtures": {"m": {"copy": 1.0}}}, "copy"),
        ({"n_donors": 5, "n_slides": 2}, "n_donors"),
    ],
)
def test_bad_generator_params_name_the_key(params, key):
    with pytest.raises(ValueError, match=key):
        synthetic.generator_params(params)


def test_no_patches_are_cut_and_the_qc_figure_is_a_spot_map(tmp_path):
    from workflow_scripts.data.patches import patch_reader
    from workflow_scripts.data.prepare import prepare

    a = synthetic.simulate(SMALL)
    with pytest.raises(ValueError, match="no H&E image"):
        patch_reader(a, 200.0)
    params = {"reader": "synthetic", "generator": SMALL}
    spots = prepare("syn", params, 0, tmp_path / "spots.h5ad", tmp_path / "cells.h5ad", tmp_path / "qc.png")
    assert (tmp_path / "qc.png").stat().st_size > 1000
    import anndata as ad

    back = ad.read_h5ad(tmp_path / "spots.h5ad")
    np.testing.assert_allclose(back.obsm["img_embedding"], spots.obsm["img_embedding"])
    assert back.uns["slides"]["S1"]["image_path"] == ""


def test_sdata_of_a_dataset_without_images_has_shapes_and_a_table(tmp_path):
    import spatialdata

    from workflow_scripts.data.prepare import prepare

    params = {"reader": "synthetic", "generator": SMALL}
    spots = prepare("syn", params, 0, tmp_path / "spots.h5ad", tmp_path / "cells.h5ad", None, tmp_path / "sd.zarr")
    sd = spatialdata.read_zarr(tmp_path / "sd.zarr")
    assert len(sd.images) == 0
    slides = list(spots.uns["slides"])
    assert sorted(sd.shapes) == sorted(f"spots_{s}" for s in slides)
    assert sum(len(sd.shapes[f"spots_{s}"]) for s in slides) == spots.n_obs
    assert sd.tables["table"].n_obs == spots.n_obs
