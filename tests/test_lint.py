"""The Snakefile and rules are formatted (snakefmt) and pass `snakemake --lint` (as the workflow catalog checks)."""

import subprocess
import sys

from workflow_utils import REPO


def test_snakefmt_check():
    r = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "rules/"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_snakemake_lint_is_clean():
    r = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_every_rule_with_a_command_has_the_pinned_conda_env():
    import re

    for smk in (REPO / "rules").glob("*.smk"):
        text = smk.read_text()
        for block in re.split(r"\n(?=rule |checkpoint )", text):
            if block.startswith(("rule ", "checkpoint ")) and re.search(r"\n    (shell|script|run):", block):
                assert 'conda:\n        "../envs/cellsynergy.yaml"' in block or "\n    run:" in block, (smk.name, block[:60])
