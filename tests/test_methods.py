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
    METHOD_DEFAULTS,
    METHODS,
    MODELS,
    SPECTRAL_METHODS,
    apply_input_scaling,
    build_model,
    embed_with_state,
    fit_method,
)
from workflow_scripts.methods.barlow_twins import barlow_twins_loss
from workflow_scripts.methods.cca import fit_linear_cca
from workflow_scripts.methods.dcca import dcca_loss
from workflow_scripts.methods.comm import CrossAttentionBlock
from workflow_scripts.methods.training import (
    SmoothedEarlyStopping,
    make_optimizer,
    resolve_params,
    run_epoch,
    split_indices,
)

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
    img, gex = apply_input_scaling(res.state["input_scaling"], img, gex)  # what the model was trained on
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


@pytest.mark.parametrize("method", ["comm", "dcca", "simclr"])
def test_bf16_training_lowers_the_objective_and_stays_near_fp32(method, toy):
    """precision: bf16 computes the objective under bfloat16 autocast: it still trains, and its first-epoch losses
    agree with fp32 to bfloat16 rounding (the weights start equal and stay fp32)."""
    gex, img = toy
    fp32 = fit_method(method, gex, img, params(method), seed=0, device="cpu", progress=False)
    bf16 = fit_method(method, gex, img, {**params(method), "precision": "bf16"}, seed=0, device="cpu", progress=False)
    h, h32 = bf16.history, fp32.history
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0] and np.isfinite(bf16.z3).all()
    assert h["train_loss"].iloc[0] == pytest.approx(h32["train_loss"].iloc[0], rel=0.02, abs=0.02)
    assert bf16.z3.dtype == np.float32 and bf16.state["params"]["precision"] == "bf16"
    with pytest.raises(ValueError, match="precision"):
        fit_method(method, gex, img, {**params(method), "precision": "fp16"}, seed=0, device="cpu", progress=False)


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


@pytest.mark.parametrize("method", NEURAL)
def test_run_epoch_matches_the_per_batch_loop(method, toy):
    """One gathered copy per epoch, batches as slices, losses read once per epoch: the same losses and weights,
    bit for bit, as indexing every batch and reading every loss at once (the straightforward loop)."""
    gex, img = toy
    p = resolve_params(method, params(method), METHOD_DEFAULTS[method])
    torch.manual_seed(0)
    fast = build_model(method, D_IMG, D_GEX, p)
    slow = copy.deepcopy(fast)
    xi, xg = torch.as_tensor(img), torch.as_tensor(gex)
    for m in (fast, slow):
        m.prepare(xi, xg)
    opt_fast, opt_slow = make_optimizer(fast, p), make_optimizer(slow, p)
    rng, bs = np.random.default_rng(0), p["batch_size"]
    for epoch in range(2):
        order = rng.permutation(N)
        torch.manual_seed(epoch)
        got = run_epoch(fast, opt_fast, xi, xg, order, bs)
        torch.manual_seed(epoch)
        slow.train()
        want = []
        for s in range(0, N - bs + 1, bs):
            b = order[s : s + bs]
            loss = slow.loss(xi[b], xg[b])
            opt_slow.zero_grad(set_to_none=True)
            loss.backward()
            opt_slow.step()
            slow.after_step()
            want.append(float(loss.detach()))
        assert got == want and len(got) == N // bs
    for k, v in fast.state_dict().items():
        assert torch.equal(v, slow.state_dict()[k]), k
    assert len(run_epoch(fast, opt_fast, xi, xg, rng.permutation(N), bs, max_steps=3)) == 3


