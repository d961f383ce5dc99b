"""Tensor fusion: the outer product by hand, fitting on the fit rows only, and the XOR a linear probe can then read."""

import re

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from workflow_scripts.methods import CONTROLS, embed_with_state, fit_method
from workflow_scripts.methods import tensor_fusion as tf


def test_outer_fusion_by_hand():
    u_img = np.array([[2.0], [0.5]])
    u_gex = np.array([[3.0, -1.0], [1.0, 4.0]])
    z = tf.outer_fusion(u_img, u_gex)
    # [1, a] ⊗ [1, b1, b2] = [1, b1, b2, a, a b1, a b2]
    np.testing.assert_allclose(z, [[1, 3, -1, 2, 6, -2], [1, 1, 4, 0.5, 0.5, 2]])


def test_reduction_is_whitened_and_rank_clipped():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5))
    red = tf.fit_reduction(z, 3)
    u = tf.reduce(z, red)
    np.testing.assert_allclose(u.std(axis=0, ddof=1), 1.0, atol=1e-8)
    assert tf.fit_reduction(z[:3], 8)["components"].shape == (2, 5)  # n_fit - 1
    with pytest.raises(ValueError, match="rank"):
        tf.fit_reduction(z, 0)


def xor_data(n=400, seed=0):
    """One IMG and one GEX direction whose signs' XOR is the label, hidden among noise dimensions."""
    rng = np.random.default_rng(seed)
    a, b = rng.choice([-1.0, 1.0], n), rng.choice([-1.0, 1.0], n)
    z_img = np.column_stack([a + 0.2 * rng.normal(size=n), rng.normal(size=(n, 3)) * 0.5])
    z_gex = np.column_stack([rng.normal(size=(n, 3)) * 0.5, b + 0.2 * rng.normal(size=n)])
    return z_img, z_gex, (a * b > 0).astype(int)


def test_a_linear_probe_reads_xor_from_tensor_fusion_but_not_from_concat():
    z_img, z_gex, y = xor_data()
    res = fit_method("tensor_fusion", z_gex, z_img, {"rank": 4}, seed=0)
    assert res.z3.shape == (400, 25) and res.views is None and res.state["method"] == "tensor_fusion"
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    f1_tf = cross_val_score(probe, res.z3, y, cv=5, scoring="f1_macro").mean()
    f1_concat = cross_val_score(probe, np.hstack([z_img, z_gex]), y, cv=5, scoring="f1_macro").mean()
    assert f1_tf > 0.95 and f1_concat < 0.65


def test_fit_mask_fits_on_the_fit_rows_only():
    z_img, z_gex, _ = xor_data()
    mask = np.zeros(400, dtype=bool)
    mask[:300] = True
    res = fit_method("tensor_fusion", z_gex, z_img, {"rank": 3}, seed=0, fit_mask=mask)
    ref = tf.fit_tensor_fusion(z_img[:300], z_gex[:300], 3)
    np.testing.assert_allclose(res.z3, tf.tensor_fusion_embedding(ref, z_img, z_gex), rtol=1e-5, atol=1e-5)
    # changing held-out rows changes neither the fitted state nor the training rows' embedding
    z_img2 = z_img.copy()
    z_img2[300:] += 100.0
    res2 = fit_method("tensor_fusion", z_gex, z_img2, {"rank": 3}, seed=0, fit_mask=mask)
    np.testing.assert_allclose(res2.z3[:300], res.z3[:300])
    z3, views = embed_with_state(res.state, z_gex, z_img)
    np.testing.assert_allclose(z3, res.z3)
    assert views is None


def test_rule_wildcards_list_the_registered_controls(repo):
    text = (repo / "rules/common.smk").read_text()
    listed = re.search(r"ALL_CONTROLS = \[([^\]]*)\]", text).group(1)
    assert [m.strip().strip('"') for m in listed.split(",")] == list(CONTROLS)
    schema = (repo / "config/config.schema.yaml").read_text()
    assert "items: {enum: [tensor_fusion]}" in schema
