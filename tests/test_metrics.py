"""GLUE metrics against values computed by hand."""

import math

import numpy as np
import pytest

from lorabench.metrics import compute_metrics


def test_accuracy_f1_mcc_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    p = np.array([1, 1, 0, 0, 0, 1, 1, 0])
    # TP=3 (idx 0,1,6), FN=1 (2), FP=1 (5), TN=3 (3,4,7)
    m = compute_metrics(["accuracy", "f1", "mcc"], p, y)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert m["mcc"] == pytest.approx((3 * 3 - 1 * 1) / math.sqrt(4 * 4 * 4 * 4))


def test_pearson_spearman_by_hand():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([1.0, 3.0, 2.0, 4.0])
    m = compute_metrics(["pearson", "spearman"], p, y)
    # both centred at 2.5: deviations y (-1.5,-.5,.5,1.5), p (-1.5,.5,-.5,1.5): cov 4.0, var 5 each
    assert m["pearson"] == pytest.approx(4.0 / 5.0)
    # ranks equal the values here, so spearman = pearson
    assert m["spearman"] == pytest.approx(0.8)


def test_constant_predictions_give_zero_correlation():
    m = compute_metrics(["pearson", "mcc"], np.zeros(4), np.array([0.0, 1.0, 0.0, 1.0]))
    assert m["pearson"] == 0.0 and m["mcc"] == 0.0


def test_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(["bleu"], np.zeros(2), np.zeros(2))


def test_constant_non_round_predictions_give_zero_correlation():
    """A constant predictor of a value whose std rounds to an ulp above 0 (the mean-prediction baseline)."""
    p = np.full(1500, 2.3456789, dtype=np.float32)
    assert np.std(p) > 0  # the rounding this test is about
    m = compute_metrics(["pearson", "spearman"], p, np.linspace(0, 5, 1500))
    assert m == {"pearson": 0.0, "spearman": 0.0}
