"""Tests of workflow_scripts.data.download against a local HTTP server (127.0.0.1, a thread) with Range support."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from workflow_scripts.data import download as dl


class _Server:
    """Serves ``files`` {path: bytes}; honours ``Range: bytes=a-`` / ``a-b``; logs (path, range, bytes sent)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.html: set[str] = set()
        self.forbidden: set[str] = set()
        self.cut_next: dict[str, int] = {}  # path -> bytes to send before dropping the connection (once)
        self.no_range: set[str] = set()
        self.log: list[tuple[str, str | None, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                path = self.path
                rng = self.headers.get("Range")
                if path in server.forbidden or path not in server.files:
                    server.log.append((path, rng, 0))
                    self.send_response(403 if path in server.forbidden else 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files[path]
                start, end, status = 0, len(data) - 1, 200
                if rng and path not in server.no_range:
                    a, b = rng.split("=")[1].split("-")
                    start = int(a)
                    end = int(b) if b else len(data) - 1
                    if start >= len(data):
                        server.log.append((path, rng, 0))
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                body = data[start : end + 1]
                self.send_response(status)
                self.send_header("Content-Type", "text/html" if path in server.html else "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                cut = server.cut_next.pop(path, None)
                # log before writing: the client may act on the response before this thread continues
                server.log.append((path, rng, len(body) if cut is None else cut))
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = _Server()
    yield s
    s.close()


def _payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_interrupted_download_resumes_with_range(server, tmp_path):
    data = _payload(300_000)
    server.files["/a.bin"] = data
    server.cut_next["/a.bin"] = 120_000  # the first response drops the connection after 120 kB
    out = dl.download_file(server.url + "/a.bin", tmp_path / "a.bin", backoff_s=0, progress=False)
    assert out.read_bytes() == data
    assert not (tmp_path / "a.bin.part").exists()
    assert [r for _, r, _ in server.log] == [None, "bytes=120000-"]
    assert sum(n for _, _, n in server.log) == len(data)  # nothing fetched twice


def test_partial_file_from_a_killed_job_is_continued(server, tmp_path):
    data = _payload(50_000, seed=1)
    server.files["/b.bin"] = data
    (tmp_path / "b.bin.part").write_bytes(data[:20_000])
    dl.download_file(server.url + "/b.bin", tmp_path / "b.bin", backoff_s=0, progress=False)
    assert (tmp_path / "b.bin").read_bytes() == data
    assert server.log == [("/b.bin", "bytes=20000-", 30_000)]


def test_complete_part_file_is_finished_without_refetching(server, tmp_path):
    data = _payload(5_000, seed=6)
    server.files["/e.bin"] = data
    (tmp_path / "e.bin.part").write_bytes(data)  # killed after the last byte, before the rename
    dl.download_file(server.url + "/e.bin", tmp_path / "e.bin", backoff_s=0, progress=False)
    assert (tmp_path / "e.bin").read_bytes() == data
    assert server.log == [("/e.bin", "bytes=5000-", 0)]  # HTTP 416 with the total size: nothing re-sent


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    data = _payload(10_000, seed=2)
    server.files["/c.bin"] = data
    server.no_range.add("/c.bin")
    (tmp_path / "c.bin.part").write_bytes(b"garbage that must not survive")
    dl.download_file(server.url + "/c.bin", tmp_path / "c.bin", backoff_s=0, progress=False)
    assert (tmp_path / "c.bin").read_bytes() == data


def test_lock_records_sha256_then_detects_corruption(server, tmp_path):
    data = _payload(40_000, seed=3)
    server.files["/d.bin"] = data
    entries = dl.expand_entries({"files": [{"url": server.url + "/d.bin", "dest": "raw/d.bin"}]}, [])
    dl.fetch_entries(entries, tmp_path)
    lock = (tmp_path / "download.lock.tsv").read_text().splitlines()
    assert lock[0].split("\t") == list(dl.LOCK_COLUMNS)
    path, sha, size, source, _ = lock[1].split("\t")
    assert (path, sha, int(size), source) == ("raw/d.bin", hashlib.sha256(data).hexdigest(), len(data),
                                              server.url + "/d.bin")
    # a second run downloads nothing and verifies
    n_requests = len(server.log)
    dl.fetch_entries(entries, tmp_path)
    assert len(server.log) == n_requests
    # one flipped byte is caught, with the file, the recorded hash and the fix in the message
    raw = bytearray(data)
    raw[1234] ^= 0xFF
    (tmp_path / "raw/d.bin").write_bytes(bytes(raw))
    with pytest.raises(dl.ChecksumError) as err:
        dl.fetch_entries(entries, tmp_path)
    msg = str(err.value)
    assert "raw/d.bin" in msg and sha in msg and "Delete it" in msg
    # the offline check of a lock file finds it too
    with pytest.raises(dl.ChecksumError, match="1 of 1 files"):
        dl.verify_lock(tmp_path / "download.lock.tsv")
    assert dl.main(["--verify-lock", str(tmp_path / "download.lock.tsv"), "--log", str(tmp_path / "v.log")]) == 1
    (tmp_path / "raw/d.bin").write_bytes(data)
    assert dl.verify_lock(tmp_path / "download.lock.tsv") == [tmp_path / "raw/d.bin"]


def test_manual_files_are_listed_then_pinned(tmp_path):
    d = {"per_sample": [{"manual": True, "dest": "raw/{sample}/x.csv", "source": "https://landing.example/{sample}",
                         "instructions": "log in and download {sample}"}]}
    entries = dl.expand_entries(d, ["S1", "S2"])
    with pytest.raises(dl.ManualDownloadRequired) as err:
        dl.fetch_entries(entries, tmp_path)
    msg = str(err.value)
    for s in ("S1", "S2"):
        assert str(tmp_path / f"raw/{s}/x.csv") in msg and f"https://landing.example/{s}" in msg
        assert f"log in and download {s}" in msg
    for s in ("S1", "S2"):
        (tmp_path / f"raw/{s}").mkdir(parents=True)
        (tmp_path / f"raw/{s}/x.csv").write_text(f"a,b\n1,{s}\n")
    files = dl.fetch_entries(entries, tmp_path)
    assert len(files) == 2
    rows = dl.LockFile(tmp_path / "download.lock.tsv").rows
    assert rows["raw/S2/x.csv"]["sha256"] == hashlib.sha256(b"a,b\n1,S2\n").hexdigest()
    assert rows["raw/S2/x.csv"]["source"].startswith("manual:")


def test_login_and_terms_pages_give_clear_errors(server, tmp_path):
    server.files["/terms.tif"] = b"<html>accept the terms</html>"
    server.html.add("/terms.tif")
    server.forbidden.add("/gated.bin")
    with pytest.raises(dl.DownloadAuthError, match="HTML page instead of the file"):
        dl.download_file(server.url + "/terms.tif", tmp_path / "terms.tif", progress=False)
    with pytest.raises(dl.DownloadAuthError, match="HTTP 403.*needs a Hugging Face login"):
        dl.download_file(server.url + "/gated.bin", tmp_path / "g.bin", auth="needs a Hugging Face login",
                         progress=False)
    with pytest.raises(dl.DownloadError, match="404.*landing.example"):
        dl.download_file(server.url + "/nope.bin", tmp_path / "n.bin", landing="https://landing.example",
                         progress=False)


def test_remote_zip_members_fetch_only_their_bytes(server, tmp_path):
    big = _payload(3_000_000, seed=4)  # stands in for the multi-GB morphology images of a Xenium outs.zip
    small = json.dumps({"pixel_size": 0.2125}).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("outs/morphology.ome.tif", big)
        zf.writestr("outs/experiment.xenium", small)
        zf.writestr("outs/cells.parquet", b"PAR1" + small)
    server.files["/outs.zip"] = buf.getvalue()
    e = {"url": server.url + "/outs.zip", "members": {"experiment.xenium": "raw/S/experiment.xenium",
                                                       "outs/cells.parquet": "raw/S/cells.parquet"}}
    e["members"] = {k: tmp_path / v for k, v in e["members"].items()}
    dl.extract_remote_zip_members(e["url"], e["members"], block=64 * 1024)
    assert (tmp_path / "raw/S/experiment.xenium").read_bytes() == small
    assert (tmp_path / "raw/S/cells.parquet").read_bytes() == b"PAR1" + small
    sent = sum(n for p, _, n in server.log if p == "/outs.zip")
    assert sent < len(big) / 10, f"{sent} bytes fetched for a {len(buf.getvalue())}-byte archive"
    # through fetch_entries the members are pinned in the lock (already present: no new request)
    n = len(server.log)
    dl.fetch_entries([{"url": e["url"], "members": {"experiment.xenium": "raw/S/experiment.xenium"}}], tmp_path)
    assert len(server.log) == n
    assert "raw/S/experiment.xenium" in dl.LockFile(tmp_path / "download.lock.tsv").rows
    with pytest.raises(dl.DownloadError, match="matches 0 entries"):
        dl.extract_remote_zip_members(server.url + "/outs.zip", {"missing.h5": tmp_path / "m.h5"})


def test_gunzip_and_tar_extraction(server, tmp_path):
    raw = _payload(20_000, seed=5)
    server.files["/img.tif.gz"] = gzip.compress(raw)
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w:gz") as tf:
        info = tarfile.TarInfo("annotations/S1.geojson")
        payload = b'{"type": "FeatureCollection", "features": []}'
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    server.files["/ann.tar.gz"] = tbuf.getvalue()
    entries = [
        {"url": server.url + "/img.tif.gz", "dest": "raw/S1/img.tif", "decompress": "gunzip"},
        {"url": server.url + "/ann.tar.gz", "dest": "raw/ann.tar.gz", "extract": "tar", "extract_to": "raw/ann"},
    ]
    dl.fetch_entries(entries, tmp_path)
    assert (tmp_path / "raw/S1/img.tif").read_bytes() == raw
    assert not (tmp_path / "raw/S1/img.tif.gz").exists()
    assert (tmp_path / "raw/ann/annotations/S1.geojson").read_bytes() == payload
    rows = dl.LockFile(tmp_path / "download.lock.tsv").rows
    assert rows["raw/S1/img.tif"]["sha256"] == hashlib.sha256(raw).hexdigest()


def test_cli_downloads_test_split_only_and_writes_flag(server, tmp_path):
    for s in ("A", "B"):
        server.files[f"/{s}.bin"] = s.encode() * 100
    params = {
        "splits": {"train": ["A"], "test": ["B"]}, "build_splits": ["test"],
        "download": {"dest_dir": str(tmp_path / "res"),
                     "per_sample": [{"url": server.url + "/{sample}.bin", "dest": "raw/{sample}.bin"}]},
    }
    flag = tmp_path / "res/.download.done"
    rc = dl.main(["--dataset", "toy", "--params", json.dumps(params), "--flag", str(flag),
                  "--log", str(tmp_path / "dl.log")])
    assert rc == 0 and flag.exists()
    assert (tmp_path / "res/raw/B.bin").exists() and not (tmp_path / "res/raw/A.bin").exists()
    params["download"]["per_sample"].append({"manual": True, "dest": "raw/{sample}.extra"})
    rc = dl.main(["--dataset", "toy", "--params", json.dumps(params), "--log", str(tmp_path / "dl2.log")])
    assert rc == 1
    assert "raw/B.extra" in (tmp_path / "dl2.log").read_text()


def test_undefined_placeholder_is_reported():
    with pytest.raises(ValueError, match="tenx.*sample 'X'"):
        dl.expand_entries({"per_sample": [{"url": "https://h/{tenx}.zip", "dest": "a"}]}, ["X"])
