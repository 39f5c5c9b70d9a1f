"""Paired statistics: the seed interval against the textbook formula, the per-example bootstrap against a
bootstrap written out here, and the verdicts that may or may not call a winner."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tedcache.experiments.stats import example_interval, seed_interval, seeds_needed, verdict


def test_seed_interval_is_the_t_interval():
    d = [0.004, -0.002, 0.007, 0.001, 0.003]
    got = seed_interval(d)
    mean, sd = np.mean(d), np.std(d, ddof=1)
    half = scipy_stats.t.ppf(0.975, len(d) - 1) * sd / math.sqrt(len(d))
    assert got["mean"] == pytest.approx(mean) and got["sd"] == pytest.approx(sd)
    assert (got["low"], got["high"]) == pytest.approx((mean - half, mean + half))
    assert seed_interval([0.01])["low"] is None


def test_seeds_needed_is_the_first_count_whose_interval_excludes_zero():
    n = seeds_needed(0.4, 1.0)
    assert scipy_stats.t.ppf(0.975, n - 1) / math.sqrt(n) < 0.4 <= scipy_stats.t.ppf(0.975, n - 2) / math.sqrt(n - 1)
    assert seeds_needed(0.0, 1.0) is None and seeds_needed(0.3, None) is None


def _classifier_outputs(correct: np.ndarray, labels: np.ndarray) -> dict:
    """Two-class logits that are right exactly where `correct` is true."""
    predicted = np.where(correct, labels, 1 - labels)
    return {"values": np.eye(2)[predicted].astype(np.float32), "labels": labels}


def test_example_bootstrap_matches_a_hand_written_one():
    rng = np.random.default_rng(0)
    n, seeds = 1500, 3
    labels = rng.integers(0, 2, n)
    a = [_classifier_outputs(rng.random(n) < 0.62, labels) for _ in range(seeds)]
    b = [_classifier_outputs(rng.random(n) < 0.55, labels) for _ in range(seeds)]
    got = example_interval(a, b, "classification", resamples=2000)
    per_example = np.mean([(x["values"].argmax(1) == labels) * 1.0 - (y["values"].argmax(1) == labels)
                           for x, y in zip(a, b)], axis=0)
    draws = [per_example[rng.integers(0, n, n)].mean() for _ in range(2000)]
    assert got["mean"] == pytest.approx(per_example.mean())
    assert got["low"] == pytest.approx(np.percentile(draws, 2.5), abs=0.004)
    assert got["high"] == pytest.approx(np.percentile(draws, 97.5), abs=0.004)
    assert got["low"] > 0  # a 7-point gap on 1,500 examples is resolved
    same = example_interval(a, a, "classification")
    assert same["low"] == same["high"] == 0.0


def test_regression_bootstrap_resamples_examples_for_spearman():
    rng = np.random.default_rng(1)
    gold = rng.normal(size=400)
    good = [{"values": (gold + rng.normal(scale=0.5, size=400))[:, None], "labels": gold} for _ in range(2)]
    poor = [{"values": (gold + rng.normal(scale=2.0, size=400))[:, None], "labels": gold} for _ in range(2)]
    got = example_interval(good, poor, "regression", resamples=200)
    assert 0 < got["low"] < got["mean"] < got["high"]


def test_verdict_calls_a_winner_only_when_both_intervals_exclude_zero():
    resolved = {"n": 8, "mean": 0.01, "sd": 0.004, "low": 0.006, "high": 0.014}
    unresolved = {"n": 8, "mean": 0.004, "sd": 0.01, "low": -0.004, "high": 0.012}
    example_yes = {"n": 2551, "mean": 0.01, "low": 0.004, "high": 0.016}
    example_no = {"n": 2551, "mean": 0.004, "low": -0.002, "high": 0.010}
    assert verdict("ted", "kd", resolved, example_yes, "accuracy") == "ted beats kd (both 95% intervals exclude zero)"
    assert verdict("ted", "kd", resolved, example_yes, "perplexity").startswith("kd beats ted")
    lost = verdict("ted", "kd", unresolved, example_no, "accuracy")
    assert "not resolved" in lost and "beats" not in lost
    assert f"about {seeds_needed(0.004, 0.01)} paired seeds" in lost
    assert f"about {math.ceil(2551 * (0.006 / 0.004) ** 2)} test examples" in lost
    assert "not resolved" in verdict("ted", "kd", resolved, example_no, "accuracy")
    assert "at least 2 paired seeds" in verdict("ted", "kd", {"n": 1, "mean": 0.1, "sd": None, "low": None,
                                                              "high": None}, None, "accuracy")
