"""Damaged input data fails with a message that names the file and what is wrong, in the terminal and in the log."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from workflow_scripts.data.her2st import read_her2st
from workflow_scripts.data.patches import open_slide, patch_reader
from workflow_scripts.io import DataFileError, read_table

SECTION = "C2"  # 187 spots, no pathologist labels: the smallest set of files


@pytest.fixture
def her2st_copy(repo, tmp_path):
    """A HER2ST resource folder with section C2's files linked from the repository (replace one to damage it)."""
    src = repo / "resources/her2st"
    dst = tmp_path / "her2st"
    (dst / "clusters").mkdir(parents=True)
    (dst / "sections.tsv").symlink_to(src / "sections.tsv")
    (dst / "clusters/harmonisation.tsv").symlink_to(src / "clusters/harmonisation.tsv")
    row = pd.read_csv(src / "sections.tsv", sep="\t", dtype=str).set_index("section").loc[SECTION]
    for col in ("counts_path", "spots_path", "clusters_path", "deconv_path", "image_path"):
        (dst / row[col]).parent.mkdir(parents=True, exist_ok=True)
        if not (dst / row[col]).exists():
            (dst / row[col]).symlink_to(src / row[col])
    return dst, row


def replace(path, data: bytes):
    path.unlink()
    path.write_bytes(data)


def test_intact_copy_reads(her2st_copy):
    dst, _ = her2st_copy
    assert read_her2st(dst, sections=[SECTION]).n_obs == 187


def test_missing_column_in_spots_file_names_file_and_columns(her2st_copy):
    dst, row = her2st_copy
    spots = dst / row["spots_path"]
    table = pd.read_csv(spots, sep="\t").drop(columns=["pixel_x"])
    spots.unlink()
    table.to_csv(spots, sep="\t", index=False)
    with pytest.raises(DataFileError) as e:
        read_her2st(dst, sections=[SECTION])
    msg = str(e.value)
    assert str(spots) in msg and "missing column(s) ['pixel_x']" in msg and "'pixel_y'" in msg
    assert "git checkout -- resources/her2st" in msg


def test_truncated_gzip_counts_file(her2st_copy):
    dst, row = her2st_copy
    counts = dst / row["counts_path"]
    data = counts.read_bytes()
    replace(counts, data[: len(data) // 2])
    with pytest.raises(DataFileError, match="truncated or corrupt") as e:
        read_her2st(dst, sections=[SECTION])
    assert str(counts) in str(e.value) and "EOFError" in str(e.value)


def test_read_table_on_empty_and_garbled_files(tmp_path):
    empty = tmp_path / "e.tsv"
    empty.write_text("")
    with pytest.raises(DataFileError, match="is empty"):
        read_table(empty, sep="\t")
    garbled = tmp_path / "g.tsv.gz"
    good = gzip.compress(("a\tb\n" + "1\t2\n" * 5000).encode())
    garbled.write_bytes(good[:40] + b"\xff" * 200 + good[240:])
    with pytest.raises(DataFileError, match=r"g\.tsv\.gz: the compressed file is truncated or corrupt"):
        read_table(garbled, sep="\t")
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        read_table(tmp_path / "nope.tsv")


def test_empty_section_list_is_an_error(repo):
    with pytest.raises(ValueError, match="sections is empty"):
        read_her2st(repo / "resources/her2st", sections=[])


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_is_named_when_opened_and_when_cutting_patches(tmp_path, tiny_spots, suffix):
    img = tmp_path / f"slide{suffix}"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(img)
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError, match="cannot be decoded") as e:
        open_slide(img)
    assert str(img) in str(e.value) and "truncated" in str(e.value)
    spots = tiny_spots.copy()
    spots.uns["slides"] = {**spots.uns["slides"], "S1": {"image_path": str(img), "um_per_px": 4.0}}
    with pytest.raises(DataFileError, match=str(img)):
        patch_reader(spots, patch_um=40)[0]


def test_truncated_tiff_is_named(tmp_path):
    import tifffile

    tif = tmp_path / "slide.tif"
    tifffile.imwrite(tif, np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8), tile=(128, 128),
                     compression="zlib")
    data = tif.read_bytes()
    tif.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataFileError, match=str(tif)):
        slide = open_slide(tif)
        slide.read_region(0, 0, 512, 512)


def test_cli_error_is_in_the_rule_log(her2st_copy, tmp_path):
    """The prepare CLI on a truncated counts file: exit code 1, and its log file holds the same message."""
    dst, row = her2st_copy
    counts = dst / row["counts_path"]
    data = counts.read_bytes()
    replace(counts, data[: len(data) // 2])
    log = tmp_path / "logs/prepare.log"
    params = {"reader": "her2st", "resource_dir": str(dst), "sections": [SECTION]}
    r = subprocess.run(
        [sys.executable, "-m", "workflow_scripts.data.prepare", "--dataset", "her2st", "--params", json.dumps(params),
         "--spots", str(tmp_path / "spots.h5ad"), "--cells", str(tmp_path / "cells.h5ad"), "--log", str(log)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 1
    expected = f"{counts}: the compressed file is truncated or corrupt"
    text = log.read_text()
    assert expected in r.stderr and expected in text
    assert "DataFileError" in text and "Traceback" in text
    assert not (tmp_path / "spots.h5ad").exists()
