"""Tests of the fusion methods (workflow_scripts.methods): objectives, training loop, CCA/DCCA maths, BYOL EMA,
CoMM views, early stopping. Toy problems with a planted shared signal; the whole file runs in well under a minute."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightly.loss import BarlowTwinsLoss

from workflow_scripts.methods import (
    METHODS,
    MODELS,
    SPECTRAL_METHODS,
    build_model,
    embed_with_state,
    fit_method,
)
from workflow_scripts.methods.barlow_twins import barlow_twins_loss
from workflow_scripts.methods.dcca import dcca_loss
from workflow_scripts.methods.training import SmoothedEarlyStopping

torch.set_num_threads(1)

N, D_GEX, D_IMG, P = 256, 12, 16, 16
NEURAL = tuple(MODELS)  # the 8 neural methods

# small but complete architectures so that the file stays fast
FAST = {
    "dcca": {"hidden_dims": [64, 64], "batch_size": 64},
    "comm": {"embed_dim": 16, "n_heads": 2, "batch_size": 64},
    "simsiam": {"hidden_dim": 32},
    "dim": {"hidden_dim": 32, "lr": 3e-3},
}


def params(method: str, **kw) -> dict:
    p = {"projection_dim": P, "max_epochs": 8, "lr": 1e-3, "batch_size": 32}
    p.update(FAST.get(method, {}))
    p.update(kw)
    return p


@pytest.fixture(scope="module")
def toy():
    """Planted shared signal: latent s (N, 4) mapped linearly into both modalities plus noise."""
    rng = np.random.default_rng(0)
    s = rng.standard_normal((N, 4))
    gex = s @ rng.standard_normal((4, D_GEX)) + 0.5 * rng.standard_normal((N, D_GEX))
    img = s @ rng.standard_normal((4, D_IMG)) + 0.5 * rng.standard_normal((N, D_IMG))
    return gex.astype(np.float32), img.astype(np.float32)


def full_batch_loss(model, img, gex, seed=123) -> float:
    """The model's objective on all spots as one batch (train-mode normalisation, fixed RNG for CoMM views)."""
    model.train()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return float(model.loss(torch.as_tensor(img), torch.as_tensor(gex)))


