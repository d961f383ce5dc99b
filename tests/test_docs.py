"""Citations a reader of the repository can follow.

* Every ``docs/<file>.md`` or ``docs/<file>.md#<anchor>`` cited in the code, rules, configs, report captions, tests,
  docs or README points to an existing file and, with an anchor, to an explicit ``id="<anchor>"`` in that file
  (the ``<a id="..."></a>`` anchors that GitHub renders).
* Relative Markdown links inside ``docs/*.md`` (``[text](other.md#anchor)``, ``[text](#anchor)``) resolve the same way.
* ``docs/reference.md`` has every anchor the project cites by convention (topics and flaw-1 … flaw-22), once each.
* No section sign and no issue/pull-request numbers: they point to documents a reader cannot open.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from workflow_utils import REPO

#: Where citations are searched (files or folders, relative to the repository root).
CITING = ["workflow_scripts", "rules", "config", "docs", "report", "profiles", "tests", "Snakefile", "README.md"]
#: Where the section sign and issue numbers are forbidden. README.md is rewritten by the integrator and is checked
#: once it no longer cites the unpublished specification.
NO_SECTION_SIGN = ["workflow_scripts", "rules", "config", "docs", "report", "profiles", "tests", "Snakefile", "README.md",
                   "BENCHMARKS.md"]
TEXT_SUFFIXES = {".py", ".smk", ".yaml", ".yml", ".md", ".rst", ".txt", ".toml", ".cfg"}
SECTION_SIGN = "\u00a7"

# a repository path docs/<name>.md, optionally followed by #<anchor>
DOC_CITATION = re.compile(r"\bdocs/([A-Za-z0-9_.-]+?\.md)(?:#([A-Za-z0-9_-]+))?")
# a relative Markdown link target inside docs/ (no scheme, no leading slash)
MD_LINK = re.compile(r"\]\((?!https?:|mailto:|/)([^)\s]*)\)")
ISSUE_NUMBER = re.compile(r"\b(?:issues?|pull requests?|PRs?)\s*#?\s*\d+|/(?:issues|pull)/\d+", re.IGNORECASE)

REQUIRED_REFERENCE_ANCHORS = [
    "pipeline", "datasets", "uni2-h", "nicheformer", "alignment", "fusion-methods", "fused-embeddings", "probes",
    "spatial-rings", "spatial-consistency", "sis", "data-scaling", "figures",
] + [f"flaw-{i}" for i in range(1, 23)]


def _text_files(roots: list[str]) -> list[Path]:
    files = []
    for root in roots:
        p = REPO / root
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += [f for f in sorted(p.rglob("*"))
                      if f.is_file() and (f.suffix in TEXT_SUFFIXES or f.name == "Snakefile")]
    this = Path(__file__).resolve()
    return [f for f in files if f.resolve() != this]


def _ids(md: Path) -> list[str]:
    return re.findall(r"""\bid=["']([^"']+)["']""", md.read_text(encoding="utf-8"))


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def _citations() -> list[tuple[str, int, str, str | None]]:
    """(citing file, line, docs file name, anchor or None) of every docs/<file>.md citation."""
    out = []
    for f in _text_files(CITING):
        for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            out += [(_rel(f), n, m.group(1), m.group(2)) for m in DOC_CITATION.finditer(line)]
    return out


def _broken(target: Path, anchor: str | None) -> str | None:
    if not target.is_file():
        return f"{_rel(target)} does not exist"
    if anchor and anchor not in _ids(target):
        return f'{_rel(target)} has no id="{anchor}"'
    return None


def test_citations_are_found():
    """The scan sees the code's citations (guards against a regex that silently matches nothing)."""
    cites = _citations()
    assert any(f.startswith("workflow_scripts/") and doc == "reference.md" and a for f, _, doc, a in cites)
    assert any(doc == "weights.md" for _, _, doc, _ in cites)


def test_every_cited_docs_file_and_anchor_exists():
    problems = []
    for f, n, doc, anchor in _citations():
        why = _broken(REPO / "docs" / doc, anchor)
        if why:
            problems.append(f"{f}:{n}: docs/{doc}{'#' + anchor if anchor else ''}: {why}")
    assert not problems, "broken documentation citations:\n" + "\n".join(problems)


def test_relative_links_inside_docs_resolve():
    problems = []
    for md in sorted((REPO / "docs").glob("*.md")):
        for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
            for m in MD_LINK.finditer(line):
                path, _, anchor = m.group(1).partition("#")
                target = (md.parent / path).resolve() if path else md
                why = _broken(target, anchor or None)
                if why:
                    problems.append(f"{_rel(md)}:{n}: ({m.group(1)}): {why}")
    assert not problems, "broken links in docs/:\n" + "\n".join(problems)


def test_reference_doc_has_every_conventional_anchor_once():
    ids = _ids(REPO / "docs" / "reference.md")
    missing = [a for a in REQUIRED_REFERENCE_ANCHORS if a not in ids]
    duplicated = sorted({a for a in ids if ids.count(a) > 1})
    assert not missing, f"docs/reference.md lacks anchors {missing}"
    assert not duplicated, f"docs/reference.md repeats anchors {duplicated}"


@pytest.mark.parametrize("what, pattern", [("section sign", re.compile(SECTION_SIGN)),
                                           ("issue/PR number", ISSUE_NUMBER)])
def test_no_unfollowable_pointers(what, pattern):
    """No "§" (sections of an unpublished specification) and no issue numbers; words like "section" are fine."""
    hits = []
    for f in _text_files(NO_SECTION_SIGN):
        for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{_rel(f)}:{n}: {line.strip()[:120]}")
    assert not hits, f"{what} found; cite docs/reference.md#<anchor>, a DOI or a public file instead:\n" + "\n".join(hits)


def test_the_checks_catch_what_they_should(tmp_path):
    """The patterns flag a missing anchor, a section sign and an issue number, and accept a book's section word."""
    md = tmp_path / "x.md"
    md.write_text('<a id="probes"></a>\n## Probes\n')
    assert _broken(md, "probes") is None
    assert "no id" in _broken(md, "flaw-99")
    assert "does not exist" in _broken(tmp_path / "nope.md", None)
    assert [m.groups() for m in DOC_CITATION.finditer("see docs/reference.md#flaw-3, docs/weights.md.")] == [
        ("reference.md", "flaw-3"), ("weights.md", None)]
    assert ISSUE_NUMBER.search("reported in issue #19") and ISSUE_NUMBER.search("github.com/o/r/issues/19")
    assert not ISSUE_NUMBER.search("Burger & Burge, section 11.4; see resources/PROVENANCE.md 'Known issues'")
    assert re.search(SECTION_SIGN, "reference \u00a711.9") and not re.search(SECTION_SIGN, "section 11.4")
