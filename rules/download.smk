# Raw-data downloads as part of the DAG. For every dataset whose config entry has a `download:` block
# (config/paper.yaml: lung, breast, thymus) each entry becomes one rule whose outputs are the raw files that
# `prepare` reads (one job per file, or per sample):
#   fetch_<dataset>_<file>   downloads with pooch (or copies members out of a remote ZIP through fsspec), pins the
#                            sha256 in <dest_dir>/download.lock.tsv and keeps the download in <dest_dir>/cache/;
#   manual_<dataset>_<file>  a file without a public URL: the job fails with where to get it and where to put it
#                            (use --keep-going to see every such file). Its output is marked update(), so a forced
#                            rerun never deletes a file placed by hand.
# `download_<dataset>` fetches everything of one dataset and re-verifies every file against the lock (it has no
# output, so it runs each time it is asked for). Implementation: workflow_scripts/data/download.py; user guide:
# docs/datasets.md.
import json

from workflow_scripts.data.download import plan_downloads, manual_files

for _dl_ds, _dl_entry in (config.get("datasets") or {}).items():
    _dl_plan = plan_downloads(_dl_ds, _dl_entry) if isinstance(_dl_entry, dict) else []
    for _dl in _dl_plan:
        if _dl.kind == "manual":

            rule:
                name:
                    _dl.name
                input:
                    [ancient(p) for p in _dl.needs],
                output:
                    [update(p) for p in _dl.outputs],
                log:
                    _dl.log,
                wildcard_constraints:
                    **_dl.wildcard_constraints,
                retries: 0
                localrule: True
                conda:
                    "../envs/cellsynergy.yaml"
                params:
                    entry=_dl.params,
                    lock=_dl.lock,
                    others=json.dumps(manual_files(_dl_ds, _dl_entry)),
                shell:
                    "python -m workflow_scripts.data.download manual --entry {params.entry:q}"
                    " --lock {params.lock:q} --others {params.others:q} --log {log}"

        else:

            rule:
                name:
                    _dl.name
                output:
                    _dl.outputs + [directory(p) for p in _dl.directories],
                log:
                    _dl.log,
                wildcard_constraints:
                    **_dl.wildcard_constraints,
                localrule: True
                conda:
                    "../envs/cellsynergy.yaml"
                params:
                    entry=_dl.params,
                    lock=_dl.lock,
                    cache_dir=_dl.cache_dir,
                shell:
                    "python -m workflow_scripts.data.download fetch --entry {params.entry:q}"
                    " --lock {params.lock:q} --cache-dir {params.cache_dir:q} --log {log}"

    if _dl_plan:

        rule:
            name:
                f"download_{_dl_ds}"
            input:
                [f for _r in _dl_plan for f in _r.files()],
            log:
                f"logs/download/{_dl_ds}.log",
            localrule: True
            conda:
                "../envs/cellsynergy.yaml"
            params:
                lock=_dl_plan[0].lock,
                files=[f for _r in _dl_plan for f in _r.files(folders=False)],
            shell:
                "python -m workflow_scripts.data.download verify --lock {params.lock:q}"
                " {params.files:q} --log {log}"
