"""Checks of the workflow configuration that run while Snakemake plans, before any job.

``rules/common.smk`` calls, in this order:

1. :func:`coerce_config` — ``snakemake --config seeds=[0]`` hands the workflow the *string* ``"0"`` (Snakemake
   parses nested ``--config`` values with YAML's BaseLoader, which types nothing). Strings are converted to the
   type the schema asks for (integer, number, boolean, null) wherever the schema does not also allow a string.
2. ``snakemake.utils.validate`` against ``config/config.schema.yaml`` (types, ranges, defaults).
3. :func:`check_config` — what a JSON schema cannot see: the keys of each dataset block against its reader's key
   schema (``config/readers/<reader>.schema.yaml``: no unknown key, no empty list), HER2ST section ids against
   ``<resource_dir>/sections.tsv``, encoder names and modalities, spatial tasks against the dataset's tasks,
   ``training.method_params`` keys against each method's real parameter names, ``run_datasets``. Every problem is
   collected and reported at once, each naming its config key.

This module imports neither torch nor the readers, so planning stays fast. The parameter names of the fusion
methods and of the encoders are therefore listed here; tests/test_config.py checks them against
``workflow_scripts.methods.METHOD_DEFAULTS`` and the encoders' ``DEFAULTS``.
"""

from __future__ import annotations

import copy
import csv
import difflib
import functools
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

#: Keys of the config's ``training`` block that every method reads (``workflow_scripts.methods.training.COMMON_DEFAULTS``).
TRAINING_KEYS = (
    "batch_size",
    "max_epochs",
    "lr",
    "weight_decay",
    "projection_dim",
    "early_stopping_patience",
    "ema_smoothing",
    "val_fraction",
    "val_fraction_unsupervised",
    "min_delta",
    "standardize",
    "precision",
)

#: Each method's own parameters (``workflow_scripts.methods.METHOD_DEFAULTS[method]``); ``training.method_params.<m>``
#: may set these and any of :data:`TRAINING_KEYS`.
METHOD_PARAMS: dict[str, tuple[str, ...]] = {
    "cca": ("reg",),
    "dcca": ("hidden_dims", "reg", "eps"),
    "comm": ("embed_dim", "n_heads", "n_layers", "temperature", "dropout", "augment", "noise_std", "mask_prob"),
    "simclr": ("temperature",),
    "byol": ("ema_decay", "pred_dim"),
    "simsiam": ("hidden_dim", "pred_dim"),
    "barlow_twins": ("lambda_offdiag",),
    "vicreg": ("sim_coeff", "std_coeff", "cov_coeff"),
    "dim": ("temperature", "hidden_dim", "symmetric"),
    "concat": (),
    "tensor_fusion": ("rank",),
}

#: Training keys that a method's result depends on, where that is not all of :data:`TRAINING_KEYS`: CCA is fitted in
#: closed form (no epochs, batches or optimiser), concat is not fitted at all. The align rule passes only these, so
#: changing the learning rate does not refit them.
METHOD_TRAINING_KEYS: dict[str, tuple[str, ...]] = {"cca": ("projection_dim", "val_fraction"), "concat": (),
                                                    "tensor_fusion": ()}

#: Each built-in encoder's parameters (the ``DEFAULTS`` of its module in ``workflow_scripts/encoders``).
ENCODER_PARAMS: dict[str, tuple[str, ...]] = {
    "pca": ("target_sum", "n_top_genes", "n_comps", "scale"),
    "morphology": (
        "glcm_distances",
        "lbp_radius",
        "background_threshold",
        "black_threshold",
        "min_nucleus_area_um2",
        "min_hematoxylin_od",
        "min_tissue_fraction",
    ),
    "uni2h": ("weights", "allow_random_weights", "precision", "tiny", "arch"),
    "nicheformer": (
        "weights",
        "allow_random_weights",
        "vocabulary",
        "technology_mean",
        "gene_map",
        "gene_id_column",
        "specie",
        "assay",
        "modality",
        "max_seq_len",
        "exclude_padding",
        "layer",
        "precision",
        "tiny",
        "arch",
    ),
}

