"""Pretrained weights of the foundation-model encoders: where they live, how to fetch them, how to check them.

The workflow never downloads weights on its own: the encoders read them from the path in config
(``weights.<model>.path``, passed to the encoder as ``params["weights"]``) and fail with a message that says
where to get them. Fetching is a separate, explicit step (rule ``download_weights`` in
``rules/weights.smk``, or this module's CLI), run on a machine with internet access:

* **UNI2-h** — Hugging Face ``MahmoodLab/UNI2-h``, file ``pytorch_model.bin`` (~2.7 GB, 681,394,176 fp32
  parameters). Gated: log in, accept the CC-BY-NC-ND-4.0 terms on the model page, create a read token and
  export it as ``HF_TOKEN`` (docs/weights.md).
* **Nicheformer** — Hugging Face ``aletlvl/Nicheformer`` (safetensors release, ``model.safetensors`` plus
  ``config.json``; not known to be gated, so no token is required, but one is used when set; the file name
  is the ``save_pretrained`` default and was not verified offline — override ``weights.nicheformer.filename``), or the original Lightning checkpoint
  ``nicheformer.ckpt`` (~546 MB) from Mendeley Data (link in the README of github.com/theislab/nicheformer;
  docs/weights.md notes that users reported the link inaccessible in January 2025). Both formats load.

CLI::

    HF_TOKEN=hf_... python -m workflow_scripts.encoders.weights download --model uni2h \
        --dest resources/weights/uni2h/pytorch_model.bin --log logs/weights/uni2h.log
    python -m workflow_scripts.encoders.weights check --model nicheformer \
        --path resources/weights/nicheformer/model.safetensors --log check.log

``download`` writes the file atomically and, next to it, ``<file>.provenance.json`` (repo id, file name,
revision, sha256, size, UTC time) — no checksums are published upstream, so the first download's hash is the
record. A failed download names its cause with the fix — offline (no connection, or ``HF_HUB_OFFLINE`` set),
unauthorised (no or invalid token, terms not accepted), repository / revision / file not found — and leaves no
partial folder behind. The token is never written to a log or a message. ``check`` loads the file into the exact
architecture (UNI2-h: built on the meta device, no 2.7 GB random initialisation) and prints missing / unexpected /
mismatched keys.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ..io import setup_logging

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightSource:
    """Where a model's weights are published and how they are licensed."""

    model: str
    repo_id: str
    filename: str
    default_path: str
    gated: bool
    licence: str
    page: str
    extra_files: tuple[str, ...] = field(default_factory=tuple)
    manual: str = ""


WEIGHT_SOURCES: dict[str, WeightSource] = {
    "uni2h": WeightSource(
        model="uni2h",
        repo_id="MahmoodLab/UNI2-h",
        filename="pytorch_model.bin",
        default_path="resources/weights/uni2h/pytorch_model.bin",
        gated=True,
        licence="CC-BY-NC-ND-4.0 (gated: accept the terms on the model page first)",
        page="https://huggingface.co/MahmoodLab/UNI2-h",
        manual="download pytorch_model.bin from the model page after accepting its terms",
    ),
    "nicheformer": WeightSource(
        model="nicheformer",
        repo_id="aletlvl/Nicheformer",
        filename="model.safetensors",
        default_path="resources/weights/nicheformer/model.safetensors",
        gated=False,
        licence="see the model card (code: BSD-3-Clause, github.com/theislab/nicheformer)",
        page="https://huggingface.co/aletlvl/Nicheformer",
        extra_files=("config.json",),
        manual=(
            "either the safetensors release on the model page (model.safetensors + config.json), or the "
            "Lightning checkpoint nicheformer.ckpt from Mendeley Data "
            "(https://data.mendeley.com/preview/87gm9hrgm8?a=d95a6dde-e054-4245-a7eb-0522d6ea7dff, linked from "
            "the README of https://github.com/theislab/nicheformer)"
        ),
    ),
}


