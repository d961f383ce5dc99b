"""UNI2-h image encoder: exact architecture (meta device), strict weight loading, save -> load -> embed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workflow_scripts.encoders import EncodeContext, get_encoder
from workflow_scripts.encoders import uni2h as U
from workflow_scripts.io import read_embedding
from workflow_scripts.data.patches import patch_reader
from workflow_scripts.encoders.weights import WeightsError

torch.set_num_threads(1)


def expected_uni2h_shapes(depth=24, dim=1536, reg=8, patch=14, img=224, mlp_ratio=2.66667 * 2):
    """State-dict keys and shapes of the UNI2-h checkpoint, written out from the model card (not from timm)."""
    hidden = int(dim * mlp_ratio)  # SwiGLUPacked: fc1 packs gate and value (hidden), fc2 reads hidden / 2
    n_patches = (img // patch) ** 2
    shapes = {
        "cls_token": (1, 1, dim),
        "reg_token": (1, reg, dim),
        "pos_embed": (1, n_patches, dim),  # no_embed_class: positions for patch tokens only
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
    }
    for b in range(depth):
        p = f"blocks.{b}."
        shapes.update({
            p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
            p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
            p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
            p + "ls1.gamma": (dim,),
            p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
            p + "mlp.fc1.weight": (hidden, dim), p + "mlp.fc1.bias": (hidden,),
            p + "mlp.fc2.weight": (dim, hidden // 2), p + "mlp.fc2.bias": (dim,),
            p + "ls2.gamma": (dim,),
        })
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return shapes


def test_exact_architecture_on_meta_device():
    model = U.build_uni2h(device="meta")
    assert sum(p.numel() for p in model.parameters()) == 681_394_176
    sd = model.state_dict()
    expected = expected_uni2h_shapes()
    assert len(sd) == len(expected) == 343
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert model.num_features == 1536 and model.global_pool == "token" and model.num_prefix_tokens == 9
    assert all(t.is_meta for t in sd.values())  # nothing allocated


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return U.build_uni2h(tiny=True).eval()


def test_output_is_cls_token_and_input_uses_imagenet_normalisation():
    model = _tiny_model()
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    seen = {}
    model.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].clone()))
    out = U.embed_batch(model, x, torch.device("cpu"), None)
    # normalisation: ToTensor + ImageNet mean/std, not timm's local default (0.5, 0.5)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen["x"], (x.float() / 255 - mean) / std)
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # the pitfall that the hard-coded constants avoid
    with torch.no_grad():
        cls = model.forward_features(seen["x"])[:, 0]
    torch.testing.assert_close(out, cls)
    assert out.shape == (2, 32)


def _patches(adata, um=200.0):
    reader = patch_reader(adata, um, 224)
    return torch.stack([torch.from_numpy(np.array(reader[i])).permute(2, 0, 1) for i in range(adata.n_obs)])


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_save_load_embed_round_trip(tiny_spots, tmp_path, fmt):
    model = _tiny_model(seed=3)
    path = tmp_path / f"uni2h.{fmt}"
    if fmt == "bin":
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    adata = tiny_spots[:10].copy()
    ctx = EncodeContext(device="cpu", batch_size=4, num_workers=0, patch_um=200.0)
    df = get_encoder("uni2h").fn(adata, {"weights": str(path), "tiny": True}, ctx)
    assert list(df.index) == list(adata.obs_names) and df.shape == (10, 32)
    expected = U.embed_batch(model, _patches(adata), torch.device("cpu"), None).numpy()
    np.testing.assert_allclose(df.to_numpy(), expected, rtol=1e-5, atol=1e-6)
    # a different random model gives different embeddings: the weights really came from the file
    other = U.embed_batch(_tiny_model(seed=4), _patches(adata[:2]), torch.device("cpu"), None).numpy()
    assert not np.allclose(df.to_numpy()[:2], other, atol=1e-4)


def test_embed_cli_and_parallel_workers_count_border_patches(tiny_spots, tmp_path):
    from workflow_scripts.encoders.embed import main as embed_main

    model = _tiny_model(seed=5)
    wpath = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), wpath)
    adata = tiny_spots[:8].copy()
    adata.obs["px_x"] = adata.obs["px_x"].astype(float)
    adata.obs.iloc[0, adata.obs.columns.get_loc("px_x")] = 5.0  # patch sticks out of the image (white-filled)
    spots = tmp_path / "spots.h5ad"
    adata.write_h5ad(spots)
    out = tmp_path / "emb.parquet"
    embed_main([
        "--encoder", "uni2h", "--dataset", str(spots), "--out", str(out), "--weights", str(wpath),
        "--params", '{"tiny": true}', "--device", "cpu", "--batch-size", "3", "--num-workers", "2",
        "--patch-um", "200", "--log", str(tmp_path / "embed.log"),
    ])
    df = read_embedding(out)
    expected = U.embed_batch(model, _patches(adata), torch.device("cpu"), None).numpy()
    np.testing.assert_allclose(df.loc[adata.obs_names].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    # the border flag travels back from the worker processes and is counted in the log
    assert "1 patches extend beyond their image" in (tmp_path / "embed.log").read_text()


def test_missing_or_mismatched_weights_fail_with_instructions(tiny_spots, tmp_path):
    ctx = EncodeContext(device="cpu", batch_size=4)
    for weights in (None, str(tmp_path / "absent.bin")):
        with pytest.raises(WeightsError) as e:
            get_encoder("uni2h").fn(tiny_spots[:2].copy(), {"weights": weights, "tiny": True}, ctx)
        assert "MahmoodLab/UNI2-h" in str(e.value) and "weights.uni2h.path" in str(e.value)
        assert "CC-BY-NC-ND" in str(e.value)
    sd = _tiny_model().state_dict()
    sd.pop("blocks.1.ls2.gamma")
    sd["head.weight"] = torch.zeros(3, 32)
    bad = tmp_path / "bad.bin"
    torch.save(sd, bad)
    with pytest.raises(WeightsError) as e:
        U.load_uni2h(bad, tiny=True)
    msg = str(e.value)
    assert "blocks.1.ls2.gamma" in msg and "head.weight" in msg and "MahmoodLab/UNI2-h" in msg
    # a tiny file does not load into the full architecture (strict shapes), checked on the meta device
    torch.save(_tiny_model().state_dict(), bad)
    with pytest.raises(WeightsError, match="308 missing keys"):
        U.check_uni2h_weights(bad)


def test_unknown_param_is_rejected(tiny_spots):
    with pytest.raises(ValueError, match="unknown parameter"):
        get_encoder("uni2h").fn(tiny_spots[:2].copy(), {"weigths": "x"}, EncodeContext(device="cpu"))


def test_architecture_overrides_are_checked_and_ordered():
    """Config `arch` overrides win over the tiny preset, which wins over the full model; unknown keys fail."""
    import pytest

    from workflow_scripts.encoders.nicheformer import nicheformer_arch
    from workflow_scripts.encoders.torch_utils import merge_arch

    full, tiny = {"depth": 24, "embed_dim": 1536}, {"depth": 2, "embed_dim": 32}
    assert merge_arch(full, tiny, None, False, "k") == full
    assert merge_arch(full, tiny, {"depth": 3}, True, "k") == {"depth": 3, "embed_dim": 32}
    with pytest.raises(ValueError, match=r"encoders.x.arch: unknown key\(s\) \['heads'\]"):
        merge_arch(full, tiny, {"heads": 4}, False, "encoders.x.arch")
    with pytest.raises(ValueError, match="encoders.nicheformer.arch"):
        nicheformer_arch({"not_a_key": 1})
