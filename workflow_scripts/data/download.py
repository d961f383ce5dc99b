"""Raw-data downloads of the paper's datasets as Snakemake jobs: pooch for files, fsspec for members of remote ZIPs.

Each dataset entry in the config may carry a ``download`` block (``config/paper.yaml``, user guide in
``docs/datasets.md``)::

    download:
      dest_dir: resources/lung            # every path below is relative to this folder
      cache_dir: resources/lung/cache     # optional (this is the default): pooch's cache of downloaded files
      files:                              # dataset-level entries (no {sample})
        - {url: https://…/GSE250346_HE_annotations.tar.gz, dest: raw/GSE250346_HE_annotations.tar.gz,
           extract: tar, extract_to: raw/he_annotations}
      per_sample:                         # one job per built sample; paths must contain {sample}
        - {manual: true, dest: "raw/{sample}/transcripts.csv.gz", source: https://…, instructions: "…"}
      sample_vars: {Sample2: {tenx: Xenium_V1_FFPE_Preview_Human_Breast_Cancer_Sample_2}}

:func:`plan_downloads` turns the block into one Snakemake rule per entry (``rules/download.smk``): ``fetch_*``
rules download, ``manual_*`` rules stand for files without a public URL and fail with instructions while the file
is missing. Their outputs are the raw files that ``prepare`` reads, so a target such as ``results/sis/lung.tsv``
fetches what is public and stops with the list of files to place by hand.

Entry keys
----------
``url``            HTTP(S) or FTP address (``{sample}`` and ``sample_vars`` placeholders allowed).
``dest``           target path relative to ``dest_dir`` (``{sample}`` only).
``known_hash``     published checksum, pooch syntax (``sha256:…``, ``md5:…``; bare hex = sha256). Optional.
``decompress``     ``gunzip``: the download is gzip data; ``dest`` receives the decompressed bytes.
``extract``        ``tar`` or ``zip``: unpack the archive (kept at ``dest``) into the folder ``extract_to``.
``members``        ``{name_in_zip: dest}``: copy only these members of a remote ZIP (a 10x ``outs.zip`` is
                   10–27 GB; the three files the reader needs are < 100 MB). A key matches the archive entry
                   whose path equals it or ends with ``/`` + key. Needs a server that honours HTTP ``Range``.
``manual``         ``true``: no public URL (login, terms, unknown accession); place the file at ``dest`` by hand.
``source``         landing page, shown in messages; ``instructions``: how to obtain the file (manual entries).
``auth``           shown when the server answers 401/403 (which login / terms are needed).
``needs``          paths (relative to ``dest_dir``) of other entries' outputs that the user needs to make this
                   manual file (e.g. the extracted annotations a GeoJSON is converted from); fetched first.
``name``           rule-name suffix (default: derived from the file name).

Checksums and the lock file
---------------------------
``known_hash`` is checked by pooch on download. As no data provider of the paper publishes checksums,
``{dest_dir}/download.lock.tsv`` (tab-separated ``path``, ``sha256``, ``size``, ``source``, ``recorded_utc``)
pins the sha256 (:func:`pooch.file_hash`) of every file the first time it is obtained (downloaded, copied out of
a remote ZIP, or found in place for a manual entry) and compares it on every later fetch and on every
``download_<dataset>`` run; a mismatch raises :class:`ChecksumError` naming the file.

Cache
-----
pooch keeps each download in ``cache_dir`` (file name = md5 of the URL + its base name) and it is hard-linked
(copied where links are impossible) to ``dest``: no extra disk. A file in the cache is never fetched again, even
when Snakemake reruns the job (``-f``, a changed rule). pooch writes a transfer to a temporary file in the cache
folder and moves it into place only when it is complete and matches ``known_hash``; an interrupted transfer is
deleted and starts again from the first byte on the next run (pooch does not resume partial HTTP transfers).

CLI (called by the rules)::

    python -m workflow_scripts.data.download fetch --entry '{…}' --lock resources/breast/download.lock.tsv \
        --cache-dir resources/breast/cache --log x.log
    python -m workflow_scripts.data.download manual --entry '{…}' --lock resources/lung/download.lock.tsv --log x.log
    python -m workflow_scripts.data.download verify --lock resources/lung/download.lock.tsv [FILE ...] --log x.log
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import re
import shutil
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pooch
from filelock import FileLock

log = logging.getLogger(__name__)

LOCK_NAME = "download.lock.tsv"
LOCK_COLUMNS = ("path", "sha256", "size", "source", "recorded_utc")
CHUNK = 1 << 20
BLOCK_KEYS = {"dest_dir", "cache_dir", "files", "per_sample", "sample_vars", "samples"}
ENTRY_KEYS = {"url", "dest", "known_hash", "decompress", "extract", "extract_to", "members", "manual", "source",
              "instructions", "auth", "needs", "name"}


class DownloadError(RuntimeError):
    """A file could not be obtained (network error, HTTP error, unreadable archive)."""


class DownloadAuthError(DownloadError):
    """The server asks for a login or for accepting terms (HTTP 401/403, or an HTML page instead of data)."""


class ChecksumError(DownloadError):
    """A file does not match its published ``known_hash`` or the sha256 pinned in the lock file."""


class ManualDownloadRequired(DownloadError):
    """A file has no public download URL and is missing; the message says where to get and put it."""


# --------------------------------------------------------------------------------------------------
# the lock file (pins the sha256 of what was obtained first)


class LockFile:
    """The per-dataset sha256 lock (``download.lock.tsv``), keyed by path relative to its folder.

    Every read-modify-write holds a :class:`filelock.FileLock`, so parallel download jobs of one dataset can
    record their files safely.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.root = self.path.parent
        self._mutex = FileLock(str(self.path) + ".flock")

    def read(self) -> OrderedDict[str, dict]:
        """All rows, ``{path: row}``. Raises ValueError naming the file and the fix when it is malformed."""
        rows: OrderedDict[str, dict] = OrderedDict()
        if not self.path.exists():
            return rows
        with open(self.path, encoding="utf-8") as fh:
            header = fh.readline().rstrip("\n").split("\t")
            if tuple(header) != LOCK_COLUMNS:
                raise ValueError(
                    f"{self.path}: unexpected header {header}; expected {list(LOCK_COLUMNS)}. "
                    "Fix or delete the lock file (deleting it re-pins the files now on disk)."
                )
            for n, line in enumerate(fh, start=2):
                if not line.strip():
                    continue
                parts = line.rstrip("\n").split("\t")
                if len(parts) != len(LOCK_COLUMNS):
                    raise ValueError(f"{self.path}:{n}: expected {len(LOCK_COLUMNS)} tab-separated fields")
                row = dict(zip(LOCK_COLUMNS, parts))
                rows[row["path"]] = row
        return rows

    def key(self, file: str | Path) -> str:
        """Lock key of ``file``: its path relative to the lock's folder, with forward slashes."""
        p = Path(file)
        try:
            return p.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return p.as_posix()

    def get(self, file: str | Path) -> dict | None:
        return self.read().get(self.key(file))

    def check_or_record(self, file: str | Path, sha256: str, source: str, hashed: str | Path | None = None) -> str:
        """Compare ``sha256`` (of ``file``'s content) with the pinned hash, or pin it when there is none.

        ``hashed`` is the file that was hashed when it is not ``file`` itself (the cache copy); it is named in the
        error. Returns ``"recorded"`` or ``"verified"``. Raises :class:`ChecksumError` naming the file, both hashes
        and the fix.
        """
        with self._mutex:
            rows = self.read()
            k = self.key(file)
            row = rows.get(k)
            if row is None:
                rows[k] = {
                    "path": k,
                    "sha256": sha256,
                    "size": str(Path(hashed or file).stat().st_size),
                    "source": source.replace("\t", " "),
                    "recorded_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
                self._write(rows)
                return "recorded"
        if row["sha256"] != sha256:
            where = f"{hashed} (the cached download of {file})" if hashed and Path(hashed) != Path(file) else str(file)
            raise ChecksumError(
                f"{where}: sha256 {sha256} does not match {row['sha256']} pinned in {self.path} on "
                f"{row['recorded_utc']} (source {row['source']}). The file is corrupted or the provider replaced it. "
                f"Delete {where} and run the download again; if the new file is intended, delete the line "
                f"'{k}' from {self.path} to pin the new version."
            )
        return "verified"

    def _write(self, rows: Mapping[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tsv.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("\t".join(LOCK_COLUMNS) + "\n")
            for row in rows.values():
                fh.write("\t".join(str(row[c]) for c in LOCK_COLUMNS) + "\n")
        os.replace(tmp, self.path)


def verify_files(dest_dir: str | Path, files: Sequence[str | Path] = ()) -> list[Path]:
    """Hash ``files`` (default: every file pinned in ``{dest_dir}/download.lock.tsv``) and check them (no network).

    Files without a lock entry (e.g. placed by hand) are pinned now; directories are skipped. Returns the files.
    Raises :class:`ChecksumError` listing every file that is missing or differs from its pinned sha256.
    """
    lock = LockFile(Path(dest_dir) / LOCK_NAME)
    paths = [Path(f) for f in files] or [lock.root / k for k in lock.read()]
    bad, ok = [], []
    for f in paths:
        if f.is_dir():
            continue
        if not f.exists():
            bad.append(f"{f}: missing")
            continue
        try:
            how = lock.check_or_record(f, pooch.file_hash(str(f)), "found in place")
        except ChecksumError as err:
            bad.append(str(err))
            continue
        log.info("%s %s", how, f)
        ok.append(f)
    if bad:
        raise ChecksumError(
            f"{len(bad)} of {len(paths)} files fail verification against {lock.path}:\n"
            + "\n".join(f"  - {b}" for b in bad)
        )
    log.info("%s: %d files verified", lock.path, len(ok))
    return ok


# --------------------------------------------------------------------------------------------------
# fetching one entry (pooch for whole files, fsspec + zipfile for members of a remote ZIP)


def _place(cached: Path, dest: Path) -> None:
    """Put the cached file at ``dest``: a hard link (no extra disk), or a copy across file systems."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(cached, tmp)
    except OSError:
        log.warning("cannot hard-link %s to %s (different file systems?); copying", cached, dest)
        shutil.copy2(cached, tmp)
    os.replace(tmp, dest)


def _looks_like_html(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(512).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


def _hints(entry: Mapping, dest: Path) -> str:
    page = f" (landing page {entry['source']})" if entry.get("source") else ""
    return f"Check the URL in the dataset's download block{page}, or place the file by hand at {dest}."


def _network_error(err: BaseException, url: str, entry: Mapping, dest: Path, root: Path) -> DownloadError:
    """Map requests / aiohttp / fsspec errors to a :class:`DownloadError` that names the cause and the fix."""
    import aiohttp
    import requests

    status = None
    if isinstance(err, requests.HTTPError) and err.response is not None:
        status = err.response.status_code
    elif isinstance(err, aiohttp.ClientResponseError):
        status = err.status
    if status in (401, 403):
        need = entry.get("auth") or "the server needs a login or the acceptance of its terms of use"
        return DownloadAuthError(
            f"HTTP {status} for {url}: {need}. Download it in a browser after logging in / accepting the terms"
            f"{' at ' + entry['source'] if entry.get('source') else ''} and place it at {dest}."
        )
    if status == 404 or isinstance(err, FileNotFoundError):
        return DownloadError(f"HTTP 404 (not found) for {url}: the provider may have moved or renamed it. "
                             + _hints(entry, dest))
    if status is not None:
        return DownloadError(f"HTTP {status} for {url}. Rerun later; " + _hints(entry, dest))
    return DownloadError(
        f"could not reach {url} ({err.__class__.__name__}: {err}). This machine seems to be offline: run "
        f"`snakemake download_<dataset>` on a machine with internet access and copy the dataset's folder "
        f"({root}) here, or place the file by hand at {dest}."
    )


def _pooch_fetch(url: str, known_hash: str | None, cache_dir: Path, processor=None, retries: int = 2) -> Path:
    """pooch's cached download of ``url`` into ``cache_dir`` (progress bar, ``retries``, no silent re-download)."""
    fname = pooch.utils.unique_file_name(url)
    p = pooch.create(path=cache_dir, base_url="", registry={fname: known_hash}, urls={fname: url},
                     retry_if_failed=retries, allow_updates=False)
    if url.startswith(("http://", "https://")):
        downloader = pooch.HTTPDownloader(progressbar=True, chunk_size=CHUNK, timeout=120)
    else:
        downloader = pooch.downloaders.choose_downloader(url, progressbar=True)
    return Path(p.fetch(fname, processor=processor, downloader=downloader))


def fetch_url(entry: Mapping, dest_dir: str | Path, cache_dir: str | Path | None = None,
              retries: int = 2) -> list[Path]:
    """Download ``entry['url']`` with pooch to ``dest_dir / entry['dest']`` (see module docstring); return outputs.

    A failed transfer is tried again ``retries`` times, from the first byte. The download is verified against
    ``known_hash`` (pooch) and the lock file (pinned on first download), then decompressed or unpacked as
    configured. Raises :class:`ChecksumError` (naming the file) on a hash
    mismatch, :class:`DownloadAuthError` on HTTP 401/403 or an HTML page instead of data, and
    :class:`DownloadError` on other HTTP or network errors (with the URL and the fix).
    """
    import requests

    dest_dir = Path(dest_dir)
    cache = Path(cache_dir) if cache_dir else dest_dir / "cache"
    url, dest = entry["url"], dest_dir / entry["dest"]
    known = entry.get("known_hash")
    decompress = entry.get("decompress")
    if decompress not in (None, "gunzip"):
        raise ValueError(f"{url}: decompress: {decompress!r} is not supported (use gunzip)")
    processor = pooch.Decompress(method="gzip") if decompress else None
    fname = cache / pooch.utils.unique_file_name(url)
    try:
        got = _pooch_fetch(url, known, cache, processor, retries)
    except ValueError as err:  # pooch: the download, or the cached file, does not match known_hash
        raise ChecksumError(
            f"{fname} (download of {url} for {dest}) does not match the published known_hash {known}: {err}. "
            f"Delete {fname} and rerun; if the provider published a new version, update known_hash in the config."
        ) from err
    except requests.RequestException as err:
        raise _network_error(err, url, entry, dest, dest_dir) from err
    if not dest.name.lower().endswith((".html", ".htm")) and _looks_like_html(fname):
        fname.unlink()
        raise DownloadAuthError(
            f"{url} returned an HTML page instead of the file (usually a login, cookie or terms page); "
            f"{entry.get('auth') or ''} Get the file{' from ' + entry['source'] if entry.get('source') else ''} "
            f"and place it at {dest}."
        )
    how = LockFile(dest_dir / LOCK_NAME).check_or_record(dest, pooch.file_hash(str(got)), url, hashed=got)
    log.info("%s sha256 of %s (cached as %s)", how, dest, got)
    _place(got, dest)
    out = [dest]
    if entry.get("extract"):
        out.append(_unpack(dest, entry["extract"], dest_dir / entry["extract_to"]))
    return out


def _unpack(archive: Path, kind: str, to: Path) -> Path:
    """Unpack a tar or zip archive into the folder ``to`` (replaced as a whole; tar members filtered as data)."""
    if kind not in ("tar", "zip"):
        raise ValueError(f"{archive}: extract: {kind!r} is not supported (use tar or zip)")
    tmp = to.with_name(to.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.unpack_archive(archive, tmp, format=kind, filter="data")  # "tar" detects the compression
    shutil.rmtree(to, ignore_errors=True)
    os.replace(tmp, to)
    log.info("unpacked %s into %s", archive, to)
    return to


def _match_member(names: Sequence[str], key: str, url: str) -> str:
    hits = [n for n in names if n == key or n.endswith("/" + key)]
    if len(hits) != 1:
        raise DownloadError(
            f"{url}: member {key!r} matches {len(hits)} entries ({hits[:5]}); use a longer path in `members:`"
            + ("" if hits else f". The archive holds e.g. {list(names)[:10]}")
        )
    return hits[0]


def fetch_members(entry: Mapping, dest_dir: str | Path, cache_dir: str | Path | None = None,
                  block_size: int = 4 * CHUNK) -> list[Path]:
    """Copy the ``members`` of the remote ZIP ``entry['url']`` to their ``dest`` paths, reading only their bytes.

    The archive is opened through fsspec's HTTP file system (HTTP ``Range`` reads of ``block_size`` bytes) and
    :mod:`zipfile`. Each member is cached in ``{cache_dir}/<md5(url)>-<archive>.members/`` (written to a
    temporary name, renamed when complete), pinned in the lock file and hard-linked to its destination; members
    already in the cache are not read again. Raises :class:`DownloadError` when the server does not honour
    ``Range`` or a member is absent, :class:`ChecksumError` on a mismatch with the pinned sha256.
    """
    import asyncio

    import aiohttp
    import fsspec
    from tqdm import tqdm

    dest_dir = Path(dest_dir)
    cache = (Path(cache_dir) if cache_dir else dest_dir / "cache") / (pooch.utils.unique_file_name(entry["url"])
                                                                      + ".members")
    url, members = entry["url"], {k: dest_dir / v for k, v in entry["members"].items()}
    todo = {k: d for k, d in members.items() if not (cache / k).exists()}
    if todo:
        first = next(iter(todo.values()))
        try:
            fs = fsspec.filesystem("http", skip_instance_cache=True)
            with fs.open(url, "rb", block_size=block_size) as remote, zipfile.ZipFile(remote) as zf:
                names = zf.namelist()
                for key in todo:
                    info = zf.getinfo(_match_member(names, key, url))
                    target = cache / key
                    target.parent.mkdir(parents=True, exist_ok=True)
                    part = target.with_name(target.name + ".part")
                    with zf.open(info) as src, open(part, "wb") as dst, tqdm(
                        total=info.file_size, unit="B", unit_scale=True, desc=Path(key).name, mininterval=2.0
                    ) as bar:
                        for chunk in iter(lambda: src.read(CHUNK), b""):
                            dst.write(chunk)
                            bar.update(len(chunk))
                    os.replace(part, target)
                    log.info("copied %s out of %s (%d bytes)", info.filename, url, info.file_size)
        except DownloadError:
            raise
        except zipfile.BadZipFile as err:
            raise DownloadError(f"{url} is not a readable ZIP archive ({err}). " + _hints(entry, first)) from err
        except ValueError as err:  # fsspec: the server ignores Range requests
            raise DownloadError(
                f"{url}: cannot read members remotely ({err}). Remove `members:` from this entry to download the "
                "whole archive with `dest:` and `extract: zip` instead."
            ) from err
        except (aiohttp.ClientError, asyncio.TimeoutError, FileNotFoundError) as err:
            raise _network_error(err, url, entry, first, dest_dir) from err
    lock = LockFile(dest_dir / LOCK_NAME)
    for key, dest in members.items():
        cached = cache / key
        how = lock.check_or_record(dest, pooch.file_hash(str(cached)), f"{url}#{key}", hashed=cached)
        log.info("%s sha256 of %s", how, dest)
        _place(cached, dest)
    return list(members.values())


def missing_manual_message(entry: Mapping, dest_dir: str | Path) -> str:
    """Where to get a manual entry's file and where to put it (one paragraph)."""
    dest = Path(dest_dir) / entry["dest"]
    return (
        f"{dest}\n      from: {entry.get('source') or '(see docs/datasets.md)'}\n"
        + (f"      how:  {entry['instructions']}\n" if entry.get("instructions") else "")
    )


def check_manual(entry: Mapping, dest_dir: str | Path, others: Sequence[str] = ()) -> Path:
    """A manual entry: pin the file when it is in place; else raise :class:`ManualDownloadRequired`.

    ``others``: further hand-placed files of the dataset, listed in the message when they are missing too.
    """
    dest = Path(dest_dir) / entry["dest"]
    if dest.exists():
        how = LockFile(Path(dest_dir) / LOCK_NAME).check_or_record(
            dest, pooch.file_hash(str(dest)), "manual:" + str(entry.get("source") or ""))
        log.info("%s sha256 of %s (placed by hand)", how, dest)
        return dest
    still = [o for o in others if o != str(dest) and not Path(o).exists()]
    raise ManualDownloadRequired(
        "This file has no public direct URL (login, terms of use, or an accession the paper does not give). "
        "Get it by hand and place it here, then rerun the same command:\n  - " + missing_manual_message(entry, dest_dir)
        + (f"Also still to place by hand for this dataset ({len(still)}; see their own messages or "
           "docs/datasets.md):\n" + "".join(f"  - {o}\n" for o in still) if still else "")
    )


# --------------------------------------------------------------------------------------------------
# the plan: one Snakemake rule per entry of a dataset's download block


def dataset_samples(params: Mapping) -> list[str]:
    """Samples a dataset builds: ``samples`` if given, else the union of ``splits[s]`` for ``build_splits``.

    Raises ValueError when ``build_splits`` names a split that ``splits`` lacks.
    """
    if params.get("samples"):
        return [str(s) for s in params["samples"]]
    splits = params.get("splits") or {}
    build = params.get("build_splits") or list(splits)
    out: list[str] = []
    for s in build:
        if s not in splits:
            raise ValueError(f"build_splits names {s!r}, but splits only has {list(splits)}")
        out += [str(x) for x in splits[s] if str(x) not in out]
    return out


def _format(value, variables: Mapping[str, str], where: str):
    if isinstance(value, str):
        try:
            return value.format(**variables)
        except KeyError as err:
            raise ValueError(f"{where}: {value!r} uses {{{err.args[0]}}}, which is not defined for sample "
                             f"{variables.get('sample')!r}; add it under download.sample_vars") from err
    if isinstance(value, Mapping):
        return {_format(k, variables, where): _format(v, variables, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_format(v, variables, where) for v in value]
    return value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", re.sub(r"\{[^}]*\}", "", text)).strip("_").lower() or "file"


@dataclass(frozen=True)
class DownloadRule:
    """One rule of the download plan: an entry of a dataset's ``download`` block.

    ``kind`` is ``fetch`` (``url`` + ``dest``), ``members`` (remote ZIP) or ``manual``. Paths (``outputs``,
    ``directories``, ``needs``, ``log``) are relative to the working directory; per-sample rules keep
    ``{sample}`` as a wildcard, constrained to ``samples``.
    """

    dataset: str
    name: str
    kind: str
    entry: Mapping
    dest_dir: str
    cache_dir: str
    samples: tuple[str, ...] = ()
    sample_vars: Mapping = field(default_factory=dict)

    @property
    def per_sample(self) -> bool:
        return bool(self.samples)

    def _path(self, rel: str) -> str:
        return f"{self.dest_dir}/{rel}"

    @property
    def outputs(self) -> list[str]:
        """Output file templates (``{sample}`` wildcard in per-sample rules)."""
        if self.kind == "members":
            return [self._path(v) for v in self.entry["members"].values()]
        return [self._path(self.entry["dest"])]

    @property
    def directories(self) -> list[str]:
        return [self._path(self.entry["extract_to"])] if self.entry.get("extract") else []

    @property
    def needs(self) -> list[str]:
        return [self._path(n) for n in self.entry.get("needs") or []]

    @property
    def lock(self) -> str:
        """The dataset's lock file; its folder is ``dest_dir``."""
        return f"{self.dest_dir}/{LOCK_NAME}"

    @property
    def log(self) -> str:
        return f"logs/download/{self.dataset}/{self.name}" + ("/{sample}.log" if self.per_sample else ".log")

    @property
    def wildcard_constraints(self) -> dict[str, str]:
        return {"sample": "|".join(re.escape(s) for s in self.samples)} if self.per_sample else {}

    def job_entry(self, sample: str | None = None) -> dict:
        """The entry with ``{sample}`` and ``sample_vars`` filled in for ``sample`` (None: dataset-level)."""
        if not self.per_sample:
            return dict(self.entry)
        variables = {"sample": sample, **{k: str(v) for k, v in (self.sample_vars.get(sample) or {}).items()}}
        return _format(dict(self.entry), variables, f"datasets.{self.dataset}.download ({self.name})")

    def params(self, wildcards) -> str:
        """The job's ``--entry`` JSON: only keys the output depends on (fetch), or the message (manual)."""
        e = self.job_entry(wildcards.get("sample"))
        if self.kind != "manual":
            e = {k: e[k] for k in ("url", "dest", "members", "known_hash", "decompress", "extract", "extract_to")
                 if k in e}
        return json.dumps(e, sort_keys=True)

    def files(self, folders: bool = True) -> list[str]:
        """Every output file (and folder, unless ``folders`` is False) for every sample, as concrete paths."""
        out = self.outputs + (self.directories if folders else [])
        return [p.format(sample=s) for p in out for s in self.samples] if self.per_sample else out


def _check_entry(e, where: str, per_sample: bool) -> str:
    if not isinstance(e, Mapping):
        raise ValueError(f"{where}: expected a mapping of entry keys, got {e!r}")
    unknown = sorted(set(e) - ENTRY_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(ENTRY_KEYS)} (docs/datasets.md)")
    if e.get("manual"):
        kind = "manual"
        if "url" in e or "members" in e:
            raise ValueError(f"{where}: a manual entry has no `url`/`members`; drop them or drop `manual: true`")
    elif e.get("members"):
        kind = "members"
        if "dest" in e or e.get("extract") or e.get("decompress"):
            raise ValueError(f"{where}: an entry with `members` takes no `dest`, `extract` or `decompress`")
    else:
        kind = "fetch"
    if kind != "manual" and not e.get("url"):
        raise ValueError(f"{where}: no `url`; set `manual: true` if the file must be placed by hand")
    if kind != "members" and not e.get("dest"):
        raise ValueError(f"{where}: `dest` (the file's path relative to dest_dir) is required")
    if e.get("extract") and not e.get("extract_to"):
        raise ValueError(f"{where}: `extract` needs `extract_to` (the folder to unpack into)")
    if e.get("extract") and kind == "manual":
        raise ValueError(f"{where}: `extract` is only for downloaded archives")
    paths = list((e.get("members") or {}).values()) + [e[k] for k in ("dest", "extract_to") if e.get(k)]
    for p in paths:
        names = set(re.findall(r"\{([^}]*)\}", str(p)))
        if per_sample and names != {"sample"}:
            raise ValueError(f"{where}: path {p!r} must contain {{sample}} and no other placeholder "
                             "(sample_vars are for url, source and instructions)")
        if not per_sample and names:
            raise ValueError(f"{where}: path {p!r} has placeholders; dataset-level `files` cannot use them")
    return kind


def plan_downloads(name: str, params: Mapping) -> list[DownloadRule]:
    """The download rules of dataset ``name`` from its config entry ``params`` (empty without a download block).

    Raises ValueError naming ``datasets.<name>.download`` and the key for unknown keys, missing URLs or paths,
    and undefined placeholders.
    """
    dl = params.get("download")
    if not dl:
        return []
    root = f"datasets.{name}.download"
    unknown = sorted(set(dl) - BLOCK_KEYS)
    if unknown:
        raise ValueError(f"{root}: unknown key(s) {unknown}; allowed: {sorted(BLOCK_KEYS)} (docs/datasets.md)")
    dest_dir = str(dl.get("dest_dir") or f"resources/{name}").rstrip("/")
    cache_dir = str(dl.get("cache_dir") or f"{dest_dir}/cache").rstrip("/")
    samples = tuple(str(s) for s in (dl.get("samples") or dataset_samples(params)))
    sample_vars = dl.get("sample_vars") or {}
    rules: list[DownloadRule] = []
    used: set[str] = set()
    for group, per_sample in (("files", False), ("per_sample", True)):
        for i, e in enumerate(dl.get(group) or []):
            where = f"{root}.{group}[{i}]"
            kind = _check_entry(e, where, per_sample)
            base = e.get("name") or _slug(Path(e["url"] if kind == "members" else e["dest"]).name)
            rname = f"{'manual' if kind == 'manual' else 'fetch'}_{name}_{_slug(base)}"
            n = 2
            while rname in used:
                rname, n = f"{rname.rsplit('__', 1)[0]}__{n}", n + 1
            used.add(rname)
            rule = DownloadRule(name, rname, kind, dict(e), dest_dir, cache_dir, samples if per_sample else (),
                                sample_vars)
            if per_sample and samples:
                for s in samples:  # undefined placeholders fail now, not in the job
                    rule.job_entry(s)
            if not per_sample or samples:
                rules.append(rule)
    seen: dict[str, str] = {}
    for r in rules:
        for f in r.files():
            if f in seen:
                raise ValueError(f"{root}: {f} is the output of two entries ({seen[f]} and {r.name})")
            seen[f] = r.name
    for r in rules:
        for n_ in r.needs:
            if n_ not in seen and not any(n_.format(sample=s) in seen for s in r.samples):
                raise ValueError(f"{root} ({r.name}): `needs` names {n_}, which no entry downloads")
    return rules


def download_outputs(name: str, params: Mapping) -> list[str]:
    """Every file and folder that dataset ``name``'s download rules produce, for the samples it builds."""
    return [f for r in plan_downloads(name, params) for f in r.files()]


def manual_files(name: str, params: Mapping) -> list[str]:
    """The files of dataset ``name`` that must be placed by hand (manual entries), for the samples it builds."""
    return [f for r in plan_downloads(name, params) if r.kind == "manual" for f in r.files()]


# --------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    """CLI of the download rules: ``fetch``, ``manual`` and ``verify`` (exit 1 with the reason in the log)."""
    from workflow_scripts.io import json_arg, setup_logging

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    lock_help = f"the dataset's lock file ({{dest_dir}}/{LOCK_NAME}); entry paths are relative to its folder"
    for cmd, text in (("fetch", "download one entry (url or remote-ZIP members)"),
                      ("manual", "check a hand-placed file, or say where to get and put it")):
        p = sub.add_parser(cmd, help=text)
        p.add_argument("--entry", required=True, help="the entry as JSON, placeholders filled in")
        p.add_argument("--lock", required=True, help=lock_help)
        p.add_argument("--log")
        if cmd == "fetch":
            p.add_argument("--cache-dir")
        else:
            p.add_argument("--others", default="[]", help="JSON list of the dataset's other hand-placed files")
    v = sub.add_parser("verify", help="hash files against the lock (no network); pins files not yet in it")
    v.add_argument("--lock", required=True, help=lock_help)
    v.add_argument("files", nargs="*", help="default: every file in the lock")
    v.add_argument("--log")
    a = ap.parse_args(argv)
    setup_logging(a.log)
    pooch_log = pooch.get_logger()  # pooch's own logger is outside the hierarchy: send it to the rule's log too
    pooch_log.handlers, pooch_log.propagate = list(logging.getLogger().handlers), False
    dest_dir = Path(a.lock).parent
    if Path(a.lock).name != LOCK_NAME:
        ap.error(f"--lock must name a file called {LOCK_NAME} (its folder is the dataset's dest_dir)")
    try:
        if a.cmd == "fetch":
            entry = json_arg(a.entry, "--entry")
            fetch = fetch_members if entry.get("members") else fetch_url
            out = fetch(entry, dest_dir, a.cache_dir)
        elif a.cmd == "manual":
            out = [check_manual(json_arg(a.entry, "--entry"), dest_dir, json_arg(a.others, "--others"))]
        else:
            out = verify_files(dest_dir, a.files)
    except (DownloadError, ValueError) as err:
        log.error("%s", err)
        return 1
    log.info("%d file(s) in place: %s", len(out), ", ".join(map(str, out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
