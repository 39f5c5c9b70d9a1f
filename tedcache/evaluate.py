"""Task metrics from predictions, and running a model over a split."""

from __future__ import annotations

import itertools

import numpy as np
import torch

PRIMARY_METRIC = {"classification": "accuracy", "regression": "spearman", "causal-lm": "perplexity"}
LOWER_IS_BETTER = {"perplexity"}


def better(a: dict, b: dict | None, metric: str) -> bool:
    """Whether result `a` beats result `b` (None: nothing to beat) on `metric`."""
    if b is None:
        return True
    return a[metric] < b[metric] if metric in LOWER_IS_BETTER else a[metric] > b[metric]


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def metrics(logits: np.ndarray, labels: np.ndarray, task: str) -> dict[str, float]:
    """accuracy + F1 (binary: positive class 1; else macro) for classification; pearson/spearman for regression."""
    if task == "regression":
        pred = logits.reshape(-1).astype(np.float64)
        gold = labels.astype(np.float64)
        return {"pearson": _pearson(pred, gold), "spearman": _pearson(_ranks(pred), _ranks(gold)),
                "mse": float(((pred - gold) ** 2).mean())}
    pred = logits.argmax(-1)
    num_classes = logits.shape[-1]
    f1s = []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    f1 = f1s[1] if num_classes == 2 else float(np.mean(f1s))
    return {"accuracy": float((pred == labels).mean()), "f1": float(f1)}


def perplexity_from_nll(nll: np.ndarray) -> dict[str, float]:
    """{"loss": mean next-token loss, "perplexity": its exp} from per-block mean losses (equal-length blocks)."""
    loss = float(np.mean(nll))
    return {"loss": loss, "perplexity": float(np.exp(loss))}


@torch.no_grad()
def model_outputs(model, batches, task: str) -> dict[str, np.ndarray]:
    """{"index": example_index, "values": logits (classification/regression) or each block's mean
    next-token loss (causal-lm), ["labels"]} over `batches`, in the order met."""
    from .losses import lm_loss

    model.eval()
    device = next(model.parameters()).device
    values, labels, index = [], [], []
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        logits = model(**inputs).logits
        if task == "causal-lm":
            values.extend(lm_loss(row[None], i[None], m[None]).item()
                          for row, i, m in zip(logits, inputs["input_ids"], inputs["attention_mask"]))
        else:
            values.extend(logits.float().cpu().numpy())
            labels.append(batch["labels"].numpy())
        index.append(batch["example_index"].numpy())
    result = {"index": np.concatenate(index) if index else np.zeros(0, dtype=np.int64), "values": np.asarray(values)}
    if labels:
        result["labels"] = np.concatenate(labels)
    return result


def evaluate(model, batches, task: str, processes=None) -> dict[str, float]:
    """The task's metrics of `model` over `batches` (causal-lm: loss and perplexity). With several
    `processes`, each scores every N-th batch and the outputs are gathered before the metrics."""
    from .distributed import ALONE

    processes = processes or ALONE
    mine = itertools.islice(batches, processes.rank, None, processes.size)
    parts = processes.gather(model_outputs(model, mine, task))
    full = [p for p in parts if len(p["index"])]
    merged = {key: np.concatenate([p[key] for p in full]) for key in full[0]}
    order = merged["index"].argsort()
    if task == "causal-lm":
        return perplexity_from_nll(merged["values"][order])
    return metrics(merged["values"][order], merged["labels"][order], task)
