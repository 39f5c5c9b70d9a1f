"""Paired statistics for two groups of runs trained on the same seeds and scored on the same test examples.

Two intervals, both 95%: over seeds (the mean of the per-seed differences, Student's t: what another
seed would give) and over test examples (a paired bootstrap that resamples examples, keeping every seed
of each: what another test set of this size would give). A difference is called only where both
exclude zero."""

from __future__ import annotations

import math

import numpy as np

from ..tasks import LOWER_IS_BETTER, TASK

MAX_SEEDS = 10_000


def seed_interval(differences: list[float]) -> dict:
    """Mean of paired per-seed differences with its 95% t interval (None bounds below two seeds)."""
    from scipy import stats

    d = np.asarray(differences, dtype=np.float64)
    result = {"n": len(d), "mean": float(d.mean()), "sd": float(d.std(ddof=1)) if len(d) > 1 else None,
              "low": None, "high": None}
    if len(d) > 1:
        if result["sd"] == 0:
            result["low"] = result["high"] = result["mean"]
        else:
            interval = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
            result["low"], result["high"] = float(interval.low), float(interval.high)
    return result


def seeds_needed(mean: float, sd: float | None) -> int | None:
    """Fewest paired seeds whose 95% t interval would exclude zero if the difference and its spread
    stayed as measured (None when there is no spread to extrapolate from or no difference)."""
    from scipy import stats

    if not sd or mean == 0:
        return None
    for n in range(2, MAX_SEEDS):
        if stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) < abs(mean):
            return n
    return MAX_SEEDS


def per_example(outputs: dict[str, np.ndarray], task: str) -> np.ndarray | None:
    """The test metric's per-example terms, where the metric is their mean: classification
    correctness, causal-lm block loss, question-answering F1 per question. None for regression (Spearman
    has no per-example terms) and token classification (entity F1 is not a mean over sentences)."""
    if task == "question-answering":
        return outputs["values"].astype(np.float64)
    if task == "classification":
        return (outputs["values"].argmax(-1) == outputs["labels"]).astype(np.float64)
    if TASK[task].causal:
        return outputs["values"].astype(np.float64)
    return None


def _metric(outputs: dict[str, np.ndarray], index: np.ndarray, task: str) -> float:
    from scipy.stats import spearmanr

    values, labels = outputs["values"][index].reshape(-1), outputs["labels"][index]
    return float(np.nan_to_num(spearmanr(values, labels).statistic))


def entity_counts(outputs: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    """Token classification: per test sentence, (true positive, false positive, false negative) entities
    as seqeval finds them; summed over sentences they give seqeval's micro precision, recall and F1."""
    from seqeval.metrics.sequence_labeling import get_entities

    cuts = np.flatnonzero(np.diff(outputs["example"])) + 1
    counts = []
    for gold, pred in zip(np.split(outputs["labels"], cuts), np.split(outputs["values"], cuts)):
        true, found = (set(get_entities([names[i] for i in ids])) for ids in (gold, pred))
        counts.append((len(true & found), len(found - true), len(true - found)))
    return np.asarray(counts, dtype=np.float64)


def _entity_f1(counts: np.ndarray) -> float:
    tp, fp, fn = counts.sum(0)
    return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def example_interval(a: list[dict], b: list[dict], task: str, resamples: int = 1000,
                     seed: int = 0, label_names: list[str] | None = None) -> dict | None:
    """Paired bootstrap over test examples of mean-over-seeds (A - B): `a` and `b` hold each seed's test
    outputs in the same seed order. The statistic is accuracy (classification), mean block loss in nats
    (causal-lm), Spearman (regression) or entity F1 over resampled sentences (token classification, which
    needs `label_names`); percentile interval from scipy.stats.bootstrap."""
    from scipy import stats

    n = len(a[0]["values"])
    unit = {"causal-lm": "loss (nats)", "token-classification": "entity F1 over sentences",
            "question-answering": "F1 over questions"}.get(task)
    terms_a, terms_b = [per_example(o, task) for o in a], [per_example(o, task) for o in b]
    if terms_a[0] is not None:
        differences = np.mean([x - y for x, y in zip(terms_a, terms_b)], axis=0)
        data, statistic, vectorized = (differences,), lambda x, axis=-1: np.mean(x, axis=axis), True
    else:
        if task == "token-classification":
            if not label_names:
                return None
            counts = [(entity_counts(x, label_names), entity_counts(y, label_names)) for x, y in zip(a, b)]
            n = len(counts[0][0])

            def metric_difference(index):
                return np.mean([_entity_f1(x[index]) - _entity_f1(y[index]) for x, y in counts])
        else:
            def metric_difference(index):
                return np.mean([_metric(x, index, task) - _metric(y, index, task) for x, y in zip(a, b)])

        def statistic(index):
            return metric_difference(index.astype(np.int64))

        data, vectorized = (np.arange(n),), False
    result = stats.bootstrap(data, statistic, vectorized=vectorized, n_resamples=resamples, method="percentile",
                             random_state=np.random.default_rng(seed))
    point = float(statistic(data[0])) if not vectorized else float(data[0].mean())
    return {"n": n, "mean": point, "low": float(result.confidence_interval.low),
            "high": float(result.confidence_interval.high), "unit": unit}


def excludes_zero(interval: dict | None) -> bool:
    return bool(interval) and interval["low"] is not None and (interval["low"] > 0 or interval["high"] < 0)


def better_of(a: str, b: str, by_seed: dict, by_example: dict | None, metric: str) -> str | None:
    """`a` or `b` where the difference is resolved (both intervals exclude zero, with one sign); else None."""
    if by_seed["n"] < 2 or not excludes_zero(by_seed):
        return None
    if by_example is not None and not (excludes_zero(by_example)
                                       and np.sign(by_example["mean"]) == np.sign(by_seed["mean"])):
        return None
    a_better = (by_seed["mean"] < 0) if metric in LOWER_IS_BETTER else (by_seed["mean"] > 0)
    return a if a_better else b


def verdict(a: str, b: str, by_seed: dict, by_example: dict | None, metric: str) -> str:
    """One sentence: which of `a` and `b` is better, or why that is not resolved and what would resolve it.
    For lower-is-better metrics (perplexity, and the causal-lm example interval in loss) a negative
    difference favours `a`."""
    if by_seed["n"] < 2:
        return f"{a} vs {b}: not resolved (needs at least 2 paired seeds, has {by_seed['n']})"
    better = better_of(a, b, by_seed, by_example, metric)
    if better is not None:
        return f"{better} beats {b if better == a else a} (both 95% intervals exclude zero)"
    seed_ok = excludes_zero(by_seed)
    needs = []
    if not seed_ok:
        n = seeds_needed(by_seed["mean"], by_seed["sd"])
        needs.append(f"about {n} paired seeds" if n else "more seeds (no spread or no difference yet)")
    if by_example is not None and not excludes_zero(by_example) and by_example["mean"] != 0:
        half = (by_example["high"] - by_example["low"]) / 2
        needs.append(f"about {math.ceil(by_example['n'] * (half / abs(by_example['mean'])) ** 2)} test examples")
    return (f"{a} vs {b}: not resolved" + (f"; a difference this size would need {' and '.join(needs)}"
                                           if needs else " (the two intervals disagree in sign)"))
