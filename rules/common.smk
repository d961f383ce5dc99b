# Config loading, schema validation, wildcard constraints and the helpers that build paths and targets.
import json
import os

from snakemake.utils import min_version, validate

from workflow_scripts.configuration import (
    check_config,
    coerce_config,
    load_schema,
    METHOD_TRAINING_KEYS,
    TRAINING_KEYS,
    reader_params as _reader_params,
    reader_schemas,
    unknown_dataset_error,
)
from workflow_scripts.data import input_files as _dataset_input_files
from workflow_scripts.encoders import encoder_modalities, encoder_needs_gpu
from workflow_scripts.evaluation.folds import config_donors, n_outer_folds

min_version("9.19")  # profiles are read from profile.yaml since 9.19


# Every config mistake fails here, before the first job, naming its key (workflow_scripts/configuration.py):
# --config values typed as the schema asks (seeds=[0] arrives as ["0"]), the schema (types, ranges, defaults),
# then the checks a schema cannot express (reader keys, HER2ST sections, encoders, method parameters).
READER_SCHEMAS = reader_schemas(workflow.basedir)
config.update(
    coerce_config(
        config,
        load_schema(os.path.join(workflow.basedir, "config/config.schema.yaml")),
        READER_SCHEMAS,
    )
)
validate(config, schema="../config/config.schema.yaml")
check_config(config, repo=workflow.basedir, encoders=encoder_modalities())

DATASETS = list(config.get("run_datasets") or config["datasets"])
METHODS = list(config["methods"])
BASELINES = list(config["baselines"])
# positive controls (tensor_fusion): computed by the align rule like concat, scored beside the methods
POSITIVE_CONTROLS = list(config.get("positive_controls") or [])
EMBEDDINGS = METHODS + POSITIVE_CONTROLS + BASELINES
SEEDS = [int(s) for s in config["seeds"]]
MODALITIES = ["gex", "img"]
PROTOCOLS = list(config["protocols"])
# fused embeddings whose interface is fit once per outer fold under the inductive protocol; concat has no fitted
# parameter (a per-feature affine input scaling would not change its standardised probe), so it is reused as is;
# fused files (datasets.<d>.fused) are used as given in both protocols
INDUCTIVE_METHODS = [m for m in METHODS + POSITIVE_CONTROLS if m != "concat"]
# every name the wildcards may take (the schema's enums; workflow_scripts.methods.METHODS, not imported to keep
# parsing free of torch)
ALL_METHODS = ["cca", "dcca", "comm", "simclr", "byol", "simsiam", "barlow_twins", "vicreg", "dim", "concat"]
ALL_BASELINES = ["unimodal_gex", "unimodal_img", "random"]
ALL_CONTROLS = ["tensor_fusion"]  # workflow_scripts.methods.CONTROLS


def fused_files(dataset):
    """Fused embeddings given as files (config datasets.<d>.fused): {name: {"path": ..., "key": ...}}."""
    out = {}
    if dataset not in config["datasets"]:
        raise unknown_dataset_error(dataset, config["datasets"])
    for name, v in (config["datasets"][dataset].get("fused") or {}).items():
        out[name] = dict(v) if isinstance(v, dict) else {"path": str(v)}
        if not out[name].get("path"):
            raise ValueError(
                f"config datasets.{dataset}.fused.{name}: give a file path (or {{path: FILE, key: KEY}})"
            )
        if name in ALL_METHODS + ALL_BASELINES + ALL_CONTROLS:
            raise ValueError(
                f"config datasets.{dataset}.fused.{name}: the name is taken by a method, baseline or control; rename it"
            )
    return out


FUSED_NAMES = sorted({n for d in config["datasets"] for n in fused_files(d)})


