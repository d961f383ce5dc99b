"""The expectations of docs/synthetic.md, checked with the workflow's own probes on the synthetic generator, and the
validation table built from hand-made tables."""

import numpy as np
import pandas as pd
import pytest

from workflow_scripts.data.synthetic import simulate
from workflow_scripts.evaluation.probes import run_probes
from workflow_scripts.evaluation.scores import absolute_gain, chance_corrected, expected_macro_f1_from_labels
from workflow_scripts.evaluation.validation import validation_table
from workflow_scripts.io import embedding_frame
from workflow_scripts.methods.tensor_fusion import fit_tensor_fusion, tensor_fusion_embedding

PROBE = {"n_folds": 3, "cv": "kfold", "logreg_max_iter": 2000}
TASKS = {
    "redundant": {"type": "classification", "label": "redundant"},
    "unique_gex": {"type": "classification", "label": "unique_gex"},
    "synergy": {"type": "classification", "label": "synergy"},
    "product": {"type": "regression", "obsm": "product"},
}


@pytest.fixture(scope="module")
def scores():
    """Mean probe score per task x embedding on 2 slides x 300 spots (3-fold CV, seed 0), and the chance levels."""
    a = simulate({"n_slides": 2, "n_donors": 1})
    g, i = a.obsm["gex_embedding"], a.obsm["img_embedding"]
    embs = {"unimodal_gex": g, "unimodal_img": i, "concat": np.hstack([i, g]),
            "tensor_fusion": tensor_fusion_embedding(fit_tensor_fusion(i, g, 8), i, g)}
    means = {}
    for name, z in embs.items():
        df = run_probes(embedding_frame(z, a.obs_names), a, TASKS, PROBE, seed=0, min_class_size=10)
        means[name] = df.groupby("task")["value"].mean()
    y = a.obs["synergy"].astype(str).to_numpy()
    chance = expected_macro_f1_from_labels(y[: len(y) // 2], y[len(y) // 2:])
    return pd.DataFrame(means), chance


def test_redundant_and_unique_labels_gain_nothing_from_concat(scores):
    m, _ = scores
    for task in ("redundant", "unique_gex"):
        gain = absolute_gain(m.loc[task, "concat"], m.loc[task, "unimodal_gex"], m.loc[task, "unimodal_img"])
        assert abs(gain) <= 0.03, (task, gain)


def test_xor_stays_at_chance_for_linear_read_outs_and_tensor_fusion_reads_it(scores):
    m, chance = scores
    assert chance == pytest.approx(0.5, abs=0.01)
    for e in ("unimodal_gex", "unimodal_img", "concat"):
        assert abs(chance_corrected(m.loc["synergy", e], chance)) <= 0.15, e
        assert m.loc["product", e] <= 0.05, e  # R2 of y = g * i: nothing linear
    assert chance_corrected(m.loc["synergy", "tensor_fusion"], chance) >= 0.8
    assert m.loc["product", "tensor_fusion"] >= 0.6


def test_validation_table_by_hand():
    truth = pd.DataFrame([
        dict(dataset="d", task="xor", h_y=1, i_gex=0, i_img=0, i_joint=1, redundancy=0, unique_gex=0, unique_img=0,
             synergy=1.0),
        dict(dataset="d", task="rdn", h_y=1, i_gex=1, i_img=1, i_joint=1, redundancy=1, unique_gex=0, unique_img=0,
             synergy=0.0),
    ])
    pid = pd.DataFrame([
        dict(task="xor", embedding="unimodal_pair", redundancy=0.01, unique_gex=0, unique_img=0, synergy=0.9,
             i_joint=0.91),
        dict(task="rdn", embedding="unimodal_pair", redundancy=0.7, unique_gex=0, unique_img=0, synergy=0.0,
             i_joint=0.7),
    ])
    rows = []
    for task, vals in {"xor": {"unimodal_gex": 0.5, "unimodal_img": 0.52, "concat": 0.48, "tensor_fusion": 0.95},
                       "rdn": {"unimodal_gex": 0.8, "unimodal_img": 0.7, "concat": 0.9,
                               "control_img@concat": 0.7}}.items():
        for e, v in vals.items():
            for fold in range(2):
                rows.append(dict(dataset="d", embedding=e, seed=0, task=task, metric="macro_f1", fold=fold,
                                 value=v + (0.01 if fold else -0.01)))
    out = validation_table(truth, pid, pd.DataFrame(rows), chance={"xor": 0.5})
    pid_rows = out[out.check == "pid"].set_index(["task", "quantity"])
    assert pid_rows.loc[("xor", "synergy"), "holds"] and pid_rows.loc[("xor", "synergy"), "estimate"] == 0.9
    assert not pid_rows.loc[("rdn", "redundancy"), "holds"]  # 0.3 bits off
    gain = out[out.check == "gain"].set_index("embedding")
    assert list(gain.index) == ["concat"]  # controls are probe references, not fused embeddings: no gain row
    assert gain.loc["concat", "estimate"] == pytest.approx(0.1) and not gain.loc["concat", "holds"]
    assert gain.loc["concat", "sis"] == pytest.approx(0.1 / 0.8)
    ch = out[out.check == "chance"].set_index("embedding")
    assert ch.loc["tensor_fusion", "estimate"] == pytest.approx(0.9) and ch.loc["tensor_fusion", "holds"]
    assert ch.loc["concat", "estimate"] == pytest.approx(-0.04) and ch.loc["concat", "holds"]
    # with an interval callable the gain check becomes "interval contains 0"
    out2 = validation_table(truth, pid, pd.DataFrame(rows), {"xor": 0.5}, interval=lambda m, e, t: (-0.02, 0.2))
    g2 = out2[out2.check == "gain"].set_index("embedding")
    assert g2.loc["concat", "holds"] and g2.loc["concat", "lower"] == -0.02
