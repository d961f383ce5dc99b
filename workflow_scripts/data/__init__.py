"""Dataset readers, raw-data downloads and the spot data model (:mod:`workflow_scripts.data.model`)."""

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


def input_files(params: dict, dataset: str | None = None) -> list[str]:
    """Raw files a dataset's ``prepare`` job reads: its inputs in the DAG.

    The reader module's ``input_files(params)`` lists them (the configured ``files.*`` of the built samples).
    Where they have no lister, or it lists nothing, and the dataset has a ``download`` block, the files that
    block produces are the inputs instead (:func:`workflow_scripts.data.download.download_outputs`). Either way
    the download rules (``rules/download.smk``) produce these paths, so Snakemake fetches what is public before
    ``prepare`` and names the files to place by hand. ``dataset`` is the config key (default ``params['name']``),
    which the download block's default ``dest_dir`` uses. Paths are relative to the working directory.
    """
    files: list[str] = []
    mod = _INPUT_LISTERS.get(params.get("reader", ""))
    if mod is not None:
        fn = getattr(importlib.import_module(mod), "input_files", None)
        files = [str(Path(p)) for p in fn(params)] if fn else []
    if not files and params.get("download"):
        from .download import download_outputs

        files = download_outputs(dataset or str(params.get("name") or ""), params)
    return files
