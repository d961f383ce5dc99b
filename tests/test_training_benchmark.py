"""Training benchmark (workflow_scripts.methods.benchmark): the timed loop is the training loop, sizes as asked."""

import numpy as np
import pytest

from workflow_scripts.methods import benchmark_training, largest_batch_size
from workflow_scripts.methods.benchmark import synthetic_pair


def test_synthetic_pair_shares_planted_directions():
    gex, img = synthetic_pair(3000, 20, 30, n_latent=4, seed=1)
    assert gex.shape == (3000, 20) and img.shape == (3000, 30) and gex.dtype == np.float32
    np.testing.assert_allclose(gex.std(0), 1, atol=1e-4)
    # the cross-covariance has rank 4 (the latent), up to noise
    s = np.linalg.svd(gex.T @ img / 3000, compute_uv=False)
    assert s[3] > 10 * s[4]


SMALL = {"simclr": {"projection_dim": 16}, "dim": {"projection_dim": 16, "hidden_dim": 32}}


@pytest.mark.parametrize("method", ["simclr", "dim"])
def test_benchmark_times_whole_and_partial_epochs(method):
    full = benchmark_training(method, n=256, d_gex=12, d_img=16, batch_size=32, epochs=2, device="cpu", threads=1,
                              params=SMALL[method])
    assert full["steps_per_epoch"] == 8 and full["steps_timed"] == 16
    assert full["epochs_per_s"] == pytest.approx(full["steps_per_s"] / 8)
    assert full["epochs_per_s"] > 0 and full["peak_rss_gib"] > 0 and full["threads"] == 1
    part = benchmark_training(method, n=256, d_gex=12, d_img=16, batch_size=64, epochs=1, max_steps=2,
                              params=SMALL[method])
    assert part["steps_timed"] == 2 and part["steps_per_epoch"] == 4
    with pytest.raises(ValueError, match="not trained by gradient descent"):
        benchmark_training("cca", n=64, d_gex=4, d_img=4)
    with pytest.raises(ValueError, match="batch_size"):
        benchmark_training(method, n=16, d_gex=4, d_img=4, batch_size=32)


def test_largest_batch_size_doubles_up_to_the_full_batch():
    best, tried = largest_batch_size("byol", n=100, d_gex=8, d_img=8, mem_limit_gib=64.0, start=32,
                                     max_steps=1, params={"projection_dim": 8})
    assert best == 100 and [t["batch_size"] for t in tried] == [32, 64, 100]
    none, _ = largest_batch_size("byol", n=100, d_gex=8, d_img=8, mem_limit_gib=1e-3, start=32, max_steps=1,
                                 params={"projection_dim": 8})
    assert none == 0  # every child process exceeds a 1 MiB limit