# `dataset` takes any name, so that a target naming an unknown dataset (results/sis/foo.tsv) reaches ds_cfg, whose
# error lists the known datasets, instead of a bare MissingRuleException.
wildcard_constraints:
    dataset=r"[A-Za-z0-9_]+",
    method="|".join(ALL_METHODS + ALL_CONTROLS),
    embedding="|".join(ALL_METHODS + ALL_CONTROLS + ALL_BASELINES + FUSED_NAMES),
    fused=r"[A-Za-z0-9_]+",
    modality="gex|img",
    encoder=r"[A-Za-z0-9_]+",
    seed=r"\d+",
    protocol="transductive|inductive",
    outer=r"\d+",


def ds_cfg(dataset):
    """The dataset's config entry with defaults applied; ConfigError listing the known datasets if there is none."""
    if dataset not in config["datasets"]:
        raise unknown_dataset_error(dataset, config["datasets"])
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
    """Path of the table that the probes read for ``embedding`` (a method, control, baseline or fused file)."""
    if embedding == "unimodal_gex":
        return embedding_file(dataset, "gex")
    if embedding == "unimodal_img":
        return embedding_file(dataset, "img")
    if embedding in fused_files(dataset):
        return f"results/{dataset}/imported/{embedding}/seed{seed}.parquet"
    return f"results/{dataset}/aligned/{embedding}/seed{seed}.parquet"


def embeddings_of(dataset):
    """Every embedding scored for ``dataset``: methods, positive controls, fused files, baselines."""
    return METHODS + POSITIVE_CONTROLS + list(fused_files(dataset)) + BASELINES


def fused_source(dataset, name, seed):
    """The user's file of fused embedding ``name`` (``{seed}`` in its path is replaced by the seed)."""
    spec = fused_files(dataset).get(name)
    if spec is None:
        raise ValueError(
            f"dataset {dataset} has no fused embedding {name!r} (config datasets.{dataset}.fused)"
        )
    return spec["path"].replace("{seed}", str(seed))


def encoder_inputs(wildcards):
    """Files an encoder reads besides the spots (the precomputed encoder's embedding file), for the DAG."""
    if wildcards.encoder != "precomputed":
        return []
    from workflow_scripts.encoders.precomputed import input_path

    path = input_path(encoder_params("precomputed", wildcards.dataset), wildcards.modality)
    return [path] if path else []


def encoder_params(encoder, dataset):
    """Encoder parameters: ``encoders.<name>`` updated by ``datasets.<dataset>.encoder_params.<name>``,
    with ``weights.<name>.path`` as params['weights']."""
    p = dict(config["encoders"].get(encoder) or {})
    p.update((ds_cfg(dataset).get("encoder_params") or {}).get(encoder) or {})
    w = (config.get("weights") or {}).get(encoder) or {}
    if "path" in w and "weights" not in p:
        p["weights"] = w["path"]
    return p


def prepare_params(dataset):
    """The `prepare` rule's parameters: only the keys the dataset's reader reads (config/readers/<reader>.schema.yaml),
    so that evaluation and embedding settings do not rebuild the spots."""
    d = ds_cfg(dataset)
    return _reader_params(d, READER_SCHEMAS[d["reader"]])


def patch_option(wildcards):
    """`--patch-um` for image encoders only: the patch size changes the image embedding, never the GEX one."""
    if wildcards.modality != "img":
        return ""
    return f"--patch-um {ds_cfg(wildcards.dataset)['patch_um']}"


def encoder_gpu(wildcards):
    return 1 if encoder_needs_gpu(wildcards.encoder) else 0


def training_params(method):
    """The `training` block merged with `training.method_params.<method>` (as passed to fit_method)."""
    used = METHOD_TRAINING_KEYS.get(method, TRAINING_KEYS)  # cca and concat ignore most training keys
    t = {k: v for k, v in config["training"].items() if k in used}
    t.update((config["training"].get("method_params") or {}).get(method) or {})
    return t


def method_gpu(wildcards):
    return 0 if wildcards.method in ("cca", "concat", "tensor_fusion") else 1


def tasks_json(dataset):
    return json.dumps(ds_cfg(dataset)["tasks"])


def spatial_cfg(dataset):
    return ds_cfg(dataset).get("spatial") or {}