class WeightsError(RuntimeError):
    """Weights are missing, unreadable or do not match the architecture; the message says how to fix it."""


def source(model: str) -> WeightSource:
    """The :class:`WeightSource` of ``model``; raises KeyError listing the known models."""
    if model not in WEIGHT_SOURCES:
        raise KeyError(f"no weight source for model {model!r}; known: {sorted(WEIGHT_SOURCES)}")
    return WEIGHT_SOURCES[model]


def how_to_get(model: str) -> str:
    """One paragraph: where ``model``'s weights are published, their licence, and the config key to set."""
    s = source(model)
    token = (
        " It is gated: log in on Hugging Face, accept the terms, create a read token and export it as HF_TOKEN."
        if s.gated
        else ""
    )
    return (
        f"Get the {model} weights from Hugging Face {s.repo_id} ({s.page}; licence {s.licence}).{token} "
        f"Fetch them with `HF_TOKEN=... snakemake --cores 1 {s.default_path}` (rule download_weights) or "
        f"`python -m workflow_scripts.encoders.weights download --model {model} --dest {s.default_path}`, or manually: "
        f"{s.manual}. Then set the config key weights.{model}.path (passed to the encoder as "
        f"encoders.{model}.weights / --weights PATH)."
    )


def weights_config(config: dict, model: str) -> dict:
    """``weights.<model>`` of a workflow config over the published source: path, repo_id, filename, revision."""
    s = source(model)
    c = (config.get("weights") or {}).get(model) or {}
    return {
        "path": c.get("path", s.default_path),
        "repo_id": c.get("repo_id", s.repo_id),
        "filename": c.get("filename", s.filename),
        "revision": c.get("revision") or "",
    }


def missing_weights_error(model: str, path) -> WeightsError:
    """The error raised when ``model``'s weights are not configured or not found at ``path``."""
    if path in (None, ""):
        head = f"{model}: no weights configured (weights.{model}.path is empty)."
    else:
        head = f"{model}: weights file not found at {path}."
    return WeightsError(f"{head} {how_to_get(model)}")


def hf_token() -> str | None:
    """The Hugging Face token: ``$HF_TOKEN``, else the one saved by ``hf auth login`` (None if neither)."""
    tok = os.environ.get("HF_TOKEN")
    if tok:
        return tok
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no saved token is not an error here
        return None


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _hf_download(**kw) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(**kw)


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Exception classes that mean "huggingface.co could not be reached" (socket, httpx, requests)."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    for mod, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                       ("requests", ("ConnectionError", "Timeout"))):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        types += [getattr(m, n) for n in names if hasattr(m, n)]
    return tuple(types)


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def scrub(text: str, token: str | None) -> str:
    """``text`` with the token replaced by ``hf_***`` (messages and logs never carry it)."""
    return text.replace(token, "hf_***") if token else text


