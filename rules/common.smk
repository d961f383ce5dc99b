# Config loading, schema validation, wildcard constraints and the helpers that build paths and targets.
import json

from snakemake.utils import min_version, validate

from workflow_scripts.data import input_files as _dataset_input_files
from workflow_scripts.encoders import encoder_needs_gpu
from workflow_scripts.evaluation.folds import config_donors, n_outer_folds

min_version("9.19")  # profiles are read from profile.yaml since 9.19


validate(config, schema="../config/config.schema.yaml")

DATASETS = list(config.get("run_datasets") or config["datasets"])
_unknown = [d for d in DATASETS if d not in config["datasets"]]
if _unknown:
    raise ValueError(f"config key run_datasets names datasets {_unknown} that are not under `datasets:`")
METHODS = list(config["methods"])
BASELINES = list(config["baselines"])
EMBEDDINGS = METHODS + BASELINES
SEEDS = [int(s) for s in config["seeds"]]
MODALITIES = ["gex", "img"]
PROTOCOLS = list(config["protocols"])
# fused methods whose interface is trained once per outer fold under the inductive protocol; concat has no fitted
# parameter (a per-feature affine input scaling would not change its standardised probe), so it is reused as is
INDUCTIVE_METHODS = [m for m in METHODS if m != "concat"]
# every name the wildcards may take (the schema's enums; workflow_scripts.methods.METHODS, not imported to keep
# parsing free of torch)
ALL_METHODS = ["cca", "dcca", "comm", "simclr", "byol", "simsiam", "barlow_twins", "vicreg", "dim", "concat"]
ALL_BASELINES = ["unimodal_gex", "unimodal_img", "random"]


wildcard_constraints:
    dataset="|".join(config["datasets"]),
    method="|".join(ALL_METHODS),
    embedding="|".join(ALL_METHODS + ALL_BASELINES),
    modality="gex|img",
    encoder=r"[A-Za-z0-9_]+",
    seed=r"\d+",
    protocol="transductive|inductive",
    outer=r"\d+",


def ds_cfg(dataset):
    """The dataset's config entry with defaults applied."""
    d = dict(config["datasets"][dataset])
    d.setdefault("patch_um", 200)
    d.setdefault("min_class_size", 10)
    enc = {"gex": "pca", "img": "morphology"}
    enc.update(d.get("encoders") or {})
    d["encoders"] = enc
    return d


def encoder_of(dataset, modality):
    return ds_cfg(dataset)["encoders"][modality]


def embedding_file(dataset, modality):
    return f"results/{dataset}/embeddings/{modality}/{encoder_of(dataset, modality)}.parquet"


def embedding_path(dataset, embedding, seed):
    """Path of the table that the probes read for ``embedding`` (a method or a baseline)."""
    if embedding == "unimodal_gex":
        return embedding_file(dataset, "gex")
    if embedding == "unimodal_img":
        return embedding_file(dataset, "img")
    return f"results/{dataset}/aligned/{embedding}/seed{seed}.parquet"


def encoder_params(encoder, dataset):
    """Encoder parameters: ``encoders.<name>`` updated by ``datasets.<dataset>.encoder_params.<name>``,
    with ``weights.<name>.path`` as params['weights']."""
    p = dict(config["encoders"].get(encoder) or {})
    p.update((ds_cfg(dataset).get("encoder_params") or {}).get(encoder) or {})
    w = (config.get("weights") or {}).get(encoder) or {}
    if "path" in w and "weights" not in p:
        p["weights"] = w["path"]
    return p


def encoder_gpu(wildcards):
    return 1 if encoder_needs_gpu(wildcards.encoder) else 0


def training_params(method):
    """The `training` block merged with `training.method_params.<method>` (as passed to fit_method)."""
    t = {k: v for k, v in config["training"].items() if k not in ("method_params", "device", "threads")}
    t.update((config["training"].get("method_params") or {}).get(method) or {})
    return t


