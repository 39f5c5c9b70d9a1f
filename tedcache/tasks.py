"""What a task implies, in one place: whether it is a causal LM's next-token task, whether it labels tokens
rather than whole examples, the metric that picks the best epoch and which way is better, and its head."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    causal: bool  # next-token prediction on packed text (no labels)
    per_token: bool  # a label per token (tags; an answer's start and end) rather than per example
    metric: str  # what picks the best epoch and what studies compare
    head: str  # the model class's head: sequence, token, span (start/end per token) or lm

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER


LOWER_IS_BETTER = {"perplexity", "loss"}
TASK = {task.name: task for task in (
    Task("classification", causal=False, per_token=False, metric="accuracy", head="sequence"),
    Task("regression", causal=False, per_token=False, metric="spearman", head="sequence"),
    Task("causal-lm", causal=True, per_token=False, metric="perplexity", head="lm"),
    Task("token-classification", causal=False, per_token=True, metric="f1", head="token"),
    Task("question-answering", causal=False, per_token=True, metric="f1", head="span"),
)}
TASKS = tuple(TASK)
PRIMARY_METRIC = {name: task.metric for name, task in TASK.items()}
