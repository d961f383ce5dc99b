"""Configured tasks are checked against the prepared spots: a missing label column or obsm key fails the probe."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from workflow_scripts.evaluation.tasks import TaskError, check_tasks, task_problems
from workflow_scripts.io import embedding_frame, write_embedding

TASKS = {
    "cluster": {"type": "classification", "label": "cluster"},
    "composition": {"type": "regression", "obsm": "composition"},
}


def test_tasks_that_exist_pass(tiny_spots):
    check_tasks(tiny_spots, TASKS)
    assert task_problems(tiny_spots.obs.columns, tiny_spots.obsm.keys(), TASKS) == []


def test_missing_label_and_obsm_are_named_with_what_exists(tiny_spots):
    bad = {**TASKS, "typo": {"type": "classification", "label": "clusterz"},
           "comp2": {"type": "regression", "obsm": "proportions"}}
    with pytest.raises(TaskError) as e:
        check_tasks(tiny_spots, bad, source="results/tiny/spots.h5ad")
    msg = str(e.value)
    assert msg.startswith("results/tiny/spots.h5ad: 2 configured task(s)")
    assert "task 'typo' (tasks.typo.label): the spots have no obs column 'clusterz'" in msg
    assert "'cluster'" in msg and "'slide'" in msg  # the columns that exist
    assert "task 'comp2' (tasks.comp2.obsm): the spots have no obsm key 'proportions'; obsm keys: ['composition']" in msg


def test_probe_cli_fails_on_a_misspelled_label(tiny_spots, tmp_path):
    spots = tmp_path / "spots.h5ad"
    tiny_spots.write_h5ad(spots)
    emb = tmp_path / "emb.parquet"
    rng = np.random.default_rng(0)
    write_embedding(embedding_frame(rng.normal(size=(tiny_spots.n_obs, 4)), tiny_spots.obs_names), emb)
    log = tmp_path / "probe.log"
    tasks = {"cluster": {"type": "classification", "label": "clusterz"}}
    r = subprocess.run(
        [sys.executable, "-m", "workflow_scripts.evaluation.probes", "--embedding", str(emb), "--spots", str(spots),
         "--dataset", "tiny", "--name", "unimodal_gex", "--seed", "0", "--tasks", json.dumps(tasks),
         "--params", json.dumps({"n_folds": 2}), "--out", str(tmp_path / "out.tsv"), "--log", str(log)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 1
    text = log.read_text()
    assert "TaskError" in text and "no obs column 'clusterz'" in text and "task 'cluster'" in text
    assert not (tmp_path / "out.tsv").exists()
