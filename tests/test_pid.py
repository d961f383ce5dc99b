"""PID estimator: textbook distributions, agreement with dit's BROJA, recovery of planted terms."""

import itertools

import numpy as np
import pandas as pd
import pytest

from workflow_scripts.evaluation import pid


def gate(f):
    """Joint table p(x1, x2, y) of y = f(x1, x2) with independent uniform bits x1, x2."""
    outs = [(a, b, f(a, b)) for a, b in itertools.product((0, 1), (0, 1))]
    ys = sorted({o[2] for o in outs})
    p = np.zeros((2, 2, len(ys)))
    for a, b, y in outs:
        p[a, b, ys.index(y)] += 0.25
    return p


XOR = gate(lambda a, b: a ^ b)
AND = gate(lambda a, b: a & b)
COPY = gate(lambda a, b: 2 * a + b)  # Y = (X1, X2)
UNQ = gate(lambda a, b: a)  # Y = X1
RDN = np.zeros((2, 2, 2))
RDN[0, 0, 0] = RDN[1, 1, 1] = 0.5  # X1 = X2 = Y


@pytest.mark.parametrize(
    "p, expected",
    [
        # (redundancy, unique_1, unique_2, synergy) in bits
        (XOR, (0.0, 0.0, 0.0, 1.0)),
        (RDN, (1.0, 0.0, 0.0, 0.0)),
        (COPY, (0.0, 1.0, 1.0, 0.0)),
        (UNQ, (0.0, 1.0, 0.0, 0.0)),
        # AND of two uniform bits: BROJA gives redundancy I(Y; X1) = 1.5 - 0.75 log2 3 = 0.3113 bits, no unique
        # information and synergy 0.5 bits (Bertschinger et al. 2014, doi:10.3390/e16042161, Table 1;
        # Griffith & Koch 2014, "Quantifying synergistic mutual information", arXiv:1205.4265)
        (AND, (1.5 - 0.75 * np.log2(3), 0.0, 0.0, 0.5)),
    ],
    ids=["xor", "rdn", "copy", "unq", "and"],
)
def test_textbook_distributions(p, expected):
    r = pid.pid_broja(p)
    got = (r["redundancy"], r["unique_1"], r["unique_2"], r["synergy"])
    np.testing.assert_allclose(got, expected, atol=2e-4)
    # the four terms add up to the mutual informations they decompose
    assert r["redundancy"] + r["unique_1"] == pytest.approx(r["i_1"], abs=1e-6)
    assert r["redundancy"] + r["unique_2"] == pytest.approx(r["i_2"], abs=1e-6)
    assert sum(got) == pytest.approx(r["i_12"], abs=1e-6)


@pytest.mark.parametrize("p", [AND, COPY, "noisy"], ids=["and", "copy", "noisy"])
def test_agrees_with_dit_broja(p):
    """The cvxpy programme and dit's PID_BROJA (the reference solver) give the same decomposition."""
    import dit
    from dit.pid import PID_BROJA

    if isinstance(p, str):  # a random distribution on 5 of the 8 outcomes of three bits
        p = np.zeros((2, 2, 2))
        support = [(0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
        for o, w in zip(support, np.random.default_rng(3).dirichlet(np.ones(len(support)))):
            p[o] = w
    outcomes = [tuple(int(v) for v in o) for o in np.argwhere(p > 0)]
    d = dit.Distribution(outcomes, [p[o] for o in outcomes])
    ref = PID_BROJA(d, [[0], [1]], [2], rng=np.random.default_rng(0))
    ours = pid.pid_broja(p)
    np.testing.assert_allclose(
        [ours["redundancy"], ours["unique_1"], ours["unique_2"], ours["synergy"]],
        [ref.get_pi(((0,), (1,))), ref.get_pi(((0,),)), ref.get_pi(((1,),)), ref.get_pi(((0, 1),))],
        atol=2e-3,
    )


def test_mutual_information_matches_sklearn():
    from sklearn.metrics import mutual_info_score

    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, 500)
    y = (x + rng.integers(0, 2, 500)) % 3
    assert pid.plugin_mi(x, y) == pytest.approx(mutual_info_score(x, y) / np.log(2), rel=1e-9)


def test_invalid_joint_is_rejected():
    with pytest.raises(ValueError, match="3-D"):
        pid.pid_broja(np.ones((2, 2)) / 4)
    with pytest.raises(ValueError, match="sums to"):
        pid.pid_broja(np.ones((2, 2, 2)))


def test_discretise_is_deterministic_and_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 5)) * 10
    lab = rng.integers(0, 4, 400)
    X = centres[lab] + rng.normal(size=(400, 5))
    c1, c2 = pid.discretise(X, 4, seed=1), pid.discretise(X, 4, seed=1)
    np.testing.assert_array_equal(c1, c2)
    assert pid.plugin_mi(c1, lab) == pytest.approx(pid.plugin_mi(lab, lab), abs=1e-9)  # a relabelling
    assert len(np.unique(pid.discretise(np.ones((10, 2)), 4))) == 1  # k clipped to the distinct rows