@pytest.mark.parametrize("method", NEURAL)
def test_training_lowers_the_objective(method, toy):
    gex, img = toy
    p = params(method)
    res = fit_method(method, gex, img, p, seed=0, device="cpu", progress=False)
    torch.manual_seed(0)  # fit_method builds the model right after seeding: same initial weights
    init = build_model(method, D_IMG, D_GEX, p)
    trained = copy.deepcopy(init)
    trained.load_state_dict(res.state["state_dict"])
    before, after = full_batch_loss(init, img, gex), full_batch_loss(trained, img, gex)
    assert after < before - 0.05 * abs(before), (method, before, after)
    h = res.history
    assert list(h.columns) == ["epoch", "train_loss", "val_loss", "val_loss_smooth", "lr"]
    assert len(h) == res.state["n_epochs"] == 8 and h["epoch"].tolist() == list(range(1, 9))
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]
    # cosine schedule over max_epochs, stepped per epoch
    assert h["lr"].iloc[0] == pytest.approx(p["lr"])
    assert h["lr"].iloc[4] == pytest.approx(p["lr"] * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    # the restored state is the best smoothed-validation epoch
    assert res.state["best_epoch"] == int(h["val_loss_smooth"].idxmin()) + 1
    assert res.state["best_val_loss_smooth"] == pytest.approx(h["val_loss_smooth"].min())


def expected_z3_dim(method: str) -> int:
    k = min(P, D_IMG, D_GEX)
    return {"cca": 2 * k, "dcca": 2 * k, "comm": FAST["comm"]["embed_dim"], "concat": D_IMG + D_GEX,
            "random": D_IMG + D_GEX}.get(method, 2 * P)


@pytest.mark.parametrize("method", METHODS + ("random",))
def test_z3_shape_finite_and_deterministic(method, toy):
    gex, img = toy
    p = params(method, max_epochs=2)
    a = fit_method(method, gex, img, p, seed=3, device="cpu", progress=False)
    b = fit_method(method, gex, img, p, seed=3, device="cpu", progress=False)
    assert a.z3.shape == (N, expected_z3_dim(method)) and a.z3.dtype == np.float32
    assert np.isfinite(a.z3).all()
    np.testing.assert_array_equal(a.z3, b.z3)
    assert a.state["d_z3"] == a.z3.shape[1]
    if method in ("concat", "random"):
        assert a.views is None
    else:
        assert a.views[0].shape == a.views[1].shape == (N, a.state["view_dim"])
    if method != "concat":
        c = fit_method(method, gex, img, p, seed=4, device="cpu", progress=False)
        assert not np.array_equal(a.z3, c.z3)
    if method == "concat":
        np.testing.assert_array_equal(a.z3, np.concatenate([img, gex], axis=1))
    if method not in ("random",):
        z3, _ = embed_with_state(a.state, gex, img, device="cpu")
        np.testing.assert_allclose(z3, a.z3, rtol=1e-5, atol=1e-5)


def test_spectral_methods_listed():
    assert set(SPECTRAL_METHODS) <= set(METHODS) and len(METHODS) == 10


def test_cca_recovers_planted_canonical_correlations():
    rng = np.random.default_rng(1)
    n, rho = 5000, np.array([0.9, 0.6, 0.3])
    u = rng.standard_normal((n, 3))
    v = rho * u + np.sqrt(1 - rho**2) * rng.standard_normal((n, 3))
    lat_img = np.hstack([u, rng.standard_normal((n, 7))])  # 10-D, 3 shared directions
    lat_gex = np.hstack([v, rng.standard_normal((n, 5))])  # 8-D
    img = lat_img @ rng.standard_normal((10, 10)) + 3.0  # CCA is invariant to invertible affine maps
    gex = lat_gex @ rng.standard_normal((8, 8)) - 1.0
    res = fit_method("cca", gex, img, {"projection_dim": 256}, seed=0, progress=False)
    k = 8
    assert res.z3.shape == (n, 2 * k)
    z_img, z_gex = res.views
    r = np.array([np.corrcoef(z_img[:, i], z_gex[:, i])[0, 1] for i in range(k)])
    np.testing.assert_allclose(r[:3], rho, atol=0.05)
    assert np.all(np.abs(r[3:]) < 0.1)
    np.testing.assert_allclose(res.state["state_dict"]["corr"][:3].numpy(), rho, atol=0.05)
    # canonical variates are whitened within each view
    np.testing.assert_allclose(np.cov(z_img[:, :3].T), np.eye(3), atol=0.1)
    assert res.history["val_loss"].iloc[0] == pytest.approx(-r.sum(), abs=0.1)


def _whitened_pair(m: int, rho: np.ndarray, seed: int = 0):
    """H1, H2 (m, k) with sample covariances exactly I and cross-covariance exactly diag(rho)."""
    rng = np.random.default_rng(seed)
    k = len(rho)
    q, _ = np.linalg.qr(np.hstack([np.ones((m, 1)), rng.standard_normal((m, 2 * k))]))
    q = q[:, 1:] * np.sqrt(m - 1)  # centred, orthogonal columns with sample variance 1
    h1 = q[:, :k]
    h2 = rho * q[:, :k] + np.sqrt(1 - rho**2) * q[:, k:]
    return torch.tensor(h1), torch.tensor(h2)


def test_dcca_loss_closed_form():
    rho, r = np.array([0.9, 0.6, 0.3]), 1e-3
    h1, h2 = _whitened_pair(200, rho)
    loss = float(dcca_loss(h1, h2, k=3, reg=r))
    # Σ11 = Σ22 = (1 + r) I, Σ12 = diag(ρ) → T = diag(ρ)/(1 + r); eig(TᵀT + rI) = ρ²/(1 + r)² + r
    assert loss == pytest.approx(-np.sqrt(rho**2 / (1 + r) ** 2 + r).sum(), rel=1e-9)
    assert loss == pytest.approx(-rho.sum(), abs=0.01)
    assert float(dcca_loss(h1, h2, k=1, reg=r)) == pytest.approx(-np.sqrt(0.81 / (1 + r) ** 2 + r), rel=1e-9)


def test_dcca_loss_matches_eigh_formulation_and_has_finite_gradients():
    torch.manual_seed(0)
    m, o, r = 32, 50, 1e-3  # batch smaller than output dim: Σ11 has repeated eigenvalues
    h1 = torch.randn(m, o, dtype=torch.float64, requires_grad=True)
    h2 = (0.5 * h1.detach() + torch.randn(m, o, dtype=torch.float64)).requires_grad_(True)

    def inv_sqrt(s):
        w, v = torch.linalg.eigh(s)
        return v @ torch.diag(w**-0.5) @ v.T

    c1, c2 = h1 - h1.mean(0), h2 - h2.mean(0)
    eye = torch.eye(o, dtype=torch.float64)
    t = inv_sqrt(c1.T @ c1 / (m - 1) + r * eye) @ (c1.T @ c2 / (m - 1)) @ inv_sqrt(c2.T @ c2 / (m - 1) + r * eye)
    ref = -torch.linalg.eigvalsh(t.T @ t + r * eye).clamp(min=1e-12).topk(o).values.sqrt().sum()
    loss = dcca_loss(h1, h2, k=o, reg=r)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-8)
    loss.backward()
    assert torch.isfinite(h1.grad).all() and torch.isfinite(h2.grad).all()


