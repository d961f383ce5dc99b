"""Configuration checks that run while Snakemake plans (workflow_scripts/configuration.py), as unit tests.

The same checks through the real Snakefile (failing before any job) are in tests/test_workflow_dag.py.
"""

from __future__ import annotations

import copy

import pytest
import yaml

from workflow_scripts import configuration as C
from workflow_utils import REPO

SCHEMA = C.load_schema(REPO / "config/config.schema.yaml")


def merged(*paths) -> dict:
    """Config files merged as Snakemake merges them (nested mappings updated key by key)."""
    def update(a, b):
        for k, v in b.items():
            if isinstance(v, dict) and isinstance(a.get(k), dict):
                update(a[k], v)
            else:
                a[k] = copy.deepcopy(v)
        return a

    out = {}
    for p in paths:
        update(out, yaml.safe_load(open(p)))
    return out


def errors_of(config) -> str:
    try:
        C.check_config(config, REPO, workdir=REPO, encoders={"pca": "gex", "morphology": "img", "uni2h": "img",
                                                              "nicheformer": "gex"})
    except C.ConfigError as e:
        return str(e)
    return ""


# ---------------------------------------------------------------------------------------------- --config values


def test_cli_strings_are_typed_as_the_schema_asks():
    # what `snakemake --config seeds=[0] methods=[cca,comm] training={"lr": 1e-3, "threads": 2}` hands over
    cli = {"seeds": ["0", "1"], "methods": ["cca", "comm"], "training": {"lr": "1e-3", "threads": "2",
                                                                         "method_params": {"dim": {"symmetric": "true"}}},
           "spectral": {"n_eval_samples": "null"}, "datasets": {"her2st": {"max_spots_per_slide": "40",
                                                                           "sections": ["A1"], "tasks": {
                                                                               "c": {"type": "classification",
                                                                                     "label": "cluster",
                                                                                     "exclude": ["3"]}}}}}
    out = C.coerce_cli_values(cli, SCHEMA)
    assert out["seeds"] == [0, 1] and out["methods"] == ["cca", "comm"]
    assert out["training"]["lr"] == 1e-3 and out["training"]["threads"] == 2
    assert out["spectral"]["n_eval_samples"] is None
    # reader keys are typed by the reader's schema later; the main schema leaves them as they are
    assert out["datasets"]["her2st"]["max_spots_per_slide"] == "40"
    # a class label may be a string: kept
    assert out["datasets"]["her2st"]["tasks"]["c"]["exclude"] == ["3"]
    # method_params are free-form objects in the schema: kept (checked by name, typed by the method)
    assert out["training"]["method_params"]["dim"]["symmetric"] == "true"


def test_values_that_parse_as_nothing_are_left_for_the_validator():
    out = C.coerce_cli_values({"seeds": ["zero"], "probe": {"n_folds": "five"}}, SCHEMA)
    assert out == {"seeds": ["zero"], "probe": {"n_folds": "five"}}


def test_reader_keys_from_the_command_line_are_typed_by_the_reader_schema():
    cfg = merged(REPO / "config/config.yaml")
    cfg["datasets"]["her2st"].update(max_spots_per_slide="40", sections=["A1", "C2"])
    assert "max_spots_per_slide: '40' is not of type 'integer', 'null'" in errors_of(cfg)
    out = C.coerce_config(cfg, SCHEMA, C.reader_schemas(REPO))
    assert out["datasets"]["her2st"]["max_spots_per_slide"] == 40 and out["datasets"]["her2st"]["sections"] == ["A1", "C2"]
    assert errors_of(out) == ""


# ---------------------------------------------------------------------------------------------- name lists


def test_method_parameter_names_agree_with_the_methods():
    from workflow_scripts.methods import CONTROLS, METHOD_DEFAULTS, METHODS
    from workflow_scripts.methods.training import COMMON_DEFAULTS, IGNORED_KEYS

    assert tuple(C.METHOD_PARAMS) == METHODS + CONTROLS
    for m in METHODS + CONTROLS:
        assert set(C.METHOD_PARAMS[m]) == set(METHOD_DEFAULTS[m]), m
    assert set(C.TRAINING_KEYS) == set(COMMON_DEFAULTS)
    # the schema's training block = the training keys + what the rules handle themselves
    assert set(SCHEMA["properties"]["training"]["properties"]) == set(C.TRAINING_KEYS) | set(IGNORED_KEYS)


def test_encoder_parameter_names_agree_with_the_encoders():
    from workflow_scripts.encoders import encoder_modalities, morphology, nicheformer, pca, uni2h

    for name, mod in (("pca", pca), ("morphology", morphology), ("uni2h", uni2h), ("nicheformer", nicheformer)):
        assert set(C.ENCODER_PARAMS[name]) == set(mod.DEFAULTS), name
    assert encoder_modalities() == {"pca": "gex", "nicheformer": "gex", "morphology": "img", "uni2h": "img",
                                    "precomputed": "any"}


def test_every_reader_has_a_key_schema_and_no_other():
    from workflow_scripts.data.prepare import READERS

    assert set(C.reader_schemas(REPO)) == set(READERS)