def hub_error(e: BaseException, model: str, repo_id: str, filename: str, revision: str | None,
              token: str | None) -> WeightsError:
    """A :class:`WeightsError` naming why a Hugging Face download failed and the fix, from the exception class.

    Classes (``huggingface_hub.errors``): ``OfflineModeIsEnabled`` (HF_HUB_OFFLINE set) and
    ``LocalEntryNotFoundError`` or a socket/httpx/requests connection error (offline); ``GatedRepoError`` (terms
    not accepted); ``RepositoryNotFoundError`` (HTTP 401/404: no token for a gated or private repository, or a
    wrong id); ``RevisionNotFoundError``; ``RemoteEntryNotFoundError`` / ``EntryNotFoundError`` (no such file);
    ``HfHubHTTPError`` with status 401/403 (invalid token or missing permission). The token never appears.
    """
    from huggingface_hub import errors as hf

    s = source(model)
    rev = revision or "main"
    place = f"or place the file by hand at the configured path (weights.{model}.path)"
    chain = _chain(e)
    detail = scrub(f"{e.__class__.__name__}: {e}", token).splitlines()[0][:300]
    if any(isinstance(x, hf.OfflineModeIsEnabled) for x in chain):
        msg = (f"{model}: offline mode is on (HF_HUB_OFFLINE is set), so {repo_id}/{filename} cannot be downloaded. "
               f"Unset HF_HUB_OFFLINE on a machine with internet access and rerun, {place}.")
    elif isinstance(e, hf.LocalEntryNotFoundError) or any(isinstance(x, _connection_errors()) for x in chain):
        msg = (f"{model}: cannot reach huggingface.co to download {repo_id}/{filename} (no network connection, "
               f"proxy or firewall). Run the download on a machine with internet access and copy "
               f"resources/weights/{model}/ here, {place}.")
    elif isinstance(e, hf.GatedRepoError):
        msg = (f"{model}: access to the gated repository {repo_id} refused. Log in on {s.page}, accept its terms "
               f"with the account whose token is in HF_TOKEN, and rerun" + ("" if token else
               "; no token is set: export HF_TOKEN=hf_... (a read token)") + ".")
    elif isinstance(e, hf.RevisionNotFoundError):
        msg = f"{model}: {repo_id} has no revision {rev!r}; fix weights.{model}.revision (a branch, tag or commit)."
    elif isinstance(e, hf.RepositoryNotFoundError):
        msg = (f"{model}: repository {repo_id} not found or not visible (HTTP 401/404). "
               + ("No token is set: it is gated or private, so export HF_TOKEN=hf_... (a read token of an account "
                  f"that accepted the terms on {s.page})." if not token else
                  f"Check weights.{model}.repo_id, and that the token's account may read it ({s.page})."))
    elif isinstance(e, (hf.RemoteEntryNotFoundError, hf.EntryNotFoundError)):
        msg = (f"{model}: {repo_id} (revision {rev}) has no file {filename!r}; look at the file list on {s.page} and "
               f"set weights.{model}.filename.")
    elif isinstance(e, hf.HfHubHTTPError) and getattr(e.response, "status_code", None) in (401, 403):
        msg = (f"{model}: Hugging Face refused the request (HTTP {e.response.status_code}): the token is invalid, "
               f"expired or lacks read permission. Create a read token on https://huggingface.co/settings/tokens, "
               f"export it as HF_TOKEN and rerun.")
    else:
        msg = f"{model}: download of {repo_id}/{filename} failed."
    return WeightsError(scrub(f"{msg} ({detail}) {how_to_get(model)}", token))