def test_comm_single_token_attention_equals_multihead_attention():
    """With one key token the attention weights are exactly 1: out_proj(W_v y) is MHA's value and gradient."""
    torch.manual_seed(0)
    blk = CrossAttentionBlock(64, 8)
    x, y = torch.randn(32, 1, 64), torch.randn(32, 1, 64)
    for training in (True, False):
        blk.train(training)
        grads = []
        for short in (True, False):
            blk.zero_grad()
            xn, yn = blk.ln_x(x), blk.ln_y(y)
            out = blk.attend(xn, yn) if short else blk.attn(xn, yn, yn, need_weights=False)[0]
            (out**2).sum().backward()
            grads.append((out.detach(), blk.attn.in_proj_weight.grad.clone(), blk.attn.out_proj.weight.grad.clone()))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert grads[1][1][:128].abs().max() == 0  # query/key projections get no gradient in MHA either
    # several key tokens or attention dropout: the full module
    blk.train()
    y3 = torch.randn(32, 3, 64)
    torch.testing.assert_close(blk.attend(x, y3), blk.attn(x, y3, y3, need_weights=False)[0])


def test_dim_critic_by_modality_equals_the_pairwise_critic():
    torch.manual_seed(0)
    model = build_model("dim", D_IMG, D_GEX, {"projection_dim": P, "hidden_dim": 32})
    zi, zg = torch.randn(40, P, requires_grad=True), torch.randn(40, P, requires_grad=True)
    fast, slow = model.scores(zi, zg), model.scores_pairwise(zi, zg)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    g_fast = torch.autograd.grad(fast.logsumexp(1).sum(), [zi, zg, model.critic[0].weight])
    g_slow = torch.autograd.grad(slow.logsumexp(1).sum(), [zi, zg, model.critic[0].weight])
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


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


def planted_cca(n: int, rho: np.ndarray, d_img: int = 10, d_gex: int = 8, seed: int = 0):
    """Views with canonical correlations ``rho`` (on the first len(rho) latent pairs, identity mixing) and
    unit-variance features."""
    rng = np.random.default_rng(seed)
    k = len(rho)
    u = rng.standard_normal((n, k))
    v = rho * u + np.sqrt(1 - rho**2) * rng.standard_normal((n, k))
    img = np.hstack([u, rng.standard_normal((n, d_img - k))])
    gex = np.hstack([v, rng.standard_normal((n, d_gex - k))])
    return img, gex


def test_cca_recovers_planted_correlations_when_feature_scales_differ():
    """Morphology-like inputs: IMG feature SDs from 0.001 to 500, the shared directions on the smallest ones."""
    rho = np.array([0.9, 0.7, 0.5])
    img, gex = planted_cca(6000, rho, seed=2)
    sds = np.logspace(-3, np.log10(500), img.shape[1])  # 0.001 ... 500, smallest first
    img = (img * sds + 10.0).astype(np.float32)
    res = fit_method("cca", gex.astype(np.float32), img, {"projection_dim": 256}, seed=0, progress=False)
    np.testing.assert_allclose(res.state["state_dict"]["corr"][:3].numpy(), rho, atol=0.04)
    z_img, z_gex = res.views
    val = np.setdiff1d(np.arange(6000), split_indices(6000, "cca", {"val_fraction": 0.15},
                                                      np.random.default_rng(0))[0])
    r_val = [np.corrcoef(z_img[val, i], z_gex[val, i])[0, 1] for i in range(3)]
    np.testing.assert_allclose(r_val, rho, atol=0.06)  # held-out spots too
    # the reference's absolute ridge of 1e-4 on the raw inputs swamps the features with variance 1e-6 ... 1e-4
    ref = fit_linear_cca(img, gex, 3, reg=1e-4, relative=False)
    assert ref.corr[0] < 0.5 and ref.corr[2] < 0.1, ref.corr
    # a ridge relative to the raw view's mean variance (dominated by the SD-500 feature) does no better:
    # standardising the features first is what recovers them
    assert fit_linear_cca(img, gex, 3, reg=1e-4).corr[2] < 0.1


def test_cca_relative_ridge_is_invariant_to_rescaling_a_view():
    img, gex = planted_cca(2000, np.array([0.8, 0.4]), seed=3)
    base = fit_linear_cca(img, gex, 2, reg=1e-2)
    for scale in (1e-3, 1e3):
        scaled = fit_linear_cca(img * scale, gex, 2, reg=1e-2)
        np.testing.assert_allclose(scaled.corr, base.corr, rtol=1e-8)
        # the reference's absolute ridge is not invariant (here visibly so: reg = 1e-2 on variances 1e-6 or 1e6)
        assert not np.allclose(fit_linear_cca(img * scale, gex, 2, reg=1e-2, relative=False).corr, base.corr,
                               rtol=1e-3)