def test_planning_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, workflow_scripts.configuration, workflow_scripts.encoders, workflow_scripts.data; "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.stdout.strip() == "False", r.stderr


# ---------------------------------------------------------------------------------------------- checks


def test_shipped_configs_pass():
    assert errors_of(merged(REPO / "config/config.yaml")) == ""
    assert errors_of(merged(REPO / "config/config.yaml", REPO / "tests/data/config_small.yaml")) == ""
    assert errors_of(merged(REPO / "config/config.yaml", REPO / "config/paper.yaml")) == ""


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.update(max_spot_per_slide=40),
     "datasets.her2st: unknown key 'max_spot_per_slide' (did you mean 'max_spots_per_slide'?) for reader 'her2st'"),
    (lambda d: d.update(section=["A1"]), "datasets.her2st: unknown key 'section' (did you mean 'sections'?)"),
    (lambda d: d.update(sections=[]), "datasets.her2st.sections: [] should be non-empty"),
    (lambda d: d.update(sections=["A1", "Z9"]), "datasets.her2st.sections: unknown HER2ST section(s) ['Z9']"),
    (lambda d: d.update(reader="her2sd"), "datasets.her2st.reader: unknown reader 'her2sd' (did you mean 'her2st'?)"),
    (lambda d: d.update(max_spots_per_slide=0), "datasets.her2st.max_spots_per_slide: 0 is less than the minimum of 1"),
    (lambda d: d["spatial"].update(tasks=["clusterz"]), "datasets.her2st.spatial.tasks: 'clusterz' is not a task"),
    (lambda d: d.update(encoders={"gex": "uni2h", "img": "morphology"}),
     "datasets.her2st.encoders.gex: encoder 'uni2h' embeds 'img', not 'gex'"),
    (lambda d: d.update(encoder_params={"pca": {"n_comp": 3}}),
     "datasets.her2st.encoder_params.pca: unknown parameter 'n_comp' (did you mean 'n_comps'?)"),
])
def test_dataset_mistakes_name_the_key(edit, expected):
    cfg = merged(REPO / "config/config.yaml")
    edit(cfg["datasets"]["her2st"])
    assert expected in errors_of(cfg)


def test_xenium_block_keys_are_checked_too():
    cfg = merged(REPO / "config/config.yaml", REPO / "config/paper.yaml")
    cfg["datasets"]["lung"]["stride"] = 54.4
    cfg["datasets"]["breast"]["gene_join"] = "left"
    msg = errors_of(cfg)
    assert "datasets.lung: unknown key 'stride' (did you mean 'stride_um'?) for reader 'xenium'" in msg
    assert "datasets.breast.gene_join: 'left' is not one of ['inner', 'outer']" in msg


def test_method_params_and_other_mistakes_are_reported_together():
    cfg = merged(REPO / "config/config.yaml")
    cfg["training"]["method_params"]["comm"]["temprature"] = 0.1
    cfg["training"]["method_params"]["comn"] = {}
    cfg["training"]["method_params"]["cca"] = {"reg": 1e-3, "lr": 1e-3}  # a training key: allowed
    cfg["run_datasets"] = ["her2st", "lung"]
    msg = errors_of(cfg)
    assert "training.method_params.comm: unknown parameter 'temprature' (did you mean 'temperature'?)" in msg
    assert "training.method_params: unknown method 'comn' (did you mean 'comm'?)" in msg
    assert "run_datasets: ['lung'] not under `datasets:`" in msg
    assert "method_params.cca" not in msg


def test_reader_params_are_only_the_readers_keys():
    cfg = merged(REPO / "config/config.yaml", REPO / "config/paper.yaml")
    schemas = C.reader_schemas(REPO)
    her2st = C.reader_params(cfg["datasets"]["her2st"], schemas["her2st"])
    assert set(her2st) == {"reader", "resource_dir", "sections", "max_spots_per_slide"}
    lung = C.reader_params(cfg["datasets"]["lung"], schemas["xenium"])
    assert "patch_um" in lung and "stride_um" in lung  # the tiling depends on them
    for k in ("tasks", "spatial", "min_class_size", "encoders", "download"):
        assert k not in lung and k not in her2st


def test_cca_and_concat_ignore_the_training_keys_the_rule_leaves_out():
    """The align rule passes cca and concat only METHOD_TRAINING_KEYS: the others must not change their result."""
    import numpy as np

    from workflow_scripts.methods import fit_method

    rng = np.random.default_rng(0)
    z_gex, z_img = rng.normal(size=(60, 6)), rng.normal(size=(60, 5))
    other = {"lr": 0.5, "weight_decay": 0.1, "batch_size": 7, "max_epochs": 2, "early_stopping_patience": 1,
             "ema_smoothing": 0.5, "val_fraction_unsupervised": 0.3}
    for method in ("cca", "concat"):
        used = {k: v for k, v in {"projection_dim": 4, "val_fraction": 0.2}.items()
                if k in C.METHOD_TRAINING_KEYS[method]}
        a = fit_method(method, z_gex, z_img, used, seed=1, device="cpu", progress=False).z3
        b = fit_method(method, z_gex, z_img, {**used, **other}, seed=1, device="cpu", progress=False).z3
        np.testing.assert_array_equal(a, b)
