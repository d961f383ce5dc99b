"""Resumable downloads of the paper's raw data, with a sha256 lock file per dataset.

Each dataset entry in the config may carry a ``download`` block (see ``config/paper.yaml`` and
``docs/datasets.md``)::

    download:
      dest_dir: resources/lung            # every ``dest`` below is relative to this folder
      files:                              # dataset-level files
        - {url: https://…/GSE250346_HE_annotations.tar.gz, dest: raw/GSE250346_HE_annotations.tar.gz,
           extract: tar, extract_to: raw/he_annotations}
      per_sample:                         # expanded once per sample that is built ({sample} + sample_vars)
        - {manual: true, dest: "raw/{sample}/transcripts.csv.gz", source: https://…, instructions: "…"}
      sample_vars: {Sample2: {tenx: Xenium_V1_FFPE_Preview_Human_Breast_Cancer_Sample_2}}

Entry keys
----------
``url``            HTTP(S) address; downloaded with HTTP ``Range`` resumption into ``dest + '.part'``.
``dest``           target path (relative to ``dest_dir``).
``decompress``     ``gunzip``: the download is gzip data, ``dest`` receives the decompressed bytes.
``extract``        ``tar`` or ``zip``: after download, unpack the archive (kept at ``dest``) into ``extract_to``.
``members``        ``{name_in_zip: dest}``: fetch only these members of a remote ZIP through HTTP range reads
                   (a 10x ``outs.zip`` is 10–27 GB; the three files the reader needs are < 100 MB). A key
                   matches the archive entry whose path equals it or ends with ``/`` + key.
``manual``         ``true``: no URL is known (login, terms, unknown accession); the file must be placed at
                   ``dest`` by hand. ``source`` (landing page) and ``instructions`` are shown when it is missing.
``auth``           free text shown when the server answers 401/403 (which login / terms are needed).

Lock file
---------
``{dest_dir}/download.lock.tsv`` (tab-separated: ``path``, ``sha256``, ``size``, ``source``, ``recorded_utc``)
records the sha256 of every file the first time it is obtained (downloaded, extracted from a remote ZIP,
or found in place for manual entries). On every later run each recorded file is hashed again and
compared; a mismatch raises :class:`ChecksumError`. No checksums are published by the data providers
(docs/datasets.md), so the lock pins what was obtained first.

CLI::

    python -m workflow_scripts.data.download --dataset lung --params '{…dataset config…}' \
        --flag resources/lung/.download.done --log logs/download/lung.log
    python -m workflow_scripts.data.download --verify-lock resources/lung/download.lock.tsv --log verify.log
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import hashlib
import http.client
import io
import json
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from tqdm import tqdm

log = logging.getLogger(__name__)

LOCK_NAME = "download.lock.tsv"
LOCK_COLUMNS = ("path", "sha256", "size", "source", "recorded_utc")
USER_AGENT = "cellsynergy-workflow/0.1 (+https://github.com/; python-urllib)"
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be obtained (network error, HTTP error, size mismatch)."""


class DownloadAuthError(DownloadError):
    """The server asks for a login or for accepting terms (HTTP 401/403, or an HTML page instead of data)."""


class ChecksumError(DownloadError):
    """A file on disk no longer matches the sha256 recorded in the lock file."""


class ManualDownloadRequired(DownloadError):
    """Some files have no download URL and are missing; the message lists where to get and put them."""


# --------------------------------------------------------------------------------------------------
# hashing and the lock file


