"""Helpers to run the real Snakefile from tests in an isolated working directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def workdir(tmp_path: Path) -> Path:
    """A working directory that sees the repo's resources/ (symlinked); results and logs land in it."""
    wd = tmp_path / "wd"
    wd.mkdir(exist_ok=True)
    link = wd / "resources"
    if not link.exists():
        link.symlink_to(REPO / "resources")
    return wd


def snakemake(wd: Path, *args: str, configfile: str | Path | None = None, timeout: int = 1800) -> subprocess.CompletedProcess:
    """Run ``python -m snakemake`` with the repo's Snakefile in ``wd``; returns the completed process."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(wd)]
    cmd += list(args)
    if configfile:  # last: --configfile takes several values and would swallow targets
        cmd += ["--configfile", str(configfile)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=wd, capture_output=True, text=True, timeout=timeout, env=env)


def job_counts(stdout: str) -> dict[str, int]:
    """Parse the 'job  count' table that ``snakemake -n --quiet rules`` prints."""
    counts: dict[str, int] = {}
    in_table = False
    for line in stdout.splitlines():
        if re.match(r"^job\s+count", line):
            in_table, counts = True, {}
            continue
        if in_table:
            m = re.match(r"^([A-Za-z_][\w]*)\s+(\d+)$", line.strip())
            if m:
                if m.group(1) == "total":
                    in_table = False
                    continue
                counts[m.group(1)] = int(m.group(2))
            elif line.strip() and not line.startswith("-"):
                in_table = False
    return counts
