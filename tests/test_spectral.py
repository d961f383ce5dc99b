"""Spectral analysis of the whitened cross-covariance (workflow_scripts/analysis/spectral.py)."""

import numpy as np
import pandas as pd
import pytest

from workflow_scripts.analysis import spectral
from workflow_scripts.io import embedding_frame, write_embedding


GLOBAL = {"null_permutation": "global"}


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
    s = spectral.cross_spectrum(x, y, {"n_permutations": 100, **GLOBAL}, seed=1, progress=False)
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
    exact = {"n_permutations": 20, "regularization": 0.0, **GLOBAL}
    s1 = spectral.cross_spectrum(x, y, exact, seed=0, progress=False)
    s2 = spectral.cross_spectrum(x @ a * 1e3, y @ b + 5.0, exact, seed=0, progress=False)
    np.testing.assert_allclose(s1.singular_values, s2.singular_values, atol=1e-9)
    assert s1.n_significant == s2.n_significant == 3
    # the default ridge (1e-6 of the mean eigenvalue) changes the spectrum only marginally
    s3 = spectral.cross_spectrum(x @ a, y @ b, {"n_permutations": 20, **GLOBAL}, seed=0, progress=False)
    np.testing.assert_allclose(s1.singular_values, s3.singular_values, atol=1e-4)
    # without whitening the spectrum is not invariant (the check above could fail)
    u1 = spectral.cross_spectrum(x, y, {"n_permutations": 5, "use_whitening": False, **GLOBAL}, seed=0, progress=False)
    u2 = spectral.cross_spectrum(x @ a, y @ b, {"n_permutations": 5, "use_whitening": False, **GLOBAL}, seed=0, progress=False)
    assert not np.allclose(u1.singular_values, u2.singular_values, atol=1e-3)


def test_canonical_correlations_match_sklearn_cca():
    from sklearn.cross_decomposition import CCA

    x, y = planted(2, n=800, p=4, q=5, seed=2)
    s = spectral.cross_spectrum(x, y, {"n_permutations": 5, **GLOBAL}, seed=0, progress=False)
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
    s = spectral.cross_spectrum(x_dup, y, {"n_permutations": 20, **GLOBAL}, seed=0, progress=False)
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


def write_spots(path, ids, slides):
    """A minimal spot table (results/{dataset}/spots.h5ad) with obs['slide']."""
    import anndata as ad

    obs = pd.DataFrame({"slide": pd.Categorical(slides)}, index=pd.Index(ids, name="spot_id"))
    ad.AnnData(X=np.zeros((len(ids), 1), dtype=np.float32), obs=obs).write_h5ad(path)
    return path


@pytest.mark.parametrize("keys", [("img", "gex"), ("view_img", "view_gex")])
def test_views_cli_and_collect(tmp_path, keys):
    x, y = planted(2, n=200, seed=3)
    ids = np.array([f"s{i}" for i in range(200)])
    spots = write_spots(tmp_path / "spots.h5ad", ids, np.repeat(["A", "B", "C", "D"], 50))
    y[5, 0] = np.nan  # dropped, counted in the log
    path = tmp_path / "seed0.views.npz"
    np.savez(path, spot_id=ids, **{keys[0]: y.astype(np.float32), keys[1]: x.astype(np.float32)})
    got_ids, img, gex = spectral.load_views([path])
    assert len(got_ids) == 199 and "s5" not in set(got_ids)
    out = tmp_path / "cca.tsv"
    spectral.main(["views", "--views", str(path), "--method", "cca", "--dataset", "toy", "--seed", "0",
                   "--params", '{"n_permutations": 30}', "--spots", str(spots), "--out", str(out),
                   "--log", str(tmp_path / "log")])
    t = pd.read_csv(out, sep="\t")
    assert set(spectral.TABLE_COLUMNS + spectral.SUMMARY_COLUMNS) <= set(t.columns)
    assert (t["source"] == "cca").all() and t["n_significant"].iloc[0] == 2 and t["n"].iloc[0] == 199
    assert t["null_permutation"].iloc[0] == "within_slide" and t["n_slides"].iloc[0] == 4
    assert t["rows"].iloc[0] == "all"

    gx = tmp_path / "gex.parquet"
    im = tmp_path / "img.parquet"
    write_embedding(embedding_frame(x, ids), gx)
    write_embedding(embedding_frame(y[:, :7], ids), im)
    uni = tmp_path / "unimodal.tsv"
    spectral.main(["unimodal", "--gex", str(gx), "--img", str(im), "--dataset", "toy", "--params",
                   '{"n_permutations": 30, "null_permutation": "global"}', "--out", str(uni)])
    assert pd.read_csv(uni, sep="\t")["null_permutation"].iloc[0] == "global"
    spectral.main(["collect", "--inputs", str(uni), str(out), "--out", str(tmp_path / "all.tsv"),
                   "--summary", str(tmp_path / "sum.tsv")])
    summ = pd.read_csv(tmp_path / "sum.tsv", sep="\t")
    assert list(summ["source"]) == ["unimodal", "cca"]
    assert len(pd.read_csv(tmp_path / "all.tsv", sep="\t")) == 7 + 8


