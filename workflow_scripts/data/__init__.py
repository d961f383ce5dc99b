"""Dataset readers and the spot data model (:mod:`workflow_scripts.data.model`)."""

from __future__ import annotations

import importlib
from pathlib import Path

# reader name -> module that may define ``input_files(params) -> list[str]``
_INPUT_LISTERS = {
    "her2st": "workflow_scripts.data.her2st",
    "xenium": "workflow_scripts.data.xenium",
    "visium": "workflow_scripts.data.visium",
    "synthetic": "workflow_scripts.data.synthetic",
    "precomputed": "workflow_scripts.data.precomputed",
}


def input_files(params: dict) -> list[str]:
    """Raw files a dataset's ``prepare`` job reads, so Snakemake can name any missing one before it runs.

    Readers that cannot list their files up front return ``[]`` (their own reader then names missing files).
    """
    mod = _INPUT_LISTERS.get(params.get("reader", ""))
    if mod is None:
        return []
    try:
        module = importlib.import_module(mod)
    except ImportError:
        return []
    fn = getattr(module, "input_files", None)
    return [str(Path(p)) for p in fn(params)] if fn else []