def test_byol_targets_follow_ema_not_gradients(toy):
    gex, img = toy
    torch.manual_seed(0)
    model = build_model("byol", D_IMG, D_GEX, params("byol", ema_decay=0.9))
    xi, xg = torch.as_tensor(img[:32]), torch.as_tensor(gex[:32])
    target_params = list(model.target_img.parameters()) + list(model.target_gex.parameters())
    assert all(not q.requires_grad for q in target_params)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    old_t = [q.detach().clone() for q in target_params]
    loss = model.loss(xi, xg)
    opt.zero_grad()
    loss.backward()
    assert all(q.grad is None for q in target_params)
    opt.step()
    model.after_step()
    online = list(model.online_img.parameters()) + list(model.online_gex.parameters())
    for t_new, t_old, o in zip(target_params, old_t, online):
        assert not torch.equal(t_new, t_old)
        torch.testing.assert_close(t_new, 0.9 * t_old + 0.1 * o.detach())


def test_comm_views_augmented_or_identical(toy):
    gex, img = toy
    xi, xg = torch.as_tensor(img), torch.as_tensor(gex)

    def views(**kw):
        torch.manual_seed(0)
        model = build_model("comm", D_IMG, D_GEX, params("comm", **kw))
        model.prepare(xi, xg)
        return model, model.two_views(xi, xg)

    model, ((i1, g1), (i2, g2)) = views(augment=True)
    assert not torch.equal(i1, i2) and not torch.equal(g1, g2) and not torch.equal(i1, xi)
    # masking alone: each feature replaced by its training mean with probability mask_prob
    model, ((i1, _), _) = views(augment=True, mask_prob=0.3, noise_std=0.0)
    masked = torch.isclose(i1, model.mean_img.expand_as(i1)) & ~torch.isclose(xi, model.mean_img.expand_as(xi))
    assert abs(float(masked.float().mean()) - 0.3) < 0.03
    assert torch.equal(i1[~masked], xi[~masked])
    # noise alone: Gaussian with SD noise_std × the feature's SD
    model, ((i1, _), _) = views(augment=True, mask_prob=0.0, noise_std=0.1)
    resid = (i1 - xi) / model.std_img
    assert abs(float(resid.std()) - 0.1) < 0.01 and abs(float(resid.mean())) < 0.01
    # augment: false reproduces the reference (both views are the inputs)
    model, ((i1, g1), (i2, g2)) = views(augment=False)
    assert torch.equal(i1, xi) and torch.equal(i2, xi) and torch.equal(g1, xg) and torch.equal(g2, xg)
    # Z3 never sees augmentation: L2-normalised, identical on repeated calls
    model, _ = views(augment=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.embed(xi, xg), model.embed(xi, xg))
        torch.testing.assert_close(model.embed(xi, xg).norm(dim=1), torch.ones(N))