def download_weights(
    model: str,
    dest: str | Path,
    repo_id: str | None = None,
    filename: str | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> Path:
    """Download ``model``'s weights from Hugging Face to ``dest`` (the configured path) and return it.

    ``repo_id``/``filename`` default to :data:`WEIGHT_SOURCES`; the repository file ``filename`` is
    stored under the name ``dest`` (atomic rename), the ``extra_files`` of the source (e.g. Nicheformer's
    ``config.json``) next to it when the repository has them. Writes ``<dest>.provenance.json``.
    The token is ``token`` or :func:`hf_token`. Raises :class:`WeightsError` with the fix when a gated
    model has no token, when the suffix of ``dest`` differs from the repository file's, and on every failed
    download (offline, unauthorised, not found: :func:`hub_error`); the working folder ``.download_<model>`` and
    any ``.part`` file are removed whatever happens.
    """
    s = source(model)
    repo_id = repo_id or s.repo_id
    filename = filename or s.filename
    dest = Path(dest)
    if Path(filename).suffix != dest.suffix:
        raise WeightsError(
            f"{model}: the repository file {filename!r} would be stored as {dest} (suffix {dest.suffix or 'none'}), but "
            f"the loader picks the format by suffix; set weights.{model}.path to a '*{Path(filename).suffix}' path, or "
            f"fetch the other format by hand. {how_to_get(model)}"
        )
    token = token or hf_token()
    if s.gated and not token:
        raise WeightsError(
            f"{model}: {repo_id} is gated and no Hugging Face token is set. Export HF_TOKEN=hf_... (a read token of "
            f"an account that accepted the terms on {s.page}) and run again. {how_to_get(model)}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".download_{model}"  # huggingface_hub's local_dir; removed whatever happens
    part = dest.with_name(dest.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("downloading %s/%s (revision %s) -> %s", repo_id, filename, revision or "main", dest)
    extras = []
    try:
        try:
            got = Path(_hf_download(repo_id=repo_id, filename=filename, revision=revision, token=token or None,
                                    local_dir=tmp))
        except Exception as e:  # noqa: BLE001 - classified by hub_error: offline, unauthorised, not found, other
            raise hub_error(e, model, repo_id, filename, revision, token) from None
        for extra in s.extra_files:
            try:
                p = Path(_hf_download(repo_id=repo_id, filename=extra, revision=revision, token=token or None,
                                      local_dir=tmp))
            except Exception as e:  # noqa: BLE001 - optional companion file: say why, go on
                log.warning("optional file %s not fetched: %s", extra, hub_error(e, model, repo_id, extra, revision,
                                                                                 token))
                continue
            shutil.move(str(p), dest.parent / extra)
            extras.append(extra)
        shutil.move(str(got), part)
        os.replace(part, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        part.unlink(missing_ok=True)
    digest = sha256_file(dest)
    prov = {
        "model": model,
        "repo_id": repo_id,
        "filename": filename,
        "revision": revision or "main",
        "sha256": digest,
        "size_bytes": dest.stat().st_size,
        "extra_files": extras,
        "downloaded_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "licence": s.licence,
    }
    dest.with_name(dest.name + ".provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    log.info("%s: %s (%.1f MB) sha256 %s", model, dest, prov["size_bytes"] / 1e6, digest)
    return dest


def check_weights(model: str, path: str | Path, arch: dict | None = None) -> dict:
    """Load ``path`` into ``model``'s exact architecture (or ``arch`` overrides) and return the key report.

    Returns ``{"missing": [...], "unexpected": [...], "mismatched": [...], "n_tensors": int, ...}``; raises
    :class:`WeightsError` when the file is absent or does not fit (see the encoder modules).
    """
    from . import get_weights_check

    if model not in WEIGHT_SOURCES:
        raise KeyError(f"no weight check for model {model!r}; known: {sorted(WEIGHT_SOURCES)}")
    return get_weights_check(model)(path, arch)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="fetch weights from Hugging Face (needs internet; HF_TOKEN for UNI2-h)")
    d.add_argument("--model", required=True, choices=sorted(WEIGHT_SOURCES))
    d.add_argument("--dest", help="output file (default: the model's default path)")
    d.add_argument("--repo-id")
    d.add_argument("--filename", help="file name inside the Hugging Face repository")
    d.add_argument("--revision", help="branch, tag or commit (default main)")
    d.add_argument("--log")
    c = sub.add_parser("check", help="load a weights file into the exact architecture and report its keys")
    c.add_argument("--model", required=True, choices=sorted(WEIGHT_SOURCES))
    c.add_argument("--path", required=True)
    c.add_argument("--arch", default="{}", help="architecture overrides as JSON (tests / tiny models)")
    c.add_argument("--log")
    a = p.parse_args(argv)
    setup_logging(a.log)
    try:
        if a.cmd == "download":
            download_weights(a.model, a.dest or source(a.model).default_path, a.repo_id or None, a.filename or None, a.revision or None)
        else:
            report = check_weights(a.model, a.path, json.loads(a.arch) or None)
            print(json.dumps(report, indent=2, default=str))
    except WeightsError as e:
        log.error("%s", scrub(str(e), hf_token()))  # into the rule's log as well as stderr
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
