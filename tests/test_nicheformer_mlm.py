"""Nicheformer masked-language-model post-training (workflow_scripts/analysis/nicheformer_mlm.py)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workflow_scripts.analysis import nicheformer_mlm as mlm
from workflow_scripts.encoders.nicheformer import build_nicheformer, load_nicheformer

CONTEXT = torch.tensor([5, 15, 4])


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def token_batch(b=600, length=300, n_tokens=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(30, n_tokens, (b, length), generator=g)
    tok[:, :3] = CONTEXT
    lengths = torch.randint(min(20, length // 2), length, (b,), generator=g)
    tok[torch.arange(length)[None, :] >= lengths[:, None]] = 0  # raw padding
    return tok


def test_masking_rates_and_80_10_10_split():
    n_tokens = 2000
    tok = token_batch(n_tokens=n_tokens)
    inputs, targets, pad = mlm.mask_tokens(tok, n_tokens, generator=torch.Generator().manual_seed(1))
    eligible = (tok != 0)
    eligible[:, :3] = False
    sel = targets != -100
    rate = sel.sum().item() / eligible.sum().item()
    assert abs(rate - 0.15) < 0.005, rate
    n = sel.sum().item()
    masked = (inputs[sel] == mlm.MASK_TOKEN).sum().item() / n
    kept = (inputs[sel] == targets[sel]).sum().item() / n
    replaced = ((inputs[sel] != mlm.MASK_TOKEN) & (inputs[sel] != targets[sel])).sum().item() / n
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(replaced - 0.1) < 0.01
    assert (targets[sel] == tok[sel]).all()
    rand = inputs[sel][(inputs[sel] != mlm.MASK_TOKEN) & (inputs[sel] != targets[sel])]
    assert rand.min() >= 30 and rand.max() < n_tokens


def test_padding_and_context_never_masked():
    tok = token_batch(b=200)
    inputs, targets, pad = mlm.mask_tokens(tok, 2000, masking_p=0.9, generator=torch.Generator().manual_seed(2))
    assert (pad == (tok == 0)).all()
    assert (targets[pad] == -100).all() and (inputs[pad] == mlm.PAD_TOKEN).all()
    assert (targets[:, :3] == -100).all() and (inputs[:, :3] == CONTEXT).all()
    # with n_context=0 the first positions can be selected
    _, t0, _ = mlm.mask_tokens(tok, 2000, masking_p=0.9, n_context=0, generator=torch.Generator().manual_seed(2))
    assert (t0[:, :3] != -100).any()


def test_mlm_loss_by_hand_and_without_masked_tokens():
    logits = torch.randn(2, 4, 7)
    targets = torch.full((2, 4), -100)
    targets[0, 1], targets[1, 3] = 3, 5
    expect = -(F.log_softmax(logits[0, 1], -1)[3] + F.log_softmax(logits[1, 3], -1)[5]) / 2
    assert torch.isclose(mlm.mlm_loss(logits, targets), expect)
    z = mlm.mlm_loss(logits.requires_grad_(), torch.full((2, 4), -100))
    assert z.item() == 0.0 and z.requires_grad


def test_lr_schedule_warmup_then_cosine():
    assert mlm.lr_factor(0, 10, 100) == 0.0
    assert mlm.lr_factor(5, 10, 100) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert mlm.lr_factor(50, 10, 100) == pytest.approx(0.5)
    assert mlm.lr_factor(100, 10, 100) == pytest.approx(0.0)


def tiny_model(n_tokens=60, seed=0):
    torch.manual_seed(seed)
    return build_nicheformer(tiny=True, arch={"n_tokens": n_tokens, "context_length": 32})


def test_selected_logits_give_the_same_loss():
    m = mlm.NicheformerMLM(tiny_model()).eval()
    tok = token_batch(b=8, length=20, n_tokens=60)
    inputs, targets, pad = mlm.mask_tokens(tok, 60, generator=torch.Generator().manual_seed(0))
    sel = targets != -100
    with torch.no_grad():
        full = mlm.mlm_loss(m(inputs, pad), targets)
        part = mlm.mlm_loss(m(inputs, pad, sel), targets[sel])
    assert torch.isclose(full, part, atol=1e-6)


def toy_corpus(n=160, seed=0):
    """Cells whose genes follow a fixed order from a random start: masked genes are predictable from context."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start = int(rng.integers(30, 45))
        out.append(torch.tensor(np.concatenate([CONTEXT.numpy(), np.arange(start, start + 12)])))
    return out


def test_loss_falls_on_a_toy_corpus_and_is_deterministic():
    params = {"lr": 3e-3, "max_epochs": 6, "batch_size": 16, "masking_p": 0.3, "early_stopping_patience": 10}
    h1 = mlm.posttrain(mlm.NicheformerMLM(tiny_model()), toy_corpus(), params, seed=0, progress=False)
    assert h1["val_loss"].iloc[-1] < 0.75 * h1["val_loss"].iloc[0]
    assert h1["train_loss"].iloc[-1] < h1["train_loss"].iloc[1]
    assert h1["lr"].iloc[-1] < h1["lr"].iloc[1]  # cosine decay
    h2 = mlm.posttrain(mlm.NicheformerMLM(tiny_model()), toy_corpus(), params, seed=0, progress=False)
    np.testing.assert_allclose(h1["val_loss"], h2["val_loss"], rtol=1e-5)


def test_checkpoint_loads_in_the_encoder(tmp_path):
    model = tiny_model()
    mlm.posttrain(mlm.NicheformerMLM(model), toy_corpus(40), {"max_epochs": 1, "batch_size": 8}, progress=False)
    path = tmp_path / "post.ckpt"
    mlm.save_checkpoint(model, path, {"config": "cfg1", "fraction": 0.1})
    loaded, report = load_nicheformer(path, device="cpu")
    assert report["format"] == "lightning_ckpt" and not report["missing"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_bad_params_are_named():
    with pytest.raises(ValueError, match="unknown parameter"):
        mlm.check_params({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="masking_p"):
        mlm.check_params({"masking_p": 0})
    assert set(mlm.CONFIGS) == {"cfg1", "cfg2", "cfg3"}
    assert mlm.CONFIGS["cfg2"] == {"lr": 2e-5, "weight_decay": 5e-4, "batch_size": 32}
