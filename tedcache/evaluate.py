"""Task metrics from predictions, and running a model over a split."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .distributed import ALONE
from .loop import Validation
from .losses import lm_loss_per_block
from .qa import answer_questions, best_span, squad_metrics
from .taps import model_inputs, output_logits
from .tasks import LOWER_IS_BETTER, PRIMARY_METRIC, TASK


def task_validation(score, task: str, every: int = 0) -> Validation:
    """How a run of `task` is validated: `score()`'s primary metric picks the best state, in its direction."""
    metric = PRIMARY_METRIC[task]
    return Validation(score, metric, every, lower_is_better=metric in LOWER_IS_BETTER)


def _correlation(statistic, a: np.ndarray, b: np.ndarray) -> float:
    """scipy's pearsonr/spearmanr statistic; 0.0 where it is undefined (a constant input, or < 2 points)."""
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConstantInputWarning / NearConstantInputWarning
        value = float(statistic(a, b).statistic)
    return value if np.isfinite(value) else 0.0


def metrics(logits: np.ndarray, labels: np.ndarray, task: str) -> dict[str, float]:
    """accuracy + F1 (binary: positive class 1; else macro) for classification; pearson/spearman for regression."""
    # imported here: scipy.stats and sklearn.metrics add 1.5 s to the start of every tedcache command
    # (measured with python -X importtime), most of which never score anything
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score

    if task == "regression":
        pred = logits.reshape(-1).astype(np.float64)
        gold = labels.astype(np.float64)
        return {"pearson": _correlation(pearsonr, pred, gold), "spearman": _correlation(spearmanr, pred, gold),
                "mse": float(((pred - gold) ** 2).mean())}
    pred = logits.argmax(-1)
    num_classes = logits.shape[-1]
    if num_classes == 2:
        f1 = f1_score(labels, pred, labels=[0, 1], pos_label=1, average="binary", zero_division=0)
    else:
        f1 = f1_score(labels, pred, labels=list(range(num_classes)), average="macro", zero_division=0)
    return {"accuracy": float(accuracy_score(labels, pred)), "f1": float(f1)}


def token_metrics(pred: np.ndarray, gold: np.ndarray, example: np.ndarray, names: list[str]) -> dict[str, float]:
    """Token classification: entity precision / recall / F1 as seqeval computes them (the CoNLL
    evaluation, IOB tags) over sentences, and token accuracy. `pred`, `gold`: tag ids of every tagged word
    (its first sub-token), `example`: the sentence each belongs to, in order."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    cuts = np.flatnonzero(np.diff(example)) + 1
    sentences = [[[names[i] for i in part] for part in np.split(ids, cuts)] for ids in (gold, pred)]
    scores = {"f1": f1_score, "precision": precision_score, "recall": recall_score}
    result = {name: float(fn(*sentences, zero_division=0)) for name, fn in scores.items()}
    result["accuracy"] = float((pred == gold).mean()) if len(gold) else 0.0
    return result


def perplexity_from_nll(nll: np.ndarray) -> dict[str, float]:
    """{"loss": mean next-token loss, "perplexity": its exp} from per-block mean losses (equal-length blocks)."""
    loss = float(np.mean(nll))
    return {"loss": loss, "perplexity": float(np.exp(loss))}


@torch.no_grad()
def model_outputs(model, batches, task: str) -> dict[str, np.ndarray]:
    """{"index": example_index, "values": logits (classification/regression) or each block's mean
    next-token loss (causal-lm), ["labels"]} over `batches`, in the order met. Token classification: one
    entry per tagged word (predicted tag id, gold tag id), "index" its sentence. Question answering: per
    window its best_span row and "question"."""
    model.eval()
    device = next(model.parameters()).device
    values, labels, index = [], [], []
    for batch in batches:
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
        logits = output_logits(model(**inputs))
        if batch.get("padding"):  # a pass that only keeps the processes in step (see Processes.share)
            continue
        if task == "question-answering":
            values.extend(window_answers(logits.float().cpu().numpy(), batch["context_spans"].numpy(),
                                         batch["attention_mask"].numpy()))
            labels.append(batch["question_index"].numpy())
        elif TASK[task].causal:
            values.extend(lm_loss_per_block(logits, inputs["input_ids"], inputs["attention_mask"]).tolist())
        elif task == "token-classification":
            tagged = batch["labels"] >= 0
            values.extend(logits.argmax(-1).cpu()[tagged].numpy())
            labels.append(batch["labels"][tagged].numpy())
            index.append(batch["example_index"][:, None].expand_as(tagged)[tagged].numpy())
            continue
        else:
            values.extend(logits.float().cpu().numpy())
            labels.append(batch["labels"].numpy())
        index.append(batch["example_index"].numpy())
    result = {"index": np.concatenate(index) if index else np.zeros(0, dtype=np.int64), "values": np.asarray(values)}
    if labels:
        result["question" if task == "question-answering" else "labels"] = np.concatenate(labels)
    return result


def window_answers(logits: np.ndarray, spans: np.ndarray, mask: np.ndarray) -> list[tuple]:
    """best_span of each window of a batch: logits (B, L, 2), spans (B, L, 2), mask (B, L)."""
    return [best_span(row[m], span[m]) for row, span, m in zip(logits, spans, mask.astype(bool))]


def predictions(model, batches, task: str, processes=None, questions: list[dict] | None = None) -> dict[str, np.ndarray]:
    """`model`'s outputs over `batches` in example order: {"values": logits (classification, regression)
    or each block's mean next-token loss (causal-lm), ["labels"]}; question answering (which needs the
    split's `questions`): per question its F1 and more (see qa.answer_questions). With several
    `processes`, each scores every N-th batch and the outputs are gathered."""
    processes = processes or ALONE
    parts = processes.gather(model_outputs(model, processes.share(batches), task))
    full = [p for p in parts if len(p["index"])]
    merged = {key: np.concatenate([p[key] for p in full]) for key in full[0]}
    order = merged["index"].argsort(kind="stable")  # token classification: words keep their order
    if task == "question-answering":
        return answer_questions(merged["values"][order], merged["question"][order], questions)
    return {("example" if key == "index" else key): value[order] for key, value in merged.items()
            if key != "index" or task == "token-classification"}


def score(outputs: dict[str, np.ndarray], task: str, label_names: list[str] | None = None) -> dict[str, float]:
    """The task's metrics of `predictions` output (causal-lm: loss and perplexity; token classification,
    which needs the tag names: entity F1, precision, recall and token accuracy)."""
    if TASK[task].causal:
        return perplexity_from_nll(outputs["values"])
    if task == "token-classification":
        return token_metrics(outputs["values"], outputs["labels"], outputs["example"], label_names)
    if task == "question-answering":
        return squad_metrics(outputs)
    return metrics(outputs["values"], outputs["labels"], task)


def evaluate(model, batches, task: str, processes=None, label_names: list[str] | None = None,
             questions: list[dict] | None = None) -> dict[str, float]:
    """The task's metrics of `model` over `batches` (see predictions and score)."""
    return score(predictions(model, batches, task, processes, questions), task, label_names)
