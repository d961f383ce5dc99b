"""Weights: download (Hugging Face client mocked; no network here), clear errors, the download rule, `check`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from workflow_scripts.encoders import weights as W

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace the Hugging Face download with a local fake that records its calls."""
    calls = []

    def fake(repo_id, filename, revision, token, local_dir):
        calls.append(dict(repo_id=repo_id, filename=filename, revision=revision, token=token))
        p = Path(local_dir) / filename
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"{repo_id}/{filename}".encode())
        return str(p)

    monkeypatch.setattr(W, "_hf_download", fake)
    return calls


def test_download_writes_configured_path_and_provenance(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    dest = tmp_path / "w" / "uni2h" / "pytorch_model.bin"
    assert W.download_weights("uni2h", dest) == dest
    assert dest.read_bytes() == b"MahmoodLab/UNI2-h/pytorch_model.bin"
    prov = json.loads(dest.with_name("pytorch_model.bin.provenance.json").read_text())
    assert prov["sha256"] == hashlib.sha256(dest.read_bytes()).hexdigest() and prov["repo_id"] == "MahmoodLab/UNI2-h"
    assert fake_hub[0]["token"] == "hf_test"
    assert not (dest.parent / ".download_uni2h").exists()
    # Nicheformer: not gated (no token needed), config.json fetched next to the weights, other local name
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(W, "hf_token", lambda: None)
    nf = tmp_path / "w" / "nicheformer" / "weights.safetensors"
    W.download_weights("nicheformer", nf)
    assert nf.read_bytes() == b"aletlvl/Nicheformer/model.safetensors"
    assert (nf.parent / "config.json").read_bytes() == b"aletlvl/Nicheformer/config.json"


def test_download_errors_say_what_to_do(tmp_path, fake_hub, monkeypatch):
    from huggingface_hub.errors import EntryNotFoundError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(W, "hf_token", lambda: None)
    with pytest.raises(W.WeightsError) as e:
        W.download_weights("uni2h", tmp_path / "pytorch_model.bin")
    assert "HF_TOKEN" in str(e.value) and "MahmoodLab/UNI2-h" in str(e.value) and "weights.uni2h.path" in str(e.value)
    assert fake_hub == []  # failed before any network call
    with pytest.raises(W.WeightsError, match="suffix"):
        W.download_weights("nicheformer", tmp_path / "nicheformer.ckpt")  # safetensors content, .ckpt name

    def missing(**kw):
        raise EntryNotFoundError("404 no such file")

    monkeypatch.setattr(W, "_hf_download", missing)
    with pytest.raises(W.WeightsError, match="weights.nicheformer.filename"):
        W.download_weights("nicheformer", tmp_path / "model.safetensors")

    def offline(**kw):
        raise OSError("network unreachable")

    monkeypatch.setattr(W, "_hf_download", offline)
    with pytest.raises(W.WeightsError, match="internet access") as e:
        W.download_weights("nicheformer", tmp_path / "model.safetensors")
    assert "Mendeley" in str(e.value)  # the manual route for the Lightning checkpoint
    assert not (tmp_path / "model.safetensors").exists()


def test_weights_config_overrides_published_source():
    cfg = {"weights": {"uni2h": {"path": "/data/u.bin"}, "nicheformer": {"filename": "x.safetensors", "revision": "v1"}}}
    assert W.weights_config(cfg, "uni2h") == {"path": "/data/u.bin", "repo_id": "MahmoodLab/UNI2-h",
                                              "filename": "pytorch_model.bin", "revision": ""}
    nf = W.weights_config(cfg, "nicheformer")
    assert nf["filename"] == "x.safetensors" and nf["revision"] == "v1"
    assert nf["path"] == "resources/weights/nicheformer/model.safetensors"
    with pytest.raises(KeyError, match="known"):
        W.weights_config(cfg, "virchow")


def test_check_cli_reports_keys(tmp_path, capsys):
    from workflow_scripts.encoders import nicheformer as N
    from workflow_scripts.encoders import uni2h as U

    arch = {"dim_model": 16, "nheads": 2, "dim_feedforward": 32, "nlayers": 2, "n_tokens": 40, "context_length": 12}
    sd = dict(N.build_nicheformer(arch=arch).state_dict())
    sd["extra_head.weight"] = torch.zeros(2)
    torch.save({"state_dict": sd, "hyper_parameters": arch}, tmp_path / "n.ckpt")
    W.main(["check", "--model", "nicheformer", "--path", str(tmp_path / "n.ckpt"), "--log", str(tmp_path / "c.log")])
    report = json.loads(capsys.readouterr().out)
    assert report["unexpected"] == ["extra_head.weight"] and report["missing"] == [] and report["arch"]["nlayers"] == 2
    tiny = {"depth": 2, "num_heads": 2, "embed_dim": 32}
    torch.save(U.build_uni2h(tiny).state_dict(), tmp_path / "u.bin")
    W.main(["check", "--model", "uni2h", "--path", str(tmp_path / "u.bin"), "--arch", json.dumps(tiny)])
    report = json.loads(capsys.readouterr().out)
    assert report["n_tensors"] == 5 + 2 * 14 + 2 and report["missing"] == []
    with pytest.raises(SystemExit):  # full architecture: strict mismatch -> error exit, message in the log
        W.main(["check", "--model", "uni2h", "--path", str(tmp_path / "u.bin"), "--log", str(tmp_path / "u.log")])
    assert "MahmoodLab/UNI2-h" in (tmp_path / "u.log").read_text()


SNAKEFILE = """
DATASETS = ["d1", "d2"]
MODALITIES = ["gex", "img"]
ENC = {"d1": {"gex": "pca", "img": "uni2h"}, "d2": {"gex": "nicheformer", "img": "morphology"}}


def encoder_of(d, m):
    return ENC[d][m]


include: "%s"


rule all:
    input:
        "x.txt",


rule x:
    output:
        "x.txt",
    shell:
        "touch {output}"
"""


def _smk(wd, *args, env=None):
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(wd / "Snakefile"), "--directory", str(wd), "--cores", "1"]
    return subprocess.run(cmd + list(args), cwd=wd, capture_output=True, text=True, timeout=300, env=env)


def test_download_rule(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "Snakefile").write_text(textwrap.dedent(SNAKEFILE % (REPO / "rules" / "weights.smk")))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(REPO))  # no saved token either
    # `all` never schedules a download; the workflow parses without HF_TOKEN
    r = _smk(wd, "-n", env=env)
    assert r.returncode == 0, r.stderr
    assert "download_weights" not in r.stdout + r.stderr
    # the aggregate target asks for exactly the encoders the datasets use, at the configured paths
    r = _smk(wd, "-n", "download_all_weights", env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "resources/weights/uni2h/pytorch_model.bin" in out and "resources/weights/nicheformer/model.safetensors" in out
    # running it without a token fails in the job with the fix in the rule's log, not at parse time
    r = _smk(wd, "resources/weights/uni2h/pytorch_model.bin", env=env)
    assert r.returncode != 0
    log = (wd / "logs/weights/download_uni2h_pytorch_model.bin.log").read_text()
    assert "HF_TOKEN" in log and "MahmoodLab/UNI2-h" in log
    assert not (wd / "resources/weights/uni2h/pytorch_model.bin").exists()