@pytest.mark.parametrize("method", ["cca", "dim", "simclr"])
def test_standardisation_statistics_come_from_the_training_rows_only(method, toy):
    gex, img = toy
    p = params(method, max_epochs=2)
    a = fit_method(method, gex, img, p, seed=5, device="cpu", progress=False)
    train = split_indices(N, method, {"val_fraction": 0.15, "val_fraction_unsupervised": 0.1},
                          np.random.default_rng(5))[0]
    sc = a.state["input_scaling"]
    np.testing.assert_allclose(sc["mean_img"].numpy(), img[train].astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(sc["sd_gex"].numpy(), gex[train].astype(np.float64).std(0), rtol=1e-6)
    if method == "simclr":
        assert len(train) == N  # unsupervised methods train on every spot (validation overlaps)
        return
    # perturbing the held-out validation rows changes no statistic
    held = np.setdiff1d(np.arange(N), train)
    gex2, img2 = gex.copy(), img.copy()
    gex2[held] *= 50.0
    img2[held] += 1e3
    b = fit_method(method, gex2, img2, p, seed=5, device="cpu", progress=False)
    for k in sc:
        np.testing.assert_array_equal(sc[k].numpy(), b.state["input_scaling"][k].numpy())


def test_inputs_are_standardised_unless_switched_off(toy, caplog):
    gex, img = toy
    img = img * np.logspace(-3, 3, img.shape[1], dtype=np.float32)
    img[:, 2] = 7.0  # constant: centred only, counted in the log
    on = fit_method("cca", gex, img, {"projection_dim": P}, seed=0, progress=False)
    assert "1 of 16 features are constant" in caplog.text
    assert on.state["input_scaling"]["sd_img"][2] == 1.0
    off = fit_method("cca", gex, img, {"projection_dim": P, "standardize": False}, seed=0, progress=False)
    assert off.state["input_scaling"] is None and off.state["params"]["standardize"] is False
    assert not np.allclose(on.state["state_dict"]["corr"].numpy(), off.state["state_dict"]["corr"].numpy())
    cat = fit_method("concat", gex, img, {}, seed=0, progress=False)  # concat stays the raw concatenation
    np.testing.assert_array_equal(cat.z3, np.concatenate([img, gex], axis=1))
    with pytest.raises(ValueError, match="standardize"):
        fit_method("cca", gex, img, {"standardize": "yes"}, seed=0)


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


def test_min_delta_counts_only_relative_improvements():
    losses = [10.0, 9.0, 8.99, 8.98, 8.97, 8.96, 8.95]  # after epoch 2 each step gains 0.1 %
    plain = SmoothedEarlyStopping(smoothing=0.0, patience=3)
    strict = SmoothedEarlyStopping(smoothing=0.0, patience=3, min_delta=0.005)  # 0.5 % of the reference value
    ups = [(plain.update(v, e + 1), strict.update(v, e + 1)) for e, v in enumerate(losses)]
    assert not any(u[0].stop for u in ups)  # every strict decrease resets the patience
    # 8.99 ... 8.96 are within 0.5 % of 9.0 (three of them stop the run); 8.95 is 0.56 % below and resets
    assert [u[1].stop for u in ups] == [False, False, False, False, True, True, False]
    # the state to restore is still the lowest loss seen
    assert all(u[1].improved for u in ups) and strict.best == 8.95 and strict.best_epoch == 7
    neg = SmoothedEarlyStopping(smoothing=0.0, patience=2, min_delta=0.01)  # negative losses (CCA, DCCA)
    neg.update(-30.0, 1)
    assert neg.update(-30.2, 2).improved and neg.wait == 1 and neg.reference == -30.0  # 0.7 % < 1 %
    assert not neg.update(-30.5, 3).stop and neg.wait == 0 and neg.reference == -30.5  # 1.7 % > 1 %


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