def probe_tables(wildcards):
    return expand(
        "results/{dataset}/probes/{protocol}/{embedding}/seed{seed}.tsv",
        dataset=wildcards.dataset,
        protocol=PROTOCOLS,
        embedding=embeddings_of(wildcards.dataset),
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


def inductive_dir(dataset, method, seed):
    """The output folder of one align_inductive job: every outer fold's interface of a method and seed."""
    return f"results/{dataset}/aligned_inductive/{method}/seed{seed}"


def inductive_files(dataset, method, seed, suffix):
    """The files of one align_inductive job, one per outer fold, e.g. suffix parquet or views.npz (shell arguments:
    a job's input is the folder, as Snakemake tracks a directory output as a whole)."""
    return expand(
        "{folder}/outer{outer}.{suffix}",
        folder=inductive_dir(dataset, method, seed),
        outer=range(n_outer(dataset)),
        suffix=suffix,
    )


def is_inductive(protocol, embedding):
    return protocol == "inductive" and embedding in INDUCTIVE_METHODS


def probe_inputs(wildcards):
    """What a probe job depends on: the align_inductive folder of an inductively trained method, else the table."""
    if is_inductive(wildcards.protocol, wildcards.embedding):
        return [inductive_dir(wildcards.dataset, wildcards.embedding, wildcards.seed)]
    return [embedding_path(wildcards.dataset, wildcards.embedding, wildcards.seed)]


def probe_embeddings(wildcards):
    """Embedding table(s) a probe job reads: one per outer fold for an inductively trained method."""
    if is_inductive(wildcards.protocol, wildcards.embedding):
        return inductive_files(wildcards.dataset, wildcards.embedding, wildcards.seed, "parquet")
    return [embedding_path(wildcards.dataset, wildcards.embedding, wildcards.seed)]


def spectral_views_inductive(wildcards):
    return "inductive" in PROTOCOLS and wildcards.method in INDUCTIVE_METHODS


def spectral_views_inputs(wildcards):
    """What a spectral_views job depends on: the align_inductive folder under the inductive protocol (views of
    held-out rows), else the transductive interface's views (all rows)."""
    if spectral_views_inductive(wildcards):
        return [inductive_dir(wildcards.dataset, wildcards.method, wildcards.seed)]
    return [f"results/{wildcards.dataset}/aligned/{wildcards.method}/seed{wildcards.seed}.views.npz"]


def spectral_views_files(wildcards):
    """The views files a spectral_views job reads: every outer fold's under the inductive protocol."""
    if spectral_views_inductive(wildcards):
        return inductive_files(wildcards.dataset, wildcards.method, wildcards.seed, "views.npz")
    return spectral_views_inputs(wildcards)


def has_controls(embedding):
    """Every fused embedding (a method, a positive control, a fused file) is probed with its controls."""
    return embedding not in ALL_BASELINES and bool(config["probe"]["controls"])


def control_inputs(wildcards):
    """The unimodal tables a fused embedding's probe job re-encodes into its dimension-matched controls."""
    if has_controls(wildcards.embedding):
        return {m: embedding_file(wildcards.dataset, m) for m in MODALITIES}
    return {}


def control_args(wildcards, input):
    if has_controls(wildcards.embedding):
        kinds = " ".join(config["probe"]["controls"])
        return f"--controls {kinds} --controls-gex {input.gex} --controls-img {input.img}"
    return ""


def probe_params():
    """The probe settings a probe job depends on (the controls list is passed on its own)."""
    return json.dumps({k: v for k, v in config["probe"].items() if k != "controls"})


def sis_methods(dataset):
    """Embeddings the SIS table scores: the fused ones, and random as a floor."""
    fused = METHODS + POSITIVE_CONTROLS + list(fused_files(dataset))
    return json.dumps(fused + [b for b in BASELINES if b == "random"])


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
        embedding=embeddings_of(wildcards.dataset),
        seed=SEEDS,
    )


def prepare_inputs(wildcards):
    return _dataset_input_files(ds_cfg(wildcards.dataset), wildcards.dataset)


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
        out += pid_targets(d)  # rules/pid_common.smk: PID table and figure (+ planted PID, validation)
    return out
