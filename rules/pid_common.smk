# Helpers and targets of the PID rules (rules/pid.smk): the PID table of every dataset, and for synthetic datasets
# the planted PID and the validation table (docs/synthetic.md).

PID_DEFAULTS = {"k": 6, "y_bins": 4, "n_init": 10, "seed": 0, "max_spots": None}


def pid_params():
    """Config `pid` over PID_DEFAULTS (workflow_scripts.evaluation.pid.PID_DEFAULTS)."""
    return {**PID_DEFAULTS, **(config.get("pid") or {})}


def is_synthetic(dataset):
    return config["datasets"][dataset].get("reader") == "synthetic"


def pid_fused(dataset):
    """[(embedding, seed, path)] of every fused embedding whose I(Y; fused) the PID table reports."""
    names = METHODS + POSITIVE_CONTROLS + list(fused_files(dataset)) + [b for b in BASELINES if b == "random"]
    return [(e, s, embedding_path(dataset, e, s)) for e in names for s in SEEDS]


def pid_truth_params(wildcards):
    if not is_synthetic(wildcards.dataset):
        raise ValueError(
            f"results/{wildcards.dataset}/pid_truth.tsv exists only for synthetic datasets (reader: synthetic)"
        )
    d = ds_cfg(wildcards.dataset)
    tasks = {t: spec.get("label") or spec.get("obsm") for t, spec in d["tasks"].items()}
    return json.dumps({"generator": d.get("generator") or {}, "tasks": tasks})


def pid_targets(dataset):
    """What `all` builds for the PID of ``dataset`` (called from final_targets())."""
    out = [f"results/pid/{dataset}.tsv", f"results/figures/{dataset}/pid.png"]
    if is_synthetic(dataset):
        out += [f"results/{dataset}/pid_truth.tsv", f"results/tables/{dataset}/validation.tsv"]
    return out


localrules:
    pid_truth,
    figure_pid,
    validation,
