"""Task metrics from predictions, and running a model over a split."""

from __future__ import annotations

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
def block_losses(model, batches) -> np.ndarray:
    """The mean next-token loss of every block, in source order."""
    from .losses import lm_loss

    model.eval()
    losses, index = [], []
    device = next(model.parameters()).device
    for batch in batches:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        losses.extend(lm_loss(row[None], i[None], m[None]).item() for row, i, m in zip(logits, ids, mask))
        index.append(batch["example_index"])
    return np.asarray(losses)[torch.cat(index).argsort().numpy()]


def evaluate(model, batches, task: str) -> dict[str, float]:
    """The task's metrics of `model` over `batches` (causal-lm: loss and perplexity)."""
    if task == "causal-lm":
        return perplexity_from_nll(block_losses(model, batches))
    return metrics(*predict(model, batches), task)


@torch.no_grad()
def predict(model, batches) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over batches, in source order."""
    model.eval()
    logits, labels, index = [], [], []
    device = next(model.parameters()).device
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        logits.append(model(**inputs).logits.float().cpu())
        labels.append(batch["labels"])
        index.append(batch["example_index"])
    order = torch.cat(index).argsort()
    return torch.cat(logits)[order].numpy(), torch.cat(labels)[order].numpy()