def test_within_slide_null_needs_slides_and_names_the_fix(tmp_path):
    x, y = planted(1, n=60)
    with pytest.raises(ValueError, match="null_permutation: global"):
        spectral.cross_spectrum(x, y, {"n_permutations": 5}, progress=False)
    ids = np.array([f"s{i}" for i in range(60)])
    gx, im = tmp_path / "gex.parquet", tmp_path / "img.parquet"
    write_embedding(embedding_frame(x, ids), gx)
    write_embedding(embedding_frame(y, ids), im)
    with pytest.raises(ValueError, match="--spots"):
        spectral.main(["unimodal", "--gex", str(gx), "--img", str(im), "--dataset", "toy", "--out",
                       str(tmp_path / "u.tsv")])
    spots = write_spots(tmp_path / "spots.h5ad", ids[:50], ["A"] * 50)  # 10 spots missing from the spot table
    with pytest.raises(ValueError, match="10 spot.*not in"):
        spectral.main(["unimodal", "--gex", str(gx), "--img", str(im), "--dataset", "toy", "--spots", str(spots),
                       "--out", str(tmp_path / "u.tsv")])
    with pytest.raises(ValueError, match="null_permutation must be one of"):
        spectral.check_params({"null_permutation": "slide"})


def test_within_slide_permutations_keep_each_slide_rows_in_that_slide():
    rng = np.random.default_rng(0)
    slides = rng.choice(["A1", "B4", "C2", "C3"], size=300)
    perms = spectral.row_permutations(300, 50, np.random.default_rng(1), slides)
    moved = 0
    for pi in perms:
        assert sorted(pi) == list(range(300))  # a permutation
        np.testing.assert_array_equal(slides[pi], slides)  # every row is paired with a row of its own slide
        moved += (pi != np.arange(300)).mean()
    assert moved / len(perms) > 0.9  # and the pairing within slides is shuffled
    # the global null crosses slides; it draws the same permutations as before slides existed
    glob = spectral.row_permutations(300, 5, np.random.default_rng(1))
    ref = np.random.default_rng(1)
    for pi in glob:
        np.testing.assert_array_equal(pi, ref.permutation(300))
    assert np.mean([(slides[pi] != slides).mean() for pi in glob]) > 0.5


def slide_confounded(n_slides=6, per_slide=150, k_within=1, seed=0):
    """Views whose slide means share a (n_slides − 1)-dimensional signal (a batch effect present in both
    modalities) plus ``k_within`` direction(s) paired spot by spot within slides, plus noise."""
    rng = np.random.default_rng(seed)
    slides = np.repeat(np.arange(n_slides), per_slide)
    n, r = len(slides), n_slides - 1
    means = rng.standard_normal((n_slides, r))[slides]  # slide-level latent shared by both views
    z = rng.standard_normal((n, k_within))  # spot-level latent shared within slides
    p = q = r + k_within + 3
    a, b = rng.standard_normal((r, p)), rng.standard_normal((r, q))
    x = 0.6 * means @ a + np.hstack([z, np.zeros((n, p - k_within))]) + rng.standard_normal((n, p))
    y = 0.6 * means @ b + np.hstack([z, np.zeros((n, q - k_within))]) + rng.standard_normal((n, q))
    return x, y, slides