def sha256_file(path: str | Path, chunk: int = CHUNK) -> str:
    """Return the hex sha256 of a file, read in ``chunk``-byte blocks (never whole in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class LockFile:
    """The per-dataset sha256 lock (``download.lock.tsv``), keyed by path relative to its folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.root = self.path.parent
        self.rows: OrderedDict[str, dict] = OrderedDict()
        if self.path.exists():
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
                    self.rows[row["path"]] = row

    def key(self, file: str | Path) -> str:
        """Lock key of ``file``: its path relative to the lock's folder, with forward slashes."""
        p = Path(file)
        try:
            return p.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return p.as_posix()

    def get(self, file: str | Path) -> dict | None:
        return self.rows.get(self.key(file))

    def record(self, file: str | Path, sha: str, source: str) -> None:
        """Add (or replace) the entry of ``file`` and write the lock file at once."""
        k = self.key(file)
        self.rows[k] = {
            "path": k,
            "sha256": sha,
            "size": str(Path(file).stat().st_size),
            "source": source.replace("\t", " "),
            "recorded_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tsv.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("\t".join(LOCK_COLUMNS) + "\n")
            for row in self.rows.values():
                fh.write("\t".join(str(row[c]) for c in LOCK_COLUMNS) + "\n")
        os.replace(tmp, self.path)


def verify_or_record(lock: LockFile, file: str | Path, source: str) -> str:
    """Hash ``file``; record it when the lock has no entry, else compare.

    Returns the sha256. Raises :class:`ChecksumError` naming the file, both hashes and the fix when the
    file differs from the recorded hash.
    """
    file = Path(file)
    sha = sha256_file(file)
    row = lock.get(file)
    if row is None:
        lock.record(file, sha, source)
        log.info("recorded sha256 %s for %s (%d bytes)", sha[:16], file, file.stat().st_size)
    elif row["sha256"] != sha:
        raise ChecksumError(
            f"{file}: sha256 {sha} does not match {row['sha256']} recorded in {lock.path} on "
            f"{row['recorded_utc']} (source {row['source']}). The file is corrupted or was replaced. "
            f"Delete it and run the download again, or — if the new file is intended — remove its line from "
            f"{lock.path} to pin the new version."
        )
    else:
        log.info("verified %s (sha256 %s)", file, sha[:16])
    return sha


def verify_lock(lock_path: str | Path) -> list[Path]:
    """Re-hash every file recorded in a lock file (no network); return them.

    Raises :class:`ChecksumError` listing every file that is missing or differs from its recorded sha256.
    """
    lock = LockFile(lock_path)
    if not lock.path.exists():
        raise FileNotFoundError(f"lock file {lock.path} not found (run the dataset's download rule first)")
    bad, ok = [], []
    for key, row in tqdm(list(lock.rows.items()), desc="verify", unit="file"):
        f = lock.root / key
        if not f.exists():
            bad.append(f"{f}: missing (recorded {row['recorded_utc']} from {row['source']})")
        elif sha256_file(f) != row["sha256"]:
            bad.append(f"{f}: sha256 differs from {row['sha256']} recorded {row['recorded_utc']}")
        else:
            ok.append(f)
    if bad:
        raise ChecksumError(
            f"{len(bad)} of {len(lock.rows)} files in {lock.path} fail verification (delete them and rerun the "
            "download rule, or remove their lock lines to pin new versions):\n" + "\n".join(f"  - {b}" for b in bad)
        )
    log.info("%s: all %d files verified", lock.path, len(ok))
    return ok


# --------------------------------------------------------------------------------------------------
# HTTP


def _request(url: str, start: int | None = None, end: int | None = None, timeout: float = 60.0):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if start is not None:
        headers["Range"] = f"bytes={start}-" if end is None else f"bytes={start}-{end}"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _http_error(err: urllib.error.HTTPError, url: str, auth: str | None, landing: str | None) -> DownloadError:
    if err.code in (401, 403):
        hint = auth or "this source needs a login or the acceptance of its terms of use"
        return DownloadAuthError(
            f"HTTP {err.code} for {url}: {hint}. Download the file in a browser after logging in / accepting the "
            f"terms{(' at ' + landing) if landing else ''} and place it at the destination shown in the log."
        )
    if err.code == 404:
        return DownloadError(
            f"HTTP 404 (not found) for {url}. The provider may have renamed or moved the file; "
            f"find it{(' on ' + landing) if landing else ' on the provider page'} and either fix the URL in the "
            "config's download block or place the file by hand at the destination shown in the log."
        )
    return DownloadError(f"HTTP {err.code} {err.reason} for {url}")


def _total_from_content_range(value: str | None) -> int | None:
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def download_file(
    url: str,
    dest: str | Path,
    retries: int = 5,
    timeout: float = 60.0,
    backoff_s: float = 2.0,
    auth: str | None = None,
    landing: str | None = None,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest``, resuming from ``dest + '.part'`` with HTTP ``Range`` requests.

    The partial file survives interruptions (network errors, a killed job); the next call continues where
    it stopped (HTTP 206). If the server ignores ``Range`` (HTTP 200) the download restarts from zero.
    The file is renamed to ``dest`` only when its size equals the announced length.

    Raises
    ------
    DownloadAuthError  HTTP 401/403, or an HTML page returned for a non-HTML file (login / terms pages).
    DownloadError      HTTP 404 and other HTTP errors, or still incomplete after ``retries`` attempts.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        try:
            resp = _request(url, start=have if have else None, timeout=timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:
                total = _total_from_content_range(err.headers.get("Content-Range"))
                if total == have:  # the part file is already complete
                    os.replace(part, dest)
                    return dest
                log.warning("%s: server rejected resume at byte %d (HTTP 416); restarting", url, have)
                part.unlink()
                continue
            raise _http_error(err, url, auth, landing) from err
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
            attempt += 1
            if attempt > retries:
                raise DownloadError(f"{url}: giving up after {retries} retries ({err}); rerun to resume") from err
            log.warning("%s: %s; retry %d/%d in %.0f s", url, err, attempt, retries, backoff_s * attempt)
            time.sleep(backoff_s * attempt)
            continue
        with resp:
            ctype = (resp.headers.get("Content-Type") or "").lower()
            if ctype.startswith("text/html") and not dest.name.lower().endswith((".html", ".htm")):
                raise DownloadAuthError(
                    f"{url} returned an HTML page instead of the file (usually a login, cookie or terms page). "
                    f"{auth or ''} Get the file{(' from ' + landing) if landing else ''} and place it at {dest}."
                )
            if resp.status == 206:
                crange = resp.headers.get("Content-Range") or ""
                total = _total_from_content_range(crange)
                start = crange.split()[-1].split("-")[0] if crange.startswith("bytes ") else ""
                if start != str(have):
                    raise DownloadError(f"{url}: asked to resume at byte {have}, server answered {crange!r}; "
                                        f"delete {part} and rerun")
                mode = "ab"
            else:
                if have:
                    log.warning("%s: server ignored the Range request; restarting from byte 0", url)
                have = 0
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                mode = "wb"
            bar = tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=not progress,
                mininterval=2.0,
            )
            try:
                with open(part, mode) as fh:
                    while True:
                        block = resp.read(CHUNK)
                        if not block:
                            break
                        fh.write(block)
                        bar.update(len(block))
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
                bar.close()
                attempt += 1
                if attempt > retries:
                    raise DownloadError(f"{url}: interrupted {retries} times ({err}); rerun to resume") from err
                log.warning("%s: interrupted at byte %d (%s); resuming (retry %d/%d)",
                            url, part.stat().st_size, err, attempt, retries)
                time.sleep(backoff_s * attempt)
                continue
            bar.close()
        size = part.stat().st_size
        if total is not None and size != total:
            attempt += 1
            if attempt > retries:
                raise DownloadError(f"{url}: got {size} of {total} bytes after {retries} retries; rerun to resume")
            log.warning("%s: short read (%d of %d bytes); resuming", url, size, total)
            continue
        os.replace(part, dest)
        log.info("downloaded %s -> %s (%d bytes)", url, dest, size)
        return dest


class HttpRangeFile(io.RawIOBase):
    """Read-only, seekable file over HTTP ``Range`` requests, with a small LRU cache of ``block``-byte blocks.

    Lets :mod:`zipfile` read the central directory and a few members of a multi-GB remote archive without
    downloading it. Raises :class:`DownloadError` when the server does not honour ``Range``.
    """

    def __init__(self, url: str, block: int = 4 * CHUNK, cache_blocks: int = 8, timeout: float = 60.0,
                 retries: int = 5, auth: str | None = None, landing: str | None = None):
        super().__init__()
        self.url, self.block, self.cache_blocks, self.timeout, self.retries = url, block, cache_blocks, timeout, retries
        self.auth, self.landing = auth, landing
        self.pos = 0
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self.n_requests = 0
        try:
            with _request(url, 0, 0, timeout) as resp:
                if resp.status != 206:
                    raise DownloadError(
                        f"{url}: the server does not support HTTP range requests; remove `members:` from this "
                        "entry to download the whole archive instead"
                    )
                total = _total_from_content_range(resp.headers.get("Content-Range"))
        except urllib.error.HTTPError as err:
            raise _http_error(err, url, auth, landing) from err
        if total is None:
            raise DownloadError(f"{url}: no total size in Content-Range; cannot read the archive remotely")
        self.size = total

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def _get_block(self, i: int) -> bytes:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        start, end = i * self.block, min(self.size, (i + 1) * self.block) - 1
        for attempt in range(self.retries + 1):
            try:
                with _request(self.url, start, end, self.timeout) as resp:
                    data = resp.read()
                self.n_requests += 1
                if len(data) == end - start + 1:
                    break
            except urllib.error.HTTPError as err:
                raise _http_error(err, self.url, self.auth, self.landing) from err
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
                log.warning("%s: range %d-%d failed (%s); retry %d", self.url, start, end, err, attempt + 1)
            time.sleep(min(10.0, 1.0 + attempt))
        else:
            raise DownloadError(f"{self.url}: could not read bytes {start}-{end} after {self.retries} retries")
        self._cache[i] = data
        while len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        return data

    def readinto(self, buf) -> int:
        if self.pos >= self.size:
            return 0
        n = min(len(buf), self.size - self.pos)
        out = memoryview(buf)
        done = 0
        while done < n:
            i, off = divmod(self.pos, self.block)
            data = self._get_block(i)
            take = min(n - done, len(data) - off)
            out[done : done + take] = data[off : off + take]
            done += take
            self.pos += take
        return done


def _match_member(names: Sequence[str], key: str, archive: str) -> str:
    hits = [n for n in names if n == key or n.endswith("/" + key)]
    if len(hits) != 1:
        raise DownloadError(
            f"{archive}: member {key!r} matches {len(hits)} entries ({hits[:5]}); use a longer path in `members:`"
            + ("" if hits else f". The archive holds e.g. {list(names)[:10]}")
        )
    return hits[0]


def extract_remote_zip_members(
    url: str, members: Mapping[str, str | Path], auth: str | None = None, landing: str | None = None,
    block: int = 4 * CHUNK,
) -> dict[str, Path]:
    """Copy selected members of the ZIP at ``url`` to local paths, reading only their bytes (HTTP Range).

    ``members`` maps a member name (or path suffix) to its destination. Existing destinations are skipped.
    Each member is written to ``dest + '.part'`` and renamed when complete. ``block`` is the size of one
    range request (bytes). Returns ``{key: dest}``.
    """
    todo = {k: Path(v) for k, v in members.items() if not Path(v).exists()}
    if not todo:
        return {k: Path(v) for k, v in members.items()}
    remote = HttpRangeFile(url, block=block, auth=auth, landing=landing)
    try:
        zf = zipfile.ZipFile(io.BufferedReader(remote, buffer_size=min(block, CHUNK)))
    except zipfile.BadZipFile as err:
        raise DownloadError(f"{url} is not a readable ZIP archive ({err}); check the URL or the landing page "
                            f"{landing or ''}") from err
    with zf:
        names = zf.namelist()
        for key, dest in todo.items():
            name = _match_member(names, key, url)
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(dest.name + ".part")
            info = zf.getinfo(name)
            with zf.open(info) as src, open(part, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc=dest.name, mininterval=2.0
            ) as bar:
                for block in iter(lambda: src.read(CHUNK), b""):
                    dst.write(block)
                    bar.update(len(block))
            os.replace(part, dest)
            log.info("extracted %s from %s -> %s (%d bytes; %d range requests so far)",
                     name, url, dest, info.file_size, remote.n_requests)
    return {k: Path(v) for k, v in members.items()}


# --------------------------------------------------------------------------------------------------
# entries of a dataset's download block


def _format(value, variables: Mapping[str, str]):
    if isinstance(value, str):
        try:
            return value.format(**variables)
        except KeyError as err:
            raise ValueError(f"download entry {value!r} uses {{{err.args[0]}}}, which is not defined for "
                             f"sample {variables.get('sample')!r}; add it under download.sample_vars") from err
    if isinstance(value, Mapping):
        return {_format(k, variables): _format(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_format(v, variables) for v in value]
    return value


def expand_entries(download: Mapping, samples: Iterable[str]) -> list[dict]:
    """Dataset-level ``files`` plus ``per_sample`` entries formatted for each sample.

    Placeholders: ``{sample}`` and every key of ``download.sample_vars[sample]``. Raises ValueError for an
    undefined placeholder (naming the entry and the sample).
    """
    entries = [dict(e) for e in download.get("files", []) or []]
    sample_vars = download.get("sample_vars", {}) or {}
    for s in samples:
        variables = {"sample": s, **{k: str(v) for k, v in (sample_vars.get(s) or {}).items()}}
        for e in download.get("per_sample", []) or []:
            entries.append(_format(dict(e), variables))
    for e in entries:
        if "dest" not in e and "members" not in e:
            raise ValueError(f"download entry {e} has neither `dest` nor `members`")
        if not e.get("manual") and "url" not in e:
            raise ValueError(f"download entry {e} has no `url`; set `manual: true` if it must be placed by hand")
    return entries


def _gunzip(src: Path, dest: Path) -> None:
    part = dest.with_name(dest.name + ".part")
    with gzip.open(src, "rb") as fi, open(part, "wb") as fo:
        shutil.copyfileobj(fi, fo, length=16 * CHUNK)
    os.replace(part, dest)


def _extract(archive: Path, kind: str, to: Path) -> None:
    to.mkdir(parents=True, exist_ok=True)
    marker = to / f".extracted_{archive.name}"
    if marker.exists():
        return
    if kind == "tar":
        with tarfile.open(archive) as tf:
            tf.extractall(to, filter="data")
    elif kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(to)
    else:
        raise ValueError(f"unknown extract kind {kind!r} for {archive} (use tar or zip)")
    marker.write_text(sha256_file(archive) + "\n")
    log.info("extracted %s into %s", archive, to)


def fetch_entries(entries: Sequence[Mapping], dest_dir: str | Path, lock: LockFile | None = None) -> list[Path]:
    """Obtain every entry (download, remote-ZIP members, or check a manual file), verifying the lock.

    Files already on disk are never downloaded again; they are hashed and checked against the lock (or
    recorded when new). A failing entry does not stop the others: all problems are reported together at the
    end — :class:`ChecksumError` if any file fails verification, else :class:`DownloadAuthError` if every
    failure is a login/terms refusal, else :class:`DownloadError`; missing manual files alone give
    :class:`ManualDownloadRequired` (where to get each file and where to put it).
    Returns the list of local files covered by the lock.
    """
    dest_dir = Path(dest_dir)
    lock = lock or LockFile(dest_dir / LOCK_NAME)
    done: list[Path] = []
    missing_manual: list[str] = []
    failures: list[DownloadError] = []
    for e in tqdm(entries, desc="download entries", unit="entry", disable=len(entries) < 2):
        try:
            _fetch_one(e, dest_dir, lock, done, missing_manual)
        except DownloadError as err:  # keep going: report every problem of the dataset at once
            log.error("%s", err)
            failures.append(err)
    manual_msg = (
        f"{len(missing_manual)} file(s) cannot be downloaded automatically (no public direct URL, a login, "
        "or terms to accept). Get them by hand and place them here, then rerun the download rule:\n"
        + "".join(missing_manual)
    ) if missing_manual else ""
    if failures:
        kind = ChecksumError if any(isinstance(f, ChecksumError) for f in failures) else (
            DownloadAuthError if all(isinstance(f, DownloadAuthError) for f in failures) else DownloadError)
        raise kind(f"{len(failures)} download problem(s):\n" + "\n".join(f"  - {f}" for f in failures)
                   + ("\n" + manual_msg if manual_msg else ""))
    if missing_manual:
        raise ManualDownloadRequired(manual_msg)
    return done


def _fetch_one(e: Mapping, dest_dir: Path, lock: LockFile, done: list, missing_manual: list) -> None:
    auth, landing = e.get("auth"), e.get("source")
    if e.get("members"):
        members = {k: dest_dir / v for k, v in e["members"].items()}
        extract_remote_zip_members(e["url"], members, auth=auth, landing=landing)
        for k, p in members.items():
            verify_or_record(lock, p, f"{e['url']}#{k}")
            done.append(p)
        return
    dest = dest_dir / e["dest"]
    if e.get("manual"):
        if dest.exists():
            verify_or_record(lock, dest, "manual:" + str(landing or ""))
            done.append(dest)
        else:
            missing_manual.append(
                f"  - {dest}\n      from: {landing or '(see docs/datasets.md)'}\n"
                + (f"      how:  {e['instructions']}\n" if e.get("instructions") else "")
            )
        return
    url = e["url"]
    if not dest.exists():
        if e.get("decompress") == "gunzip":
            gz = dest.with_name(dest.name + ".gz")
            download_file(url, gz, auth=auth, landing=landing)
            _gunzip(gz, dest)
            if not e.get("keep_archive", False):
                gz.unlink()
        elif e.get("decompress"):
            raise ValueError(f"{url}: unknown decompress {e['decompress']!r} (only gunzip)")
        else:
            download_file(url, dest, auth=auth, landing=landing)
    verify_or_record(lock, dest, url)
    done.append(dest)
    if e.get("extract"):
        _extract(dest, e["extract"], dest_dir / e.get("extract_to", Path(e["dest"]).parent))


def dataset_samples(params: Mapping) -> list[str]:
    """Samples a dataset builds: ``samples`` if given, else the union of ``splits[s]`` for ``build_splits``."""
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


def download_dataset(name: str, params: Mapping) -> list[Path]:
    """Run the ``download`` block of dataset ``name`` (see module docstring). Raises KeyError if absent."""
    if "download" not in params:
        raise KeyError(f"dataset {name!r} has no `download` block in the config")
    dl = params["download"]
    dest_dir = Path(dl.get("dest_dir") or f"resources/{name}")
    samples = dl.get("samples") or dataset_samples(params)
    entries = expand_entries(dl, samples)
    log.info("%s: %d download entries for %d samples %s into %s", name, len(entries), len(samples), samples, dest_dir)
    return fetch_entries(entries, dest_dir, LockFile(dest_dir / LOCK_NAME))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: download (or verify) one dataset's raw files; touch ``--flag`` on success."""
    from workflow_scripts.io import setup_logging

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", help="dataset name (with --params)")
    ap.add_argument("--params", help="the dataset's config entry as one JSON string")
    ap.add_argument("--verify-lock", help="only re-hash the files of this lock file (no download)")
    ap.add_argument("--flag", help="file to write (list of files) when everything is present and verified")
    ap.add_argument("--log", required=True)
    args = ap.parse_args(argv)
    setup_logging(args.log)
    if not args.verify_lock and not (args.dataset and args.params):
        ap.error("give --dataset and --params, or --verify-lock")
    try:
        if args.verify_lock:
            files = verify_lock(args.verify_lock)
        else:
            files = download_dataset(args.dataset, json.loads(args.params))
    except DownloadError as err:
        log.error("%s: %s", args.dataset, err)
        return 1
    if args.flag:
        Path(args.flag).parent.mkdir(parents=True, exist_ok=True)
        Path(args.flag).write_text("".join(f"{p}\n" for p in files))
    log.info("%s: %d files present and verified", args.dataset or args.verify_lock, len(files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