def test_comm_infonce_is_the_reference_2b_ntxent():
    """lightly's NTXentLoss equals CoMM's InfoNCE over [[a bᵀ, a aᵀ−∞I], [b bᵀ−∞I, b aᵀ]]/τ (docs/reference.md#fusion-methods)."""
    torch.manual_seed(1)
    model = build_model("comm", 5, 4, params("comm"))
    a, b = F.normalize(torch.randn(10, 16), dim=1), F.normalize(torch.randn(10, 16), dim=1)
    tau, big = 0.07, 1e8
    eye = torch.eye(10)
    sim = torch.cat([torch.cat([a @ b.T, a @ a.T - big * eye], 1), torch.cat([b @ b.T - big * eye, b @ a.T], 1)], 0)
    ref = -torch.diag(torch.log_softmax(sim / tau, dim=1)).mean()
    torch.testing.assert_close(model.loss_fn(a, b), ref)


def test_vicreg_loss_matches_spec():
    torch.manual_seed(2)
    model = build_model("vicreg", 5, 4, params("vicreg"))
    x, y = torch.randn(20, 8) * 0.7, torch.randn(20, 8) * 1.3 + 0.2
    var = lambda z: F.relu(1 - torch.sqrt(z.var(0) + 1e-4)).mean()  # noqa: E731

    def cov(z):
        z = z - z.mean(0)
        c = z.T @ z / (z.shape[0] - 1)
        return (c.pow(2).sum() - torch.diagonal(c).pow(2).sum()) / z.shape[1]

    ref = 25 * F.mse_loss(x, y) + 25 * (var(x) / 2 + var(y) / 2) + 1 * (cov(x) + cov(y))
    torch.testing.assert_close(model.criterion(x, y), ref)


def test_barlow_twins_train_mode_equals_lightly(toy):
    gex, img = toy
    torch.manual_seed(0)
    model = build_model("barlow_twins", D_IMG, D_GEX, params("barlow_twins")).train()
    xi, xg = torch.as_tensor(img[:64]), torch.as_tensor(gex[:64])
    with torch.no_grad():
        z_img, z_gex = model.views(xi, xg)
        ours = model.loss(xi, xg)
    torch.testing.assert_close(ours, BarlowTwinsLoss(lambda_param=0.0051)(z_img, z_gex), rtol=1e-4, atol=1e-4)
    # hand check of the loss on an explicit cross-correlation matrix
    za, zb = torch.eye(3), torch.tensor([[1.0, 2, 0], [0, 1, 0], [0, 0, 3]])
    c = za.T @ zb / 3
    expect = ((torch.diagonal(c) - 1) ** 2).sum() + 0.5 * (2 / 3) ** 2
    torch.testing.assert_close(barlow_twins_loss(za, zb, 0.5), expect)


