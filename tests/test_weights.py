"""Weights: download (Hugging Face client mocked; no network here), clear errors, the download rule, `check`."""

from __future__ import annotations

import hashlib
import json
import os
import re
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


SECRET = "hf_SecretTokenNeverLogged123"


def _hub_http_error(status, code=None, message=None, url="https://huggingface.co/x/y/resolve/main/f.bin"):
    """The exception huggingface_hub itself raises for this HTTP answer (its own hf_raise_for_status)."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    headers = {k: v for k, v in (("X-Error-Code", code), ("X-Error-Message", message)) if v}
    try:
        hf_raise_for_status(httpx2.Response(status, headers=headers, request=httpx2.Request("GET", url)))
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError("no error raised")


def _offline(cause):
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache") from cause
    except LocalEntryNotFoundError as e:
        return e


def _cases():
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    return {
        "offline": (lambda: _offline(httpx2.ConnectError("Name or service not known")),
                    "cannot reach huggingface.co"),
        "offline_mode": (lambda: _offline(OfflineModeIsEnabled("offline mode is enabled")), "HF_HUB_OFFLINE is set"),
        "gated": (lambda: _hub_http_error(403, "GatedRepo", "Access restricted"), "gated repository.*accept its terms"),
        "unauthorised": (lambda: _hub_http_error(401, message="Invalid credentials in Authorization header"),
                         "HTTP 401.*token is invalid"),
        "repository": (lambda: _hub_http_error(404, "RepoNotFound"), "not found or not visible.*weights.uni2h.repo_id"),
        "revision": (lambda: _hub_http_error(404, "RevisionNotFound"), "no revision 'main'"),
        "missing_file": (lambda: _hub_http_error(404, "EntryNotFound"), "has no file 'pytorch_model.bin'"),
    }


@pytest.mark.parametrize("case", ["offline", "offline_mode", "gated", "unauthorised", "repository", "revision",
                                  "missing_file"])
def test_download_failures_name_the_cause_and_clean_up(tmp_path, monkeypatch, case):
    make, expected = _cases()[case]
    monkeypatch.setenv("HF_TOKEN", SECRET)

    def failing(repo_id, filename, revision, token, local_dir):
        assert token == SECRET
        part = Path(local_dir) / ".cache" / "huggingface" / "download" / f"{filename}.incomplete"
        part.parent.mkdir(parents=True)
        part.write_bytes(b"half a file")  # what huggingface_hub leaves when a transfer stops
        raise make()

    monkeypatch.setattr(W, "_hf_download", failing)
    dest = tmp_path / "w" / "uni2h" / "pytorch_model.bin"
    with pytest.raises(W.WeightsError) as e:
        W.download_weights("uni2h", dest)
    msg = str(e.value)
    assert re.search(expected, msg), msg
    assert SECRET not in msg
    assert sorted(p.name for p in dest.parent.iterdir()) == []  # no .download_uni2h/, no .part, no file


def test_missing_token_and_suffix_fail_before_any_network_call(tmp_path, fake_hub, monkeypatch):
    from huggingface_hub.errors import GatedRepoError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(W, "hf_token", lambda: None)
    with pytest.raises(W.WeightsError) as e:
        W.download_weights("uni2h", tmp_path / "pytorch_model.bin")
    assert "HF_TOKEN" in str(e.value) and "MahmoodLab/UNI2-h" in str(e.value) and "weights.uni2h.path" in str(e.value)
    with pytest.raises(W.WeightsError, match="suffix"):
        W.download_weights("nicheformer", tmp_path / "nicheformer.ckpt")  # safetensors content, .ckpt name
    assert fake_hub == []
    # an ungated repository answering 401 without a token: the fix is a token
    err = _hub_http_error(401, url="https://huggingface.co/api/models/aletlvl/Nicheformer")
    assert W.hub_error(err, "nicheformer", "aletlvl/Nicheformer", "model.safetensors", None, None).args[0].count(
        "No token is set") == 1
    assert isinstance(_hub_http_error(403, "GatedRepo"), GatedRepoError)


def test_token_is_scrubbed_from_messages(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", SECRET)

    def leaky(**kw):  # a hostile exception text that carries the token
        raise _offline(ConnectionError(f"proxy said: Authorization: Bearer {kw['token']}"))

    monkeypatch.setattr(W, "_hf_download", leaky)
    log = tmp_path / "w.log"
    with pytest.raises(SystemExit):
        W.main(["download", "--model", "nicheformer", "--dest", str(tmp_path / "model.safetensors"), "--log", str(log)])
    text = log.read_text()
    assert "cannot reach huggingface.co" in text and SECRET not in text


def test_optional_companion_file_missing_is_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(W, "hf_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)

    def no_config(repo_id, filename, revision, token, local_dir):
        if filename == "config.json":
            raise _hub_http_error(404, "EntryNotFound")
        p = Path(local_dir) / filename
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"weights")
        return str(p)

    monkeypatch.setattr(W, "_hf_download", no_config)
    dest = tmp_path / "nicheformer" / "model.safetensors"
    W.download_weights("nicheformer", dest)
    assert dest.read_bytes() == b"weights" and not (dest.parent / "config.json").exists()
    assert "optional file config.json not fetched" in caplog.text and "has no file 'config.json'" in caplog.text
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.safetensors", "model.safetensors.provenance.json"]


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
    # with a token and no network: the printed command, the log and the console name the cause, never the token
    env.update(HF_TOKEN=SECRET, HF_HUB_OFFLINE="1")
    r = _smk(wd, "-p", "resources/weights/nicheformer/model.safetensors", env=env)
    assert r.returncode != 0
    log = (wd / "logs/weights/download_nicheformer_model.safetensors.log").read_text()
    assert "HF_HUB_OFFLINE is set" in log
    assert "python -m workflow_scripts.encoders.weights download" in r.stdout + r.stderr  # the printed command
    leaks = [p for p in wd.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert SECRET not in r.stdout + r.stderr and leaks == []
    assert list(wd.rglob(".download_*")) == [] and not (wd / "resources/weights/nicheformer/model.safetensors").exists()
