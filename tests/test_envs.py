"""The conda environment file pins exactly what pyproject.toml pins."""

import tomllib

import yaml


def _pip_pins(env):
    for dep in env["dependencies"]:
        if isinstance(dep, dict) and "pip" in dep:
            return {p.split("==")[0].lower(): p for p in dep["pip"] if "==" in p}
    raise AssertionError("no pip section in the conda env")


def test_conda_env_matches_pyproject(repo):
    project = tomllib.load(open(repo / "pyproject.toml", "rb"))["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["test"]
    pins = {p.split("==")[0].lower(): p for p in wanted}
    assert all("==" in p for p in wanted), "every dependency must be pinned with =="
    env = yaml.safe_load(open(repo / "envs/cellsynergy.yaml"))
    assert _pip_pins(env) == pins
    assert "python=3.11" in env["dependencies"]


def test_rules_use_the_pinned_env_or_none(repo):
    """Rules that declare a conda env must use envs/cellsynergy.yaml (one env, the same pins)."""
    import re

    for smk in (repo / "rules").glob("*.smk"):
        for m in re.finditer(r'conda:\s*\n\s*"([^"]+)"', smk.read_text()):
            assert m.group(1).endswith("envs/cellsynergy.yaml"), (smk, m.group(1))
