"""Chance level of macro-F1, chance-corrected scores and the absolute gain."""

import numpy as np
import pytest
from sklearn.dummy import DummyClassifier
from sklearn.metrics import f1_score

from workflow_scripts.evaluation import scores


def test_expected_macro_f1_matches_a_monte_carlo_stratified_classifier():
    """The closed form equals the mean macro-F1 of scikit-learn's stratified DummyClassifier over many draws.

    The classifier predicts i.i.d. from the training class shares, so one prediction over R copies of the test set
    gives R independent replicates.
    """
    y_train = np.repeat(["a", "b", "c"], [60, 30, 10])
    y_test = np.repeat(["a", "b", "c"], [25, 12, 5])
    labels = np.array(["a", "b", "c"])
    R, n = 4000, len(y_test)
    clf = DummyClassifier(strategy="stratified", random_state=0).fit(np.zeros((len(y_train), 1)), y_train)
    pred = clf.predict(np.zeros((R * n, 1))).reshape(R, n)
    truth = np.broadcast_to(y_test, (R, n))
    f1 = []
    for c in labels:
        tp = ((pred == c) & (truth == c)).sum(axis=1)
        f1.append(2 * tp / ((truth == c).sum(axis=1) + (pred == c).sum(axis=1)))
    vals = np.mean(f1, axis=0)
    for r in range(3):  # the vectorised F1 is scikit-learn's
        assert vals[r] == pytest.approx(f1_score(y_test, pred[r], labels=labels, average="macro", zero_division=0))
    mc, se = vals.mean(), vals.std() / np.sqrt(R)
    exact = scores.expected_macro_f1_from_labels(y_train, y_test)
    assert abs(exact - mc) < 4 * se, (exact, mc, se)


def test_large_balanced_and_imbalanced_tests_approach_one_over_k():
    # with prediction shares equal to the test shares, macro-F1 at chance tends to 1/K whatever the imbalance
    assert scores.expected_macro_f1([5000, 5000], [0.5, 0.5]) == pytest.approx(0.5, abs=1e-3)
    assert scores.expected_macro_f1([8000, 1500, 500], [0.8, 0.15, 0.05]) == pytest.approx(1 / 3, abs=2e-3)
    # a degenerate predictor of one class: F1 of that class is 2n_k/(n_k + N), the others 0
    assert scores.expected_macro_f1([10, 30], [1.0, 0.0]) == pytest.approx((2 * 10 / 50) / 2)


def test_small_sample_expectation_is_exact():
    """n = 2, one spot per class, p = 1/2: enumerate the four equally likely predictions by hand."""
    # predictions (a,a): F1_a = 2/3, F1_b = 0; (b,b): 0, 2/3; (a,b): 1, 1; (b,a): 0, 0 -> mean macro = 5/12
    assert scores.expected_macro_f1([1, 1], [0.5, 0.5]) == pytest.approx(5 / 12, abs=1e-12)


def test_invalid_inputs():
    with pytest.raises(ValueError, match=">= 1 test spot"):
        scores.expected_macro_f1([3, 0], [0.5, 0.5])
    with pytest.raises(ValueError, match="equal length"):
        scores.expected_macro_f1([3, 2], [1.0])


def test_chance_corrected_and_gain():
    assert scores.chance_corrected(0.5, 0.5) == 0.0
    assert scores.chance_corrected(1.0, 0.25) == 1.0
    assert scores.chance_corrected(0.25, 0.5) == pytest.approx(-0.5)
    np.testing.assert_allclose(scores.chance_corrected([0.6, 0.8], [0.5, 0.5]), [0.2, 0.6])
    assert scores.absolute_gain(0.9, 0.5, 0.6) == pytest.approx(0.3)
    # fold-paired: the gain of each fold over that fold's better modality
    np.testing.assert_allclose(scores.absolute_gain([0.7, 0.5], [0.6, 0.6], [0.4, 0.7]), [0.1, -0.2])
    # defined where SIS is not (best unimodal R2 <= 0)
    assert scores.absolute_gain(0.9, -0.01, -0.02) == pytest.approx(0.91)