#: Keys of a dataset block that the workflow reads (embedding, evaluation, downloads), whatever the reader. The
#: reader's own keys are the properties of ``config/readers/<reader>.schema.yaml``; ``patch_um`` may be both.
WORKFLOW_DATASET_KEYS = ("reader", "encoders", "encoder_params", "tasks", "spatial", "min_class_size", "patch_um",
                         "download", "fused")

#: Folder of the per-reader key schemas, relative to the repository root.
READER_SCHEMA_DIR = Path("config") / "readers"

_INT = re.compile(r"^[+-]?\d+$")
_NULL = ("", "null", "none", "~")
_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off")


class ConfigError(ValueError):
    """A configuration mistake; the message names every offending config key."""


# ---------------------------------------------------------------------------------------------- schemas


def load_schema(path: str | Path) -> dict:
    """Read a YAML JSON-schema file (a fresh copy each call; the file is parsed once per process, as the DAG
    planning reads each schema several times); FileNotFoundError names the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"schema file not found: {path}")
    return copy.deepcopy(_parse_schema(str(path.resolve()), path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=64)
def _parse_schema(path: str, mtime_ns: int) -> dict:
    return yaml.safe_load(Path(path).read_text())


def reader_schemas(repo: str | Path) -> dict[str, dict]:
    """The key schema of every reader, ``{reader name: schema}``, from ``<repo>/config/readers/*.schema.yaml``."""
    folder = Path(repo) / READER_SCHEMA_DIR
    return {p.name[: -len(".schema.yaml")]: load_schema(p) for p in sorted(folder.glob("*.schema.yaml"))}


def reader_keys(schema: Mapping) -> tuple[str, ...]:
    """The keys a reader reads: the properties of its key schema (``reader`` included)."""
    return tuple(schema.get("properties") or {})


def reader_params(block: Mapping, schema: Mapping) -> dict:
    """The part of a dataset block that the reader reads: the ``prepare`` rule's parameters.

    Only these keys can change the prepared spots; evaluation keys (tasks, classes, rings) and embedding keys
    (encoders, patch size for the image encoder) are left out so that changing them does not rebuild the data.
    """
    keys = reader_keys(schema)
    return {k: block[k] for k in keys if k in block}


# ---------------------------------------------------------------------------------------------- coercion


def _resolve(schema: Mapping, root: Mapping) -> Mapping:
    ref = schema.get("$ref")
    while ref:
        if not ref.startswith("#/"):
            return {}
        node: Any = root
        for part in ref[2:].split("/"):
            node = node.get(part, {}) if isinstance(node, Mapping) else {}
        schema = node
        ref = schema.get("$ref") if isinstance(schema, Mapping) else None
    return schema if isinstance(schema, Mapping) else {}


def _types(schema: Mapping, root: Mapping) -> set[str]:
    """Types a (sub)schema allows, following anyOf/oneOf one level and enum/const values."""
    out: set[str] = set()
    t = schema.get("type")
    if isinstance(t, str):
        out.add(t)
    elif isinstance(t, list):
        out.update(t)
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            out |= _types(_resolve(sub, root), root)
    for v in list(schema.get("enum") or []) + ([schema["const"]] if "const" in schema else []):
        out.add({bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}.get(type(v), "string"))
    return out


def _from_string(text: str, types: set[str]):
    """Convert ``text`` to the first type in ``types`` it parses as; return it unchanged when none fits."""
    low = text.strip().lower()
    if "null" in types and low in _NULL:
        return None
    if "boolean" in types and low in _TRUE + _FALSE:
        return low in _TRUE
    if "integer" in types and _INT.match(text.strip()):
        return int(text)
    if "number" in types:
        try:
            return float(text) if not _INT.match(text.strip()) else int(text)
        except ValueError:
            pass
    if types & {"array", "object"}:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        if isinstance(value, (list, dict)):
            return value
    return text


def coerce_cli_values(value, schema: Mapping, root: Mapping | None = None):
    """Return ``value`` with strings converted to the types ``schema`` asks for (integer, number, boolean, null,
    array, object), wherever the schema does not also accept a string.

    Snakemake parses ``--config key=value`` with YAML's BaseLoader for nested values, so ``seeds=[0]`` arrives as
    ``["0"]`` and ``training={"lr": 1e-3}`` as ``{"lr": "1e-3"}``. Values a config file typed correctly pass
    through unchanged; strings that parse as nothing the schema allows are left for the validator to report.
    Follows ``properties``, ``additionalProperties``, ``items``, local ``$ref`` and ``anyOf``/``oneOf`` types.
    """
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if isinstance(value, str):
        types = _types(schema, root)
        if not types or "string" in types:
            return value
        value = _from_string(value, types)
        if isinstance(value, str):
            return value
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        out = {}
        for k, v in value.items():
            sub = props.get(k, extra if isinstance(extra, Mapping) else None)
            out[k] = coerce_cli_values(v, sub, root) if sub is not None else v
        return out
    if isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, Mapping):
            return [coerce_cli_values(v, items, root) for v in value]
    return value


def coerce_config(config: Mapping, schema: Mapping, readers: Mapping[str, Mapping]) -> dict:
    """:func:`coerce_cli_values` over the whole config: the main schema, then each dataset block with the key schema
    of its reader (``readers``: :func:`reader_schemas`), whose keys the main schema does not describe."""
    out = coerce_cli_values(dict(config), schema)
    datasets = out.get("datasets")
    if isinstance(datasets, dict):
        for name, block in datasets.items():
            if isinstance(block, dict) and block.get("reader") in readers:
                datasets[name] = coerce_cli_values(block, readers[block["reader"]])
    return out


# ---------------------------------------------------------------------------------------------- checks


def _did_you_mean(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _schema_errors(value, schema: Mapping, where: str) -> list[str]:
    from jsonschema import Draft202012Validator

    out = []
    for err in sorted(Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in err.absolute_path)
        out.append(f"{where}{'.' + path if path else ''}: {err.message}")
    return out


def her2st_sections(resource_dir: str | Path) -> list[str] | None:
    """Section ids listed in ``<resource_dir>/sections.tsv`` (None when that file is absent)."""
    path = Path(resource_dir) / "sections.tsv"
    if not path.is_file():
        return None
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    if rows and "section" not in rows[0]:
        return None  # a damaged table: the reader names it when it runs
    return [row["section"] for row in rows]


def check_dataset(name: str, block: Mapping, schemas: Mapping[str, Mapping], workdir: str | Path = ".") -> list[str]:
    """Problems of dataset block ``datasets.<name>`` (an empty list when there are none).

    Checks the reader against the readers with a key schema, every key of the block against the reader's keys and
    the workflow keys (:data:`WORKFLOW_DATASET_KEYS`), the reader keys' values against the reader's schema, HER2ST
    sections against ``sections.tsv`` (relative paths from ``workdir``), and ``spatial.tasks`` against ``tasks``.
    """
    where = f"datasets.{name}"
    reader = block.get("reader")
    if reader not in schemas:
        return [f"{where}.reader: unknown reader {reader!r}{_did_you_mean(str(reader), schemas)}; known readers: "
                f"{sorted(schemas)} (each has a key schema {READER_SCHEMA_DIR}/<reader>.schema.yaml)"]
    schema = schemas[reader]
    allowed = set(reader_keys(schema)) | set(WORKFLOW_DATASET_KEYS)
    errors = [
        f"{where}: unknown key {k!r}{_did_you_mean(k, allowed)} for reader {reader!r}; allowed keys: {sorted(allowed)}"
        f" ({READER_SCHEMA_DIR}/{reader}.schema.yaml and config/config.schema.yaml)"
        for k in block if k not in allowed
    ]
    errors += _schema_errors(reader_params(block, schema), schema, where)
    if reader == "her2st" and block.get("sections") and block.get("resource_dir"):
        known = her2st_sections(Path(workdir) / block["resource_dir"])
        if known is not None:
            unknown = [s for s in block["sections"] if s not in known]
            if unknown:
                errors.append(f"{where}.sections: unknown HER2ST section(s) {unknown}; "
                              f"{Path(block['resource_dir']) / 'sections.tsv'} lists {known}")
    tasks = block.get("tasks") or {}
    for t in (block.get("spatial") or {}).get("tasks") or []:
        if t not in tasks:
            errors.append(f"{where}.spatial.tasks: {t!r} is not a task of this dataset; tasks: {sorted(tasks)}")
    return errors


def _encoder_param_errors(key: str, encoder: str, params) -> list[str]:
    if encoder not in ENCODER_PARAMS:
        return []
    allowed = ENCODER_PARAMS[encoder]
    return [f"{key}: unknown parameter {k!r}{_did_you_mean(k, allowed)}; allowed: {sorted(allowed)}"
            for k in params or {} if k not in allowed]


def check_encoders(config: Mapping, encoders: Mapping[str, str]) -> list[str]:
    """Problems of the encoder settings: unknown encoder names, a GEX encoder set as IMG (or the reverse), unknown
    parameter names of the built-in encoders (``encoders.<name>`` and ``datasets.<d>.encoder_params.<name>``).

    ``encoders`` maps every known encoder to its modality ("gex", "img", or "any" for one that serves both).
    """
    errors = []
    for enc, params in (config.get("encoders") or {}).items():
        if enc not in encoders:
            errors.append(f"encoders.{enc}: unknown encoder{_did_you_mean(str(enc), encoders)}; "
                          f"known: {sorted(encoders)}")
        errors += _encoder_param_errors(f"encoders.{enc}", enc, params)
    for name, block in (config.get("datasets") or {}).items():
        where = f"datasets.{name}"
        for modality, enc in (block.get("encoders") or {}).items():
            if enc not in encoders:
                errors.append(f"{where}.encoders.{modality}: unknown encoder {enc!r}"
                              f"{_did_you_mean(str(enc), encoders)}; known: {sorted(encoders)}")
            elif encoders[enc] not in (modality, "any"):
                errors.append(f"{where}.encoders.{modality}: encoder {enc!r} embeds {encoders[enc]!r}, not "
                              f"{modality!r}; set {where}.encoders.{encoders[enc]}: {enc}")
        for enc, params in (block.get("encoder_params") or {}).items():
            errors += _encoder_param_errors(f"{where}.encoder_params.{enc}", enc, params)
    return errors


def check_method_params(config: Mapping) -> list[str]:
    """Problems of ``training.method_params``: unknown methods, keys that are neither a training key nor one of
    the method's own parameters (:data:`METHOD_PARAMS`)."""
    errors = []
    for method, params in ((config.get("training") or {}).get("method_params") or {}).items():
        if method not in METHOD_PARAMS:
            errors.append(f"training.method_params: unknown method {method!r}{_did_you_mean(method, METHOD_PARAMS)}; "
                          f"methods: {list(METHOD_PARAMS)}")
            continue
        allowed = set(TRAINING_KEYS) | set(METHOD_PARAMS[method])
        for k in params or {}:
            if k not in allowed:
                errors.append(f"training.method_params.{method}: unknown parameter {k!r}{_did_you_mean(k, allowed)}; "
                              f"{method} takes {sorted(METHOD_PARAMS[method])} and the training keys "
                              f"{list(TRAINING_KEYS)}")
    return errors


def check_config(config: Mapping, repo: str | Path, workdir: str | Path = ".",
                 encoders: Mapping[str, str] | None = None) -> None:
    """Run every cross-check on a validated config; raise :class:`ConfigError` listing all problems.

    ``repo``: the repository root (for ``config/readers``); ``workdir``: where relative data paths start;
    ``encoders``: known encoder name → modality (``workflow_scripts.encoders.encoder_modalities()``), None to skip.
    """
    schemas = reader_schemas(repo)
    datasets = config.get("datasets") or {}
    errors = []
    unknown = [d for d in config.get("run_datasets") or [] if d not in datasets]
    if unknown:
        errors.append(f"run_datasets: {unknown} not under `datasets:` (datasets: {sorted(datasets)})")
    for name, block in datasets.items():
        errors += check_dataset(name, block, schemas, workdir)
    if encoders is not None:
        errors += check_encoders(config, encoders)
    errors += check_method_params(config)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(dict.fromkeys(errors)))


def unknown_dataset_error(dataset: str, datasets) -> ConfigError:
    """The error for a target or file naming a dataset that the config does not define."""
    return ConfigError(
        f"unknown dataset {dataset!r} (from the requested file's path); known datasets: {sorted(datasets)}. "
        "Add it under `datasets:` in your config or fix the target, e.g. results/sis/<dataset>.tsv"
    )
