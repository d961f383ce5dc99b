"""Downloads (workflow_scripts.data.download, rules/download.smk) against a local HTTP server (127.0.0.1, a thread)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from workflow_scripts.data import download as dl

REPO = Path(__file__).resolve().parents[1]


class _Server:
    """Serves ``files`` {path: bytes} with HEAD and ``Range`` support; logs (method, path, range, bytes sent)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.html: set[str] = set()
        self.forbidden: set[str] = set()
        self.cut_next: dict[str, int] = {}  # path -> bytes to send before dropping the connection (once)
        self.no_range: set[str] = set()
        self.log: list[tuple[str, str, str | None, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _status(self, code, **headers):
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k.replace("_", "-"), v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self):
                path = self.path
                server.log.append(("HEAD", path, None, 0))
                if path in server.forbidden or path not in server.files:
                    return self._status(403 if path in server.forbidden else 404)
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.files[path])))
                self.send_header("Accept-Ranges", "none" if path in server.no_range else "bytes")
                self.end_headers()

            def do_GET(self):
                path = self.path
                rng = self.headers.get("Range")
                if path in server.forbidden or path not in server.files:
                    server.log.append(("GET", path, rng, 0))
                    return self._status(403 if path in server.forbidden else 404)
                data = server.files[path]
                start, end, status = 0, len(data) - 1, 200
                if rng and path not in server.no_range:
                    a, b = rng.split("=")[1].split("-")
                    start, end, status = int(a), min(int(b) if b else len(data) - 1, len(data) - 1), 206
                body = data[start : end + 1]
                self.send_response(status)
                self.send_header("Content-Type", "text/html" if path in server.html else "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                cut = server.cut_next.pop(path, None)
                server.log.append(("GET", path, rng, len(body) if cut is None else cut))
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

    def gets(self, path: str | None = None) -> list[tuple]:
        return [r for r in self.log if r[0] == "GET" and (path is None or r[1] == path)]

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


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _lock(dest_dir: Path) -> dict:
    return dl.LockFile(dest_dir / dl.LOCK_NAME).read()


# --------------------------------------------------------------------------------------------------- fetch


def test_fetch_pins_sha256_and_a_completed_file_is_never_fetched_twice(server, tmp_path):
    data = _payload(300_000)
    server.files["/a.bin"] = data
    entry = {"url": server.url + "/a.bin", "dest": "raw/a.bin"}
    assert dl.fetch_url(entry, tmp_path) == [tmp_path / "raw/a.bin"]
    dest = tmp_path / "raw/a.bin"
    assert dest.read_bytes() == data
    row = _lock(tmp_path)["raw/a.bin"]
    assert (row["sha256"], int(row["size"]), row["source"]) == (_sha(data), len(data), server.url + "/a.bin")
    cached = next((tmp_path / "cache").iterdir())
    assert cached.name.endswith("-a.bin") and cached.stat().st_ino == dest.stat().st_ino  # hard link: no extra disk
    assert len(server.gets()) == 1
    # Snakemake deletes the outputs of a job it reruns (-f, changed rule): the cache serves it, no request
    dest.unlink()
    dl.fetch_url(entry, tmp_path)
    assert dest.read_bytes() == data and len(server.gets()) == 1


def test_corrupted_file_is_detected_and_named(server, tmp_path):
    data = _payload(40_000, seed=3)
    server.files["/d.bin"] = data
    entry = {"url": server.url + "/d.bin", "dest": "raw/d.bin"}
    dl.fetch_url(entry, tmp_path)
    dest = tmp_path / "raw/d.bin"
    raw = bytearray(data)
    raw[1234] ^= 0xFF
    with open(dest, "r+b") as fh:  # in place: the cached copy (same inode) is corrupted too
        fh.write(bytes(raw))
    # the offline check of download_<dataset> names the file, the pinned hash and the fix
    with pytest.raises(dl.ChecksumError) as err:
        dl.verify_files(tmp_path, [dest])
    msg = str(err.value)
    assert str(dest) in msg and _sha(data) in msg and "Delete" in msg and dl.LOCK_NAME in msg
    assert dl.main(["verify", "--lock", str(tmp_path / dl.LOCK_NAME), "--log", str(tmp_path / "v.log")]) == 1
    assert str(dest) in (tmp_path / "v.log").read_text()
    # a rerun of the fetch job (output deleted) finds the corrupt cache file and names it instead of using it
    dest.unlink()
    with pytest.raises(dl.ChecksumError, match="cached download of") as err:
        dl.fetch_url(entry, tmp_path)
    cached = next((tmp_path / "cache").iterdir())
    assert str(cached) in str(err.value) and not dest.exists()
    cached.unlink()  # the fix the message gives: delete it and rerun
    dl.fetch_url(entry, tmp_path)
    assert dest.read_bytes() == data and len(server.gets()) == 2


def test_new_download_differing_from_the_pinned_sha256_fails(server, tmp_path):
    server.files["/v.csv"] = b"a,b\n1,2\n"
    entry = {"url": server.url + "/v.csv", "dest": "v.csv"}
    dl.fetch_url(entry, tmp_path)
    server.files["/v.csv"] = b"a,b\n1,3\n"  # the provider replaced the file
    (tmp_path / "v.csv").unlink()
    for f in (tmp_path / "cache").iterdir():
        f.unlink()
    with pytest.raises(dl.ChecksumError, match="pinned in .*download.lock.tsv.*delete the line 'v.csv'"):
        dl.fetch_url(entry, tmp_path)
    assert not (tmp_path / "v.csv").exists()


def test_published_known_hash_is_checked_by_pooch(server, tmp_path):
    data = b"x" * 5000
    server.files["/k.bin"] = data
    ok = {"url": server.url + "/k.bin", "dest": "k.bin", "known_hash": "sha256:" + _sha(data)}
    dl.fetch_url(ok, tmp_path / "ok")
    assert (tmp_path / "ok/k.bin").read_bytes() == data
    bad = dict(ok, known_hash="md5:" + "0" * 32)
    with pytest.raises(dl.ChecksumError, match="known_hash md5:0000"):
        dl.fetch_url(bad, tmp_path / "bad", retries=0)
    assert not (tmp_path / "bad/k.bin").exists() and not any((tmp_path / "bad/cache").iterdir())


def test_interrupted_transfer_leaves_no_partial_file(server, tmp_path):
    data = _payload(200_000, seed=1)
    server.files["/b.bin"] = data
    server.cut_next["/b.bin"] = 50_000  # the first response drops the connection after 50 kB
    dl.fetch_url({"url": server.url + "/b.bin", "dest": "b.bin"}, tmp_path)
    assert (tmp_path / "b.bin").read_bytes() == data
    # pooch retried from the first byte (no Range) and left only the complete file in its cache
    assert [r[2] for r in server.gets()] == [None, None]
    cached = os.listdir(tmp_path / "cache")
    assert len(cached) == 1 and cached[0].endswith("-b.bin")


def test_http_errors_name_the_cause_and_the_fix(server, tmp_path):
    server.files["/terms.tif"] = b"<!DOCTYPE html><html>accept the terms</html>"
    server.forbidden.add("/gated.bin")
    with pytest.raises(dl.DownloadAuthError, match="HTML page instead of the file") as err:
        dl.fetch_url({"url": server.url + "/terms.tif", "dest": "t.tif"}, tmp_path, retries=0)
    assert str(tmp_path / "t.tif") in str(err.value)
    with pytest.raises(dl.DownloadAuthError, match="HTTP 403.*needs a login at the portal"):
        dl.fetch_url({"url": server.url + "/gated.bin", "dest": "g.bin", "auth": "needs a login at the portal"},
                     tmp_path, retries=0)
    with pytest.raises(dl.DownloadError, match="404.*landing.example"):
        dl.fetch_url({"url": server.url + "/nope.bin", "dest": "n.bin", "source": "https://landing.example"},
                     tmp_path, retries=0)
    with socket.socket() as s:  # a port nobody listens on: the machine looks offline
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(dl.DownloadError, match="offline.*place the file by hand at .*o.bin"):
        dl.fetch_url({"url": f"http://127.0.0.1:{closed}/o.bin", "dest": "o.bin"}, tmp_path, retries=0)
    assert not any(p.is_file() for p in tmp_path.rglob("*") if p.name != dl.LOCK_NAME)


def test_gunzip_and_tar_extraction(server, tmp_path):
    raw = _payload(20_000, seed=5)
    server.files["/img.tif.gz"] = gzip.compress(raw)
    tbuf = io.BytesIO()
    payload = b'{"type": "FeatureCollection", "features": []}'
    with tarfile.open(fileobj=tbuf, mode="w:gz") as tf:
        info = tarfile.TarInfo("annotations/S1.geojson")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    server.files["/ann.tar.gz"] = tbuf.getvalue()
    dl.fetch_url({"url": server.url + "/img.tif.gz", "dest": "raw/S1/img.tif", "decompress": "gunzip"}, tmp_path)
    out = dl.fetch_url({"url": server.url + "/ann.tar.gz", "dest": "raw/ann.tar.gz", "extract": "tar",
                        "extract_to": "raw/ann"}, tmp_path)
    assert out == [tmp_path / "raw/ann.tar.gz", tmp_path / "raw/ann"]
    assert (tmp_path / "raw/S1/img.tif").read_bytes() == raw
    assert (tmp_path / "raw/ann/annotations/S1.geojson").read_bytes() == payload
    assert _lock(tmp_path)["raw/S1/img.tif"]["sha256"] == _sha(raw)  # the lock pins what prepare reads


# --------------------------------------------------------------------------------------------------- remote ZIP


def _outs_zip(big: bytes, small: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("outs/morphology.ome.tif", big)
        zf.writestr("outs/experiment.xenium", small)
        zf.writestr("outs/cells.parquet", b"PAR1" + small)
    return buf.getvalue()


def test_remote_zip_members_fetch_only_their_bytes(server, tmp_path):
    big = _payload(3_000_000, seed=4)  # stands in for the multi-GB morphology images of a Xenium outs.zip
    small = json.dumps({"pixel_size": 0.2125}).encode()
    server.files["/outs.zip"] = _outs_zip(big, small)
    e = {"url": server.url + "/outs.zip",
         "members": {"experiment.xenium": "raw/S/experiment.xenium", "outs/cells.parquet": "raw/S/cells.parquet"}}
    out = dl.fetch_members(e, tmp_path, block_size=64 * 1024)
    assert out == [tmp_path / "raw/S/experiment.xenium", tmp_path / "raw/S/cells.parquet"]
    assert (tmp_path / "raw/S/experiment.xenium").read_bytes() == small
    assert (tmp_path / "raw/S/cells.parquet").read_bytes() == b"PAR1" + small
    sent = sum(r[3] for r in server.gets("/outs.zip"))
    assert 0 < sent < len(big) / 10, f"{sent} bytes fetched of a {len(server.files['/outs.zip'])}-byte archive"
    assert {r[2] is not None for r in server.gets("/outs.zip")} == {True}  # range requests only
    assert _lock(tmp_path)["raw/S/cells.parquet"]["sha256"] == _sha(b"PAR1" + small)
    # a rerun (outputs deleted by Snakemake) reads nothing remotely
    n = len(server.log)
    for f in out:
        f.unlink()
    dl.fetch_members(e, tmp_path)
    assert len(server.log) == n and (tmp_path / "raw/S/experiment.xenium").read_bytes() == small
    with pytest.raises(dl.DownloadError, match="matches 0 entries"):
        dl.fetch_members({"url": e["url"], "members": {"missing.h5": "m.h5"}}, tmp_path)


def test_remote_zip_without_range_support_says_what_to_do(server, tmp_path):
    server.files["/plain.zip"] = _outs_zip(_payload(300_000), b"{}")
    server.no_range.add("/plain.zip")
    with pytest.raises(dl.DownloadError, match="Remove `members:`"):
        dl.fetch_members({"url": server.url + "/plain.zip", "members": {"experiment.xenium": "e.x"}}, tmp_path,
                         block_size=64 * 1024)


# --------------------------------------------------------------------------------------------------- manual files


def test_manual_file_names_where_it_goes_then_is_pinned(tmp_path):
    entry = {"manual": True, "dest": "raw/S1/x.csv", "source": "https://landing.example/S1",
             "instructions": "log in and download S1"}
    other = str(tmp_path / "raw/S2/x.csv")
    with pytest.raises(dl.ManualDownloadRequired) as err:
        dl.check_manual(entry, tmp_path, [str(tmp_path / "raw/S1/x.csv"), other])
    msg = str(err.value)
    assert str(tmp_path / "raw/S1/x.csv") in msg and "https://landing.example/S1" in msg
    assert "log in and download S1" in msg and other in msg
    (tmp_path / "raw/S1").mkdir(parents=True)
    (tmp_path / "raw/S1/x.csv").write_text("a,b\n1,S1\n")
    assert dl.check_manual(entry, tmp_path) == tmp_path / "raw/S1/x.csv"
    row = _lock(tmp_path)["raw/S1/x.csv"]
    assert row["sha256"] == _sha(b"a,b\n1,S1\n") and row["source"].startswith("manual:")


# --------------------------------------------------------------------------------------------------- the plan


def test_plan_of_the_paper_config():
    cfg = yaml.safe_load(open(REPO / "config/paper.yaml"))["datasets"]
    plans = {d: {r.name: r for r in dl.plan_downloads(d, cfg[d])} for d in ("lung", "breast", "thymus")}
    breast = plans["breast"]
    assert set(breast) == {"fetch_breast_outs_zip", "fetch_breast_he_image_ome_tif",
                           "fetch_breast_he_imagealignment_csv", "manual_breast_regions_geojson"}
    outs = breast["fetch_breast_outs_zip"]
    assert outs.kind == "members" and outs.samples == ("Sample2",)
    assert outs.outputs == ["resources/breast/raw/{sample}/cell_feature_matrix.h5",
                            "resources/breast/raw/{sample}/cells.parquet",
                            "resources/breast/raw/{sample}/cells.zarr.zip",
                            "resources/breast/raw/{sample}/experiment.xenium"]
    job = json.loads(outs.params({"sample": "Sample2"}))
    assert job["url"] == ("https://cf.10xgenomics.com/samples/xenium/1.4.0/Xenium_V1_FFPE_Preview_Human_Breast_"
                          "Cancer_Sample_2/Xenium_V1_FFPE_Preview_Human_Breast_Cancer_Sample_2_outs.zip")
    assert "source" not in job  # a fetch job's parameters are only what its files depend on
    lung = plans["lung"]
    assert lung["manual_lung_regions_geojson"].needs == ["resources/lung/raw/he_annotations"]
    assert len(lung["manual_lung_transcripts_csv_gz"].files()) == 7  # the test donors
    assert lung["fetch_lung_gse250346_he_annotations_tar_gz"].files() == [
        "resources/lung/raw/GSE250346_HE_annotations.tar.gz", "resources/lung/raw/he_annotations"]
    assert {r.kind for r in plans["thymus"].values()} == {"manual"}
    # prepare's inputs are exactly files that these rules produce
    from workflow_scripts.data import input_files

    for d in ("lung", "breast", "thymus"):
        produced = set(dl.download_outputs(d, cfg[d]))
        inputs = [f for f in input_files(cfg[d], d) if not f.startswith("resources/gene_maps")]
        assert inputs and set(inputs) <= produced, (d, set(inputs) - produced)


@pytest.mark.parametrize(
    "block, match",
    [
        ({"files": [{"url": "https://h/a", "dest": "a", "sha": "x"}]}, r"files\[0\]: unknown key.*sha"),
        ({"per_sample": [{"dest": "raw/{sample}.x"}]}, r"per_sample\[0\]: no `url`"),
        ({"per_sample": [{"url": "https://h/{tenx}.zip", "dest": "{sample}.zip"}]}, "tenx.*sample 'X'"),
        ({"per_sample": [{"manual": True, "dest": "raw/same.csv"}]}, "must contain {sample}"),
        ({"files": [{"manual": True, "dest": "a"}, {"url": "https://h/a", "dest": "a"}]}, "output of two entries"),
        ({"files": [{"manual": True, "dest": "a", "needs": ["b"]}]}, "`needs` names resources/toy/b"),
        ({"dest": "x"}, r"datasets.toy.download: unknown key.*dest"),
    ],
)
def test_plan_errors_name_the_key(block, match):
    with pytest.raises(ValueError, match=match):
        dl.plan_downloads("toy", {"samples": ["X"], "download": block})


# --------------------------------------------------------------------------------------------------- as Snakemake jobs

SNAKEFILE = """
configfile: "config.yaml"


include: "{rules}"
"""


def _smk(wd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(wd / "Snakefile"), "--directory", str(wd),
           "--cores", "1", *args]
    return subprocess.run(cmd, cwd=wd, capture_output=True, text=True, timeout=300)


def test_download_jobs_fetch_once_verify_and_list_manual_files(server, tmp_path):
    data, small = _payload(30_000, seed=7), b'{"pixel_size": 0.2125}'
    server.files["/meta.csv"] = data
    server.files["/S1_outs.zip"] = _outs_zip(_payload(200_000, seed=8), small)
    cfg = {"datasets": {"toy": {"reader": "xenium", "samples": ["S1", "S2"], "download": {
        "dest_dir": "res/toy",
        "sample_vars": {"S1": {"zip": "S1_outs.zip"}, "S2": {"zip": "S1_outs.zip"}},
        "files": [{"url": server.url + "/meta.csv", "dest": "raw/meta.csv"}],
        "per_sample": [
            {"url": server.url + "/{zip}", "members": {"experiment.xenium": "raw/{sample}/experiment.xenium"}},
            {"manual": True, "dest": "raw/{sample}/regions.geojson", "source": "https://annotations.example",
             "instructions": "annotate {sample} and export GeoJSON"},
        ]}}}}
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    (wd / "Snakefile").write_text(textwrap.dedent(SNAKEFILE.format(rules=REPO / "rules" / "download.smk")))
    r = _smk(wd, "--keep-going", "download_toy")
    assert r.returncode != 0
    # the public files are in place with their pinned sha256
    assert (wd / "res/toy/raw/meta.csv").read_bytes() == data
    assert (wd / "res/toy/raw/S2/experiment.xenium").read_bytes() == small
    assert _lock(wd / "res/toy")["raw/meta.csv"]["sha256"] == _sha(data)
    # each missing manual file fails its own job, whose log says where it goes and how to get it
    for s in ("S1", "S2"):
        text = (wd / f"logs/download/toy/manual_toy_regions_geojson/{s}.log").read_text()
        assert f"res/toy/raw/{s}/regions.geojson" in text and f"annotate {s} and export GeoJSON" in text
        assert "https://annotations.example" in text
        assert "manual_toy_regions_geojson" in r.stdout + r.stderr
    n_requests = len(server.log)
    for s in ("S1", "S2"):
        (wd / f"res/toy/raw/{s}/regions.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    r = _smk(wd, "download_toy")
    assert r.returncode == 0, r.stderr
    assert len(server.log) == n_requests  # a second run fetches nothing
    assert "raw/S2/regions.geojson" in _lock(wd / "res/toy")  # files placed by hand are pinned too
    # a forced rerun of a manual job keeps the hand-placed file (update flag)
    r = _smk(wd, "-f", "res/toy/raw/S1/regions.geojson")
    assert r.returncode == 0, r.stderr
    assert (wd / "res/toy/raw/S1/regions.geojson").exists()
    # a file changed on disk is named by the next download_toy
    (wd / "res/toy/raw/S1/regions.geojson").write_text("{}")
    r = _smk(wd, "download_toy")
    assert r.returncode != 0
    assert "res/toy/raw/S1/regions.geojson: sha256" in (wd / "logs/download/toy.log").read_text()
