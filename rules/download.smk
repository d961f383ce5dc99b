# Download rules for the paper's raw datasets: one target `download_<dataset>` per dataset whose config entry has a
# `download:` block (config/paper.yaml: download_lung, download_breast, download_thymus).
#
# Files are fetched with HTTP Range resumption; every file's sha256 is recorded in
# <dest_dir>/download.lock.tsv the first time and verified on every later run of the rule (force a re-check with
# `snakemake -f download_<dataset>`). Files without a public direct URL (login, terms, unknown accession) are listed
# with where to get them and where to put them, and the rule fails until they are in place.
# Implementation: workflow_scripts/data/download.py; user guide: docs/datasets.md.

import json as _dl_json


def _download_targets():
    for _name, _entry in (config.get("datasets") or {}).items():
        if isinstance(_entry, dict) and _entry.get("download"):
            _dest = (_entry["download"].get("dest_dir") or f"resources/{_name}").rstrip("/")
            yield _name, _entry, _dest


for _dl_name, _dl_entry, _dl_dest in _download_targets():

    rule:
        name:
            f"download_{_dl_name}"
        output:
            flag=f"{_dl_dest}/.download.done",
        log:
            f"logs/download/{_dl_name}.log",
        retries: 0
        localrule: True
        params:
            dataset=_dl_name,
            # only what the downloader needs; a function, so that "{sample}" in the entries is not taken for a wildcard
            entry=lambda wildcards, _e=_dl_entry: _dl_json.dumps(
                {k: _e[k] for k in ("download", "samples", "splits", "build_splits") if k in _e}
            ),
        shell:
            "python -m workflow_scripts.data.download --dataset {params.dataset} --params {params.entry:q}"
            " --flag {output.flag} --log {log}"
