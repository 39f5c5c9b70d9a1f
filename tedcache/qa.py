"""Extractive question answering's scoring half: each question's answer picked from the start/end logits
of its windows (tedcache.data.questions makes them), and answers scored as the official SQuAD 2.0 script
does."""

from __future__ import annotations

import collections
import re
import string

import numpy as np

from .data.questions import NO_ANSWER, NOT_CONTEXT

MAX_ANSWER_TOKENS = 30  # longest span considered (as HF's run_qa)


def best_span(logits: np.ndarray, spans: np.ndarray) -> tuple[float, float, int, int]:
    """One window's (best span score, no-answer score, character start, character end): the span of context
    tokens i <= j < i + MAX_ANSWER_TOKENS with the highest start_i + end_j, and start + end at the
    no-answer position. logits (tokens, 2), spans (tokens, 2)."""
    null = float(logits[NO_ANSWER, 0] + logits[NO_ANSWER, 1])
    context = np.flatnonzero(spans[:, 0] != NOT_CONTEXT)
    if not len(context):
        return float("-inf"), null, 0, 0
    scores = logits[context, 0][:, None] + logits[context, 1][None, :]
    gap = context[None, :] - context[:, None]
    scores = np.where((gap >= 0) & (gap < MAX_ANSWER_TOKENS), scores, -np.inf)
    i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return float(scores[i, j]), null, int(spans[context[i], 0]), int(spans[context[j], 1])


def answer_questions(windows: np.ndarray, question_index: np.ndarray, questions: list[dict]) -> dict:
    """Per question, from its windows' best_span rows (best, null, char start, char end): the best span
    over the windows, or no answer where the lowest no-answer score beats it (SQuAD 2.0, threshold 0);
    scored against the gold answers. Returns per question "values" (F1), "exact" and "has_answer"."""
    best = np.full(len(questions), -np.inf)
    null = np.full(len(questions), np.inf)
    chosen = np.zeros((len(questions), 2), dtype=np.int64)
    for (score, null_score, start, end), q in zip(windows, question_index):
        if score > best[q]:
            best[q], chosen[q] = score, (start, end)
        null[q] = min(null[q], null_score)
    f1, exact = np.zeros(len(questions)), np.zeros(len(questions))
    for q, question in enumerate(questions):
        start, end = chosen[q]
        predicted = "" if null[q] > best[q] else question["context"][start:end]
        exact[q], f1[q] = squad_scores(predicted, question["answers"])
    has_answer = np.asarray([bool(q["answers"]) for q in questions])
    return {"values": f1, "exact": exact, "has_answer": has_answer}


def squad_metrics(outputs: dict) -> dict[str, float]:
    """Exact match and F1 over questions (fractions, not the official script's percentages), and each
    over the answerable and the unanswerable questions where there are some."""
    has = outputs["has_answer"].astype(bool)
    result = {"f1": float(outputs["values"].mean()), "exact": float(outputs["exact"].mean())}
    for name, part in (("has_answer", has), ("no_answer", ~has)):
        if part.any():
            result[f"{name}_f1"] = float(outputs["values"][part].mean())
            result[f"{name}_exact"] = float(outputs["exact"][part].mean())
    return result


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_scores(predicted: str, answers: list[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction: the best over the gold answers; an unanswerable question
    (no gold answer with text) scores 1 only for an empty prediction."""
    golds = [a for a in answers if normalize_answer(a)] or [""]
    scores = [_exact_f1(predicted, gold) for gold in golds]
    return max(e for e, _ in scores), max(f for _, f in scores)


def _exact_f1(predicted: str, gold: str) -> tuple[float, float]:
    pred_tokens, gold_tokens = normalize_answer(predicted).split(), normalize_answer(gold).split()
    exact = float(pred_tokens == gold_tokens)
    if not pred_tokens or not gold_tokens:
        return exact, exact
    common = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if common == 0:
        return exact, 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return exact, 2 * precision * recall / (precision + recall)