def test_dim_direction_option(toy):
    gex, img = toy
    torch.manual_seed(0)
    one = build_model("dim", D_IMG, D_GEX, params("dim"))
    both = build_model("dim", D_IMG, D_GEX, params("dim", symmetric=True))
    both.load_state_dict(one.state_dict())
    xi, xg = torch.as_tensor(img[:32]), torch.as_tensor(gex[:32])
    with torch.no_grad():
        logits = one.scores(*one.views(xi, xg))
        t = torch.arange(32)
        torch.testing.assert_close(one.loss(xi, xg), F.cross_entropy(logits, t))
        torch.testing.assert_close(both.loss(xi, xg), 0.5 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t)))


def test_smoothed_early_stopping_monitor():
    mon = SmoothedEarlyStopping(smoothing=0.5, patience=2)
    u1 = mon.update(1.0, 1)
    assert u1.smooth == 1.0 and u1.improved and not u1.stop
    u2 = mon.update(float("nan"), 2)  # skipped: smooth unchanged, counts as no improvement
    assert u2.smooth == 1.0 and not u2.improved and not u2.stop
    u3 = mon.update(0.5, 3)
    assert u3.smooth == pytest.approx(0.75) and u3.improved and mon.best_epoch == 3
    u4 = mon.update(2e6, 4)  # > 1e6: skipped
    assert u4.smooth == pytest.approx(0.75) and not u4.improved
    u5 = mon.update(1.75, 5)  # smooth rises to 1.25
    assert u5.smooth == pytest.approx(1.25) and u5.stop and mon.n_skipped == 2


def test_early_stopping_triggers_on_plateau(toy):
    gex, img = toy
    # lr = 0: weights never change, the validation loss is constant, the smoothed loss never strictly improves
    p = params("simclr", lr=0.0, weight_decay=0.0, max_epochs=30, early_stopping_patience=3)
    res = fit_method("simclr", gex, img, p, seed=0, device="cpu", progress=False)
    assert res.state["stopped_early"] and res.state["n_epochs"] == 4 and res.state["best_epoch"] == 1
    assert res.history["val_loss"].nunique() == 1


def test_validation_splits(toy):
    gex, img = toy
    sup = fit_method("dim", gex, img, params("dim", max_epochs=1), seed=0, device="cpu", progress=False)
    uns = fit_method("simclr", gex, img, params("simclr", max_epochs=1), seed=0, device="cpu", progress=False)
    assert (sup.state["n_train"], sup.state["n_val"]) == (N - round(0.15 * N), round(0.15 * N))
    assert (uns.state["n_train"], uns.state["n_val"]) == (N, round(0.1 * N))


def test_small_data_uses_one_full_batch(toy):
    gex, img = toy
    res = fit_method("vicreg", gex[:20], img[:20], params("vicreg", batch_size=256, max_epochs=2), seed=0,
                     device="cpu", progress=False)
    assert res.z3.shape == (20, 2 * P) and np.isfinite(res.history["train_loss"]).all()


def test_bad_inputs_raise(toy):
    gex, img = toy
    with pytest.raises(ValueError, match="unknown training parameter.*temprature"):
        fit_method("simclr", gex, img, {"temprature": 0.1}, seed=0)
    with pytest.raises(ValueError, match="unknown method"):
        fit_method("clip", gex, img, {}, seed=0)
    bad = gex.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="drop_invalid_rows"):
        fit_method("concat", bad, img, {}, seed=0)
    with pytest.raises(ValueError, match="intersect"):
        fit_method("concat", gex[:-1], img, {}, seed=0)
    with pytest.raises(ValueError, match="divisible"):
        build_model("comm", 4, 4, {"embed_dim": 10, "n_heads": 3})


def test_rule_wildcards_list_exactly_the_registered_methods(repo):
    """rules/common.smk keeps its own copy of the method names (to parse without torch); it must match."""
    import re

    from workflow_scripts.methods import METHODS

    text = (repo / "rules/common.smk").read_text()
    listed = re.search(r"ALL_METHODS = \[([^\]]*)\]", text).group(1)
    assert [m.strip().strip('"') for m in listed.split(",")] == list(METHODS)