def method_gpu(wildcards):
    return 0 if wildcards.method in ("cca", "concat") else 1


def tasks_json(dataset):
    return json.dumps(ds_cfg(dataset)["tasks"])


def spatial_cfg(dataset):
    return ds_cfg(dataset).get("spatial") or {}


def probe_tables(wildcards):
    return expand(
        "results/{dataset}/probes/{protocol}/{embedding}/seed{seed}.tsv",
        dataset=wildcards.dataset,
        protocol=PROTOCOLS,
        embedding=EMBEDDINGS,
        seed=SEEDS,
    )


_N_OUTER = {}


def n_outer(dataset):
    """Outer folds of the inductive protocol, known when the DAG is planned: min(probe.n_folds, donors) from the
    config's sections / samples / donors (workflow_scripts/evaluation/folds.py; checked again by the folds job).
    """
    if dataset not in _N_OUTER:
        donors = config_donors(ds_cfg(dataset))
        _N_OUTER[dataset] = n_outer_folds(len(donors), int(config["probe"]["n_folds"]))
    return _N_OUTER[dataset]


def probe_embeddings(wildcards):
    """Embedding table(s) a probe job reads: one per outer fold for an inductively trained method."""
    if wildcards.protocol == "inductive" and wildcards.embedding in INDUCTIVE_METHODS:
        return expand(
            "results/{dataset}/aligned_inductive/{method}/seed{seed}/outer{outer}.parquet",
            dataset=wildcards.dataset,
            method=wildcards.embedding,
            seed=wildcards.seed,
            outer=range(n_outer(wildcards.dataset)),
        )
    return [embedding_path(wildcards.dataset, wildcards.embedding, wildcards.seed)]


def control_inputs(wildcards):
    """The unimodal tables a fused method's probe job re-encodes into its dimension-matched controls."""
    if wildcards.embedding in METHODS and config["probe"]["controls"]:
        return {m: embedding_file(wildcards.dataset, m) for m in MODALITIES}
    return {}


def control_args(wildcards, input):
    if wildcards.embedding in METHODS and config["probe"]["controls"]:
        kinds = " ".join(config["probe"]["controls"])
        return f"--controls {kinds} --controls-gex {input.gex} --controls-img {input.img}"
    return ""


def probe_params():
    """The probe settings a probe job depends on (the controls list is passed on its own)."""
    return json.dumps({k: v for k, v in config["probe"].items() if k != "controls"})


def folds_meta_files(wildcards):
    return expand(
        "results/{dataset}/folds/{protocol}/seed{seed}.json",
        dataset=wildcards.dataset,
        protocol=PROTOCOLS,
        seed=SEEDS,
    )


def spatial_tables(wildcards):
    return expand(
        "results/{dataset}/spatial/{embedding}/seed{seed}.tsv",
        dataset=wildcards.dataset,
        embedding=EMBEDDINGS,
        seed=SEEDS,
    )


def prepare_inputs(wildcards):
    return _dataset_input_files(ds_cfg(wildcards.dataset))


def final_targets():
    """Everything `all` builds: per dataset the QC figure, SIS table, summary tables and figures."""
    out = []
    for d in DATASETS:
        out += [
            f"results/{d}/qc/patches.png",
            f"results/sis/{d}.tsv",
            f"results/tables/{d}/probes_summary.tsv",
            f"results/figures/{d}/probe_scores.png",
            f"results/figures/{d}/sis_heatmap.png",
            f"results/tables/{d}/protocols.tsv",
            f"results/figures/{d}/protocols.png",
        ]
        if spatial_cfg(d).get("ring_edges_um"):
            out += [f"results/tables/{d}/spatial_summary.tsv", f"results/figures/{d}/spatial_rings.png"]
        out += analysis_targets(
            d
        )  # rules/analysis_common.smk: spectral, spatial consistency, curves, UMAPs, scaling
    return out
