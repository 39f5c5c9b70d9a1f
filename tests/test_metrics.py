"""evaluate.metrics (scipy / scikit-learn underneath) against numbers worked out by hand on small arrays."""

import warnings

import numpy as np
import pytest

from tedcache.evaluate import metrics


def one_hot_logits(pred, num_classes):
    """Logits whose argmax is `pred`."""
    logits = np.zeros((len(pred), num_classes), dtype=np.float32)
    logits[np.arange(len(pred)), pred] = 1.0
    return logits


def no_warnings(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args)


def test_regression_pearson_spearman_with_ties_and_mse():
    pred = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    gold = np.array([2.0, 4.0, 5.0, 4.0, 5.0])
    result = no_warnings(metrics, pred[:, None], gold, "regression")
    assert set(result) == {"pearson", "spearman", "mse"}
    # pearson: deviations (-2,-1,0,1,2) and (-2,0,1,0,1): sum of products 6, sums of squares 10 and 6 -> 6/sqrt(60)
    assert result["pearson"] == pytest.approx(6 / np.sqrt(60))  # 0.774597
    # spearman: gold ranks with ties averaged: 2 -> 1, the two 4s -> 2.5, the two 5s -> 4.5; pred ranks 1..5.
    # rank deviations (-2,-0.5,1.5,-0.5,1.5) and (-2,-1,0,1,2): products sum 7, squares 9 and 10 -> 7/sqrt(90)
    assert result["spearman"] == pytest.approx(7 / np.sqrt(90))  # 0.737865
    # mse: (1 + 4 + 4 + 0 + 0) / 5
    assert result["mse"] == pytest.approx(1.8)


def test_regression_ties_on_both_sides_and_a_perfect_rank_order():
    pred = np.array([0.1, 0.1, 0.5, 0.9])
    gold = np.array([1.0, 2.0, 2.0, 8.0])
    # ranks (1.5, 1.5, 3, 4) and (1, 2.5, 2.5, 4), mean 2.5: deviations (-1,-1,0.5,1.5) and (-1.5,0,0,1.5);
    # products 1.5 + 0 + 0 + 2.25 = 3.75, squares 4.5 and 4.5 -> 3.75 / 4.5
    assert metrics(pred, gold, "regression")["spearman"] == pytest.approx(3.75 / 4.5)  # 0.833333
    # a monotone but non-linear relation: spearman 1, pearson below 1
    result = metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 4.0, 9.0, 100.0]), "regression")
    assert result["spearman"] == pytest.approx(1.0) and result["pearson"] < 0.9


def test_regression_constant_prediction_gives_zero_correlations_without_a_warning():
    pred = np.full(4, 2.0)
    gold = np.array([1.0, 2.0, 3.0, 4.0])
    result = no_warnings(metrics, pred[:, None], gold, "regression")
    # zero variance: the correlation is undefined (scipy: nan); the metric reports 0.0 as it always did
    assert result["pearson"] == 0.0 and result["spearman"] == 0.0
    assert result["mse"] == pytest.approx((1 + 0 + 1 + 4) / 4)
    # constant gold as well
    result = no_warnings(metrics, gold[:, None], np.full(4, 3.0), "regression")
    assert result["pearson"] == 0.0 and result["spearman"] == 0.0


def test_binary_f1_is_the_f1_of_class_1():
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    pred = np.array([1, 0, 1, 1, 0, 0, 1, 1])
    result = no_warnings(metrics, one_hot_logits(pred, 2), labels, "classification")
    assert set(result) == {"accuracy", "f1"}
    # correct at positions 0, 2, 4, 5, 6 -> 5/8
    assert result["accuracy"] == pytest.approx(0.625)
    # class 1: tp = 3 (0, 2, 6), fp = 2 (3, 7), fn = 1 (1) -> 2*3 / (2*3 + 2 + 1) = 6/9
    assert result["f1"] == pytest.approx(2 / 3)
    # not class 0's F1: tp = 2 (4, 5), fp = 1, fn = 2 -> 4/7
    assert abs(result["f1"] - 4 / 7) > 0.05


def test_three_class_macro_f1():
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    result = no_warnings(metrics, one_hot_logits(pred, 3), labels, "classification")
    assert result["accuracy"] == pytest.approx(4 / 6)
    # class 0: tp 1, fp 1, fn 1 -> 2/4;  class 1: tp 2, fp 1, fn 0 -> 4/5;  class 2: tp 1, fp 0, fn 1 -> 2/3
    assert result["f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)  # 0.655556


def test_macro_f1_counts_a_class_that_never_occurs_as_zero():
    labels = np.array([0, 1, 2, 0])
    pred = np.array([0, 1, 2, 1])
    result = no_warnings(metrics, one_hot_logits(pred, 4), labels, "classification")
    # class 0: tp 1, fn 1 -> 2/3; class 1: tp 1, fp 1 -> 2/3; class 2: 1; class 3 (never seen nor predicted): 0
    assert result["f1"] == pytest.approx((2 / 3 + 2 / 3 + 1 + 0) / 4)  # 0.583333
    assert result["accuracy"] == pytest.approx(0.75)


def test_constant_class_predictions():
    labels = np.array([0, 1, 0, 1])
    # always 0: class 1 is never predicted (tp 0, fp 0, fn 2) -> F1 0, and no undefined-precision warning
    result = no_warnings(metrics, one_hot_logits(np.zeros(4, dtype=int), 2), labels, "classification")
    assert result == {"accuracy": 0.5, "f1": 0.0}
    # always 1: tp 2, fp 2, fn 0 -> 4/6
    result = no_warnings(metrics, one_hot_logits(np.ones(4, dtype=int), 2), labels, "classification")
    assert result["accuracy"] == 0.5 and result["f1"] == pytest.approx(2 / 3)
    # neither class 1 in the labels nor predicted: 0/0 -> 0.0
    result = no_warnings(metrics, one_hot_logits(np.zeros(3, dtype=int), 2), np.zeros(3, dtype=int), "classification")
    assert result == {"accuracy": 1.0, "f1": 0.0}
