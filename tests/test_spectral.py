"""Spectral analysis of the whitened cross-covariance (workflow_scripts/analysis/spectral.py)."""

import numpy as np
import pandas as pd
import pytest

from workflow_scripts.analysis import spectral
from workflow_scripts.io import embedding_frame, write_embedding


def planted(k, n=500, p=8, q=10, noise=0.8, seed=0):
    """Views sharing exactly k latent directions (rank-k cross-covariance) plus independent noise."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, k))
    x = np.hstack([z, np.zeros((n, p - k))]) + noise * rng.standard_normal((n, p))
    y = np.hstack([z, np.zeros((n, q - k))]) + noise * rng.standard_normal((n, q))
    return x, y


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_planted_rank_k_gives_k_significant_directions(k):
    x, y = planted(k, seed=k)
    s = spectral.cross_spectrum(x, y, {"n_permutations": 100}, seed=1, progress=False)
    assert s.n_significant == k
    tab = s.table()
    # the k signal directions lie above the null band, the next one does not
    assert (tab["singular_value"][:k] > tab["null_hi"][:k]).all()
    assert s.p_values[k] >= 0.05
    assert np.isnan(s.p_values[k + 1:]).all()  # not tested after the first non-significant rank
    # population canonical correlation of a shared direction: 1 / (1 + 0.8²) = 0.61
    if k:
        assert np.allclose(s.singular_values[:k], 1 / (1 + 0.8**2), atol=0.08)


def test_whitening_makes_spectrum_invariant_to_invertible_maps():
    x, y = planted(3, seed=7)
    rng = np.random.default_rng(3)
    a = rng.standard_normal((8, 8)) + 3 * np.eye(8)
    b = rng.standard_normal((10, 10)) + 3 * np.eye(10)
    exact = {"n_permutations": 20, "regularization": 0.0}
    s1 = spectral.cross_spectrum(x, y, exact, seed=0, progress=False)
    s2 = spectral.cross_spectrum(x @ a * 1e3, y @ b + 5.0, exact, seed=0, progress=False)
    np.testing.assert_allclose(s1.singular_values, s2.singular_values, atol=1e-9)
    assert s1.n_significant == s2.n_significant == 3
    # the default ridge (1e-6 of the mean eigenvalue) changes the spectrum only marginally
    s3 = spectral.cross_spectrum(x @ a, y @ b, {"n_permutations": 20}, seed=0, progress=False)
    np.testing.assert_allclose(s1.singular_values, s3.singular_values, atol=1e-4)
    # without whitening the spectrum is not invariant (the check above could fail)
    u1 = spectral.cross_spectrum(x, y, {"n_permutations": 5, "use_whitening": False}, seed=0, progress=False)
    u2 = spectral.cross_spectrum(x @ a, y @ b, {"n_permutations": 5, "use_whitening": False}, seed=0, progress=False)
    assert not np.allclose(u1.singular_values, u2.singular_values, atol=1e-3)


def test_canonical_correlations_match_sklearn_cca():
    from sklearn.cross_decomposition import CCA

    x, y = planted(2, n=800, p=4, q=5, seed=2)
    s = spectral.cross_spectrum(x, y, {"n_permutations": 5}, seed=0, progress=False)
    u, v = CCA(n_components=2, max_iter=5000, tol=1e-10).fit(x, y).transform(x, y)
    ref = [abs(np.corrcoef(u[:, i], v[:, i])[0, 1]) for i in range(2)]
    np.testing.assert_allclose(s.singular_values[:2], ref, atol=1e-3)


def test_sequential_shortcut_is_exact():
    """The interlacing shortcut gives the same p-values as recomputing every permutation at every rank."""
    x, y = planted(4, n=300, p=9, q=9, noise=1.2, seed=11)
    a = spectral.whitened_basis(x)
    b = spectral.whitened_basis(y)
    rng = np.random.default_rng(0)
    perms = [rng.permutation(len(x)) for _ in range(60)]
    top = np.array([np.linalg.svd(a.T @ b[pi] / (len(x) - 1), compute_uv=False)[0] for pi in perms])
    fast = spectral.sequential_pvalues(a, b, 0.05, perms, top, progress=False)
    slow = spectral.sequential_pvalues(a, b, 0.05, perms, None, progress=False)
    np.testing.assert_array_equal(fast, slow)


def test_rank_deficient_view_is_reduced_not_inflated():
    x, y = planted(2, seed=5)
    x_dup = np.hstack([x, x[:, :3] + x[:, 3:6]])  # 3 exactly dependent columns
    s = spectral.cross_spectrum(x_dup, y, {"n_permutations": 20}, seed=0, progress=False)
    assert s.p_eff == 8 and s.q_eff == 10
    assert s.singular_values.max() < 0.8  # no spurious canonical correlation of 1


def test_spectral_gaps_by_hand():
    s = np.array([0.9, 0.8, 0.3, 0.25])
    g = spectral.spectral_gaps(s, 2)
    assert g["gap_at_k"] == pytest.approx(0.5)
    assert g["largest_gap"] == pytest.approx(0.5) and g["largest_gap_rank"] == 2
    assert np.isnan(spectral.spectral_gaps(s, 0)["gap_at_k"])
    assert np.isnan(spectral.spectral_gaps(s, 4)["gap_at_k"])
    assert spectral.count_significant(np.array([0.01, 0.01, 0.2, 0.01]), 0.05) == 2


def test_bad_params_and_inputs_are_named():
    x, y = planted(1)
    with pytest.raises(ValueError, match="n_permutation"):
        spectral.cross_spectrum(x, y, {"n_permutation": 10})
    with pytest.raises(ValueError, match="same number of rows"):
        spectral.cross_spectrum(x, y[:-1])
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        spectral.cross_spectrum(x, y)


@pytest.mark.parametrize("keys", [("img", "gex"), ("view_img", "view_gex")])
def test_views_cli_and_collect(tmp_path, keys):
    x, y = planted(2, n=200, seed=3)
    ids = np.array([f"s{i}" for i in range(200)])
    y[5, 0] = np.nan  # dropped, counted in the log
    path = tmp_path / "seed0.views.npz"
    np.savez(path, spot_id=ids, **{keys[0]: y.astype(np.float32), keys[1]: x.astype(np.float32)})
    got_ids, img, gex = spectral.load_views_npz(path)
    assert len(got_ids) == 199 and "s5" not in set(got_ids)
    out = tmp_path / "cca.tsv"
    spectral.main(["views", "--views", str(path), "--method", "cca", "--dataset", "toy", "--seed", "0",
                   "--params", '{"n_permutations": 30}', "--out", str(out), "--log", str(tmp_path / "log")])
    t = pd.read_csv(out, sep="\t")
    assert set(spectral.TABLE_COLUMNS + spectral.SUMMARY_COLUMNS) <= set(t.columns)
    assert (t["source"] == "cca").all() and t["n_significant"].iloc[0] == 2 and t["n"].iloc[0] == 199

    gx = tmp_path / "gex.parquet"
    im = tmp_path / "img.parquet"
    write_embedding(embedding_frame(x, ids), gx)
    write_embedding(embedding_frame(y[:, :7], ids), im)
    uni = tmp_path / "unimodal.tsv"
    spectral.main(["unimodal", "--gex", str(gx), "--img", str(im), "--dataset", "toy", "--params",
                   '{"n_permutations": 30}', "--out", str(uni)])
    spectral.main(["collect", "--inputs", str(uni), str(out), "--out", str(tmp_path / "all.tsv"),
                   "--summary", str(tmp_path / "sum.tsv")])
    summ = pd.read_csv(tmp_path / "sum.tsv", sep="\t")
    assert list(summ["source"]) == ["unimodal", "cca"]
    assert len(pd.read_csv(tmp_path / "all.tsv", sep="\t")) == 7 + 8


def test_views_without_arrays_fail_clearly(tmp_path):
    path = tmp_path / "concat.views.npz"
    np.savez(path, spot_id=np.array(["a", "b"]))
    with pytest.raises(KeyError, match="concat and random"):
        spectral.load_views_npz(path)