def test_gain_captured():
    assert pid.gain_captured(1.0, 0.2, 0.1, 1.0) == pytest.approx(1.0)
    assert pid.gain_captured(0.2, 0.2, 0.1, 1.0) == pytest.approx(0.0)
    assert np.isnan(pid.gain_captured(0.5, 0.5, 0.5, 0.5))


def test_pid_table_recovers_planted_terms_on_the_synthetic_data():
    """On 2 slides x 300 spots, the estimate from k-means clusters of the two embeddings is within 0.15 bits of
    every planted term of the XOR, redundant and unique tasks (tolerance stated in docs/synthetic.md)."""
    from workflow_scripts.data.synthetic import simulate, task_joints

    gen = {"n_slides": 2, "n_donors": 1}
    a = simulate(gen)
    tasks = ["synergy", "redundant", "unique_gex"]
    targets = {t: (np.arange(a.n_obs), a.obs[t].astype(str)) for t in tasks}
    concat = np.hstack([a.obsm["img_embedding"], a.obsm["gex_embedding"]])
    est = pid.pid_table("syn", a.obsm["gex_embedding"], a.obsm["img_embedding"], targets, {("concat", 0): concat},
                        {"k": 6, "n_init": 4})
    truth = pid.pid_truth_table("syn", task_joints(gen, tasks)).set_index("task")
    pair = est[est.embedding == pid.PAIR].set_index("task")
    for t in tasks:
        for term in pid.PID_TERMS:
            assert abs(pair.loc[t, term] - truth.loc[t, term]) <= 0.15, (t, term)
    assert truth.loc["synergy", "synergy"] == pytest.approx(1.0, abs=1e-4)
    # concat is lossless: it holds the pair's information about the XOR label
    row = est[(est.embedding == "concat") & (est.task == "synergy")].iloc[0]
    assert row["i_fused"] >= row["i_joint"] - 0.1 and row["gain_captured"] > 0.85
    assert list(est.columns) == pid.PID_COLUMNS


def test_pid_table_rejects_unknown_params():
    with pytest.raises(ValueError, match="unknown key"):
        pid.pid_table("d", np.zeros((4, 2)), np.zeros((4, 2)), {}, None, {"kk": 3})


def test_truth_cli_writes_the_planted_table(tmp_path):
    import json

    out = tmp_path / "truth.tsv"
    pid.main(["truth", "--dataset", "syn", "--params",
              json.dumps({"generator": {"mixtures": {"m": {"redundant": 1.0}}}, "tasks": {"xor": "synergy", "m": "m"}}),
              "--out", str(out)])
    df = pd.read_csv(out, sep="\t").set_index("task")
    assert df.loc["xor", "synergy"] == pytest.approx(1.0, abs=1e-4)
    assert df.loc["m", "redundancy"] == pytest.approx(np.log2(3), abs=1e-4)  # a mixture of one mechanism
