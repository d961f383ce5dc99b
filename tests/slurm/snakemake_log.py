"""Read what a ``snakemake --executor slurm --verbose`` run printed: job blocks, sbatch calls, SLURM job ids.

The SLURM executor plugin (2.8.0) logs, per submission, ``sbatch call: sbatch ... --wrap="<jobstep command>"``
(debug level, hence ``--verbose``) and then ``Job <id> has been submitted with SLURM jobid <n> (log: <path>)``;
Snakemake prints a block per job (``rule <name>:`` followed by indented ``key: value`` lines, among them
``wildcards`` and ``resources``). The jobstep command names the Snakemake jobs a submission runs with
``--target-jobs 'rule:key=value,...'`` (several for a group job).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

_BLOCK_HEAD = re.compile(r"^(\s*)(localrule|rule) (\w+):\s*$")
_FIELD = re.compile(r"^(\s+)(\w+): (.*)$")
_SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (.+)\)\.")
_RUN_ID = re.compile(r"SLURM run ID: ([0-9a-f-]+)")


def _pairs(text: str, sep: str = ", ") -> dict[str, str]:
    out = {}
    for item in text.split(sep) if text else []:
        k, eq, v = item.partition("=")
        if eq:
            out[k.strip()] = v.strip()
    return out


def job_key(rule: str, wildcards: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Hashable identity of a Snakemake job: its rule and sorted wildcards."""
    return rule, tuple(sorted(wildcards.items()))


@dataclass
class JobBlock:
    """One job as Snakemake printed it: rule, local or not, wildcards and resources (values as strings)."""

    rule: str
    local: bool
    wildcards: dict[str, str] = field(default_factory=dict)
    resources: dict[str, str] = field(default_factory=dict)
    threads: int = 1

    @property
    def key(self):
        return job_key(self.rule, self.wildcards)

    @property
    def gpu(self) -> int:
        return int(self.resources.get("gpu", 0) or 0)


def parse_job_blocks(text: str) -> dict[tuple, JobBlock]:
    """Every job block in ``text``, keyed by :func:`job_key` (a job printed again on a retry is kept once)."""
    blocks: dict[tuple, JobBlock] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _BLOCK_HEAD.match(lines[i])
        if not m:
            i += 1
            continue
        indent = len(m.group(1))
        block = JobBlock(rule=m.group(3), local=m.group(2) == "localrule")
        i += 1
        while i < len(lines):
            f = _FIELD.match(lines[i])
            if not f or len(f.group(1)) <= indent:
                break
            key, val = f.group(2), f.group(3)
            if key == "wildcards":
                block.wildcards = _pairs(val)
            elif key == "resources":
                block.resources = _pairs(val)
            elif key == "threads":
                block.threads = int(val)
            i += 1
        blocks.setdefault(block.key, block)
    return blocks


@dataclass
class Submission:
    """One sbatch call of the plugin: its options, the Snakemake jobs it runs, and the SLURM job id."""

    argv: list[str]
    targets: list[tuple]
    output_pattern: str
    slurm_jobid: str | None = None

    def option(self, name: str) -> str | None:
        """Value of an sbatch option given as ``--name value``, ``--name=value`` or ``-x value``."""
        for k, tok in enumerate(self.argv):
            if tok == name and k + 1 < len(self.argv):
                return self.argv[k + 1]
            if tok.startswith(name + "="):
                return tok.split("=", 1)[1]
        return None

    @property
    def line(self) -> str:
        """The sbatch call without the (long) --wrap payload."""
        return " ".join(shlex.quote(a) for a in self.argv if not a.startswith("--wrap="))


def _targets(wrap: str) -> list[tuple]:
    argv = shlex.split(wrap)
    out = []
    if "--target-jobs" in argv:
        for tok in argv[argv.index("--target-jobs") + 1:]:
            if tok.startswith("--"):
                break
            rule, _, wc = tok.partition(":")
            out.append(job_key(rule, _pairs(wc, ",")))
    return out


def parse_submissions(text: str) -> list[Submission]:
    """Every sbatch call in ``text`` with its SLURM job id (matched through the job's log path)."""
    subs: list[Submission] = []
    for line in text.splitlines():
        if "sbatch call: " in line:
            argv = shlex.split(line.split("sbatch call: ", 1)[1])
            wrap = next((a.split("=", 1)[1] for a in argv if a.startswith("--wrap=")), "")
            sub = Submission(argv=argv, targets=_targets(wrap), output_pattern="")
            sub.output_pattern = sub.option("--output") or ""
            subs.append(sub)
    for m in _SUBMITTED.finditer(text):
        jobid, log = m.group(1), m.group(2)
        for sub in subs:  # the first not yet matched call whose log pattern gives this path
            if sub.slurm_jobid is None and sub.output_pattern.replace("%j", jobid) == log:
                sub.slurm_jobid = jobid
                break
    return subs


def run_id(text: str) -> str | None:
    """The plugin's run UUID (every sbatch job of the run has it as job name)."""
    m = _RUN_ID.search(text)
    return m.group(1) if m else None