@pytest.mark.parametrize("k_within", [0, 1, 2])
@pytest.mark.parametrize("seed", [0, 3])
def test_global_null_counts_slide_directions_the_within_slide_null_does_not(k_within, seed):
    x, y, slides = slide_confounded(k_within=k_within, seed=seed)
    glob = spectral.cross_spectrum(x, y, {"n_permutations": 100, **GLOBAL}, seed=0, progress=False)
    within = spectral.cross_spectrum(x, y, {"n_permutations": 100}, seed=0, progress=False, slides=slides)
    assert glob.n_significant >= k_within + 3  # slide directions pass the global null as paired "signal"
    assert within.n_significant == k_within  # only the pairing within slides is counted
    assert within.summary["n_slides"] == 6 and within.summary["null_permutation"] == "within_slide"
    # within slides, a shared spot-level direction has canonical correlation 1 / (1 + 1) = 0.5
    if k_within:
        np.testing.assert_allclose(within.singular_values[:k_within], 0.5, atol=0.1)


def test_slide_means_are_removed_before_the_within_slide_test():
    x, y, slides = slide_confounded(k_within=1, seed=1)
    shift = 100.0 * np.arange(6)[slides][:, None]  # slide offsets of any size change nothing
    a = spectral.cross_spectrum(x, y, {"n_permutations": 20}, seed=0, progress=False, slides=slides)
    b = spectral.cross_spectrum(x + shift, y - shift, {"n_permutations": 20}, seed=0, progress=False, slides=slides)
    np.testing.assert_allclose(a.singular_values, b.singular_values, atol=1e-8)
    np.testing.assert_array_equal(a.p_values, b.p_values)
    centred = spectral.remove_group_means(x, slides)
    np.testing.assert_allclose(pd.DataFrame(centred).groupby(slides).mean(), 0, atol=1e-12)


def write_views(path, ids, img, gex, fit_mask):
    np.savez(path, spot_id=np.asarray(ids), view_img=img.astype(np.float32), view_gex=gex.astype(np.float32),
             fit_mask=np.asarray(fit_mask, dtype=bool))
    return path


def test_held_out_rows_of_several_fold_files_are_concatenated(tmp_path, caplog):
    x, y = planted(2, n=300, seed=4)
    ids = np.array([f"s{i}" for i in range(300)])
    fold = np.arange(300) % 3  # outer fold of each spot: held out in exactly one file
    files = [write_views(tmp_path / f"fold{f}.views.npz", ids, y, x, fold != f) for f in range(3)]
    with caplog.at_level("INFO"):
        got, img, gex = spectral.load_views(files, rows="held_out")
    assert sorted(got) == sorted(ids) and len(got) == 300
    # rows come from the file in which the spot was held out, in file order
    np.testing.assert_array_equal(got, np.concatenate([ids[fold == f] for f in range(3)]))
    np.testing.assert_array_equal(gex, np.concatenate([x[fold == f] for f in range(3)]).astype(np.float32))
    assert all(f"{f}: 100 of 300 rows used (held_out" in caplog.text for f in files)
    # the CLI takes the same files
    spots = write_spots(tmp_path / "spots.h5ad", ids, np.repeat(["A", "B"], 150))
    out = tmp_path / "dcca.tsv"
    spectral.main(["views", "--views", *map(str, files), "--rows", "held_out", "--method", "dcca", "--dataset", "toy",
                   "--params", '{"n_permutations": 20}', "--spots", str(spots), "--out", str(out)])
    t = pd.read_csv(out, sep="\t")
    assert t["n"].iloc[0] == 300 and t["rows"].iloc[0] == "held_out" and t["n_significant"].iloc[0] == 2


def test_held_out_views_fail_clearly_and_keep_each_spot_once(tmp_path):
    x, y = planted(1, n=40)
    ids = np.array([f"s{i}" for i in range(40)])
    transductive = write_views(tmp_path / "seed0.views.npz", ids, y, x, np.ones(40))
    with pytest.raises(ValueError, match="no held-out.*transductive"):
        spectral.load_views([transductive], rows="held_out")
    a = write_views(tmp_path / "a.npz", ids, y, x, np.arange(40) < 30)
    b = write_views(tmp_path / "b.npz", ids, y, x, np.arange(40) < 35)  # s35..s39 held out twice
    got, _, _ = spectral.load_views([a, b], rows="held_out")  # kept once, from the first file
    np.testing.assert_array_equal(got, ids[30:])
    with pytest.raises(ValueError, match="rows must be one of"):
        spectral.load_views([a], rows="test")


def test_views_without_arrays_fail_clearly(tmp_path):
    path = tmp_path / "concat.views.npz"
    np.savez(path, spot_id=np.array(["a", "b"]))
    with pytest.raises(KeyError, match="concat and random"):
        spectral.load_views_npz(path)
