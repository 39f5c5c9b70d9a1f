"""Extractive question answering: reading SQuAD json, labelling windows (tedcache.data.load_questions
makes them), picking each question's answer from the start/end logits of its windows, and scoring
answers as the official SQuAD 2.0 script does.

A long context is cut into windows of at most `max_length` tokens (the question, then a part of the
context), consecutive windows sharing `doc_stride` tokens. Each window is one example: its label is the
(start, end) token of the first gold answer when the answer lies wholly inside the window, else (0, 0),
the no-answer position. Each context token keeps its character span in the context, so a predicted
token span maps back to text."""

from __future__ import annotations

import collections
import json
import re
import string
from pathlib import Path

import datasets
import numpy as np

from .errors import TedcacheError

NO_ANSWER = 0  # the token position that stands for "no answer in this window" ([CLS] for BERT-style models)
MAX_ANSWER_TOKENS = 30  # longest span considered (as HF's run_qa)
NOT_CONTEXT = -1  # character span of a token that is not part of the context (question, special tokens)


def question_columns(cfg) -> tuple[str, str, str]:
    """(question, context, answers) column names: --text-column / --text-pair-column / --label-column
    when given, else question / context / answers (SQuAD's)."""
    return (cfg.text_column if cfg.text_column != "text" else "question", cfg.text_pair_column or "context",
            cfg.label_column if cfg.label_column != "label" else "answers")


def doc_stride(cfg) -> int:
    """Tokens consecutive windows share: --doc-stride, else a third of --max-length (HF's 128 of 384)."""
    return cfg.doc_stride if cfg.doc_stride is not None else cfg.max_length // 3


def read_squad_json(path: str) -> datasets.Dataset | None:
    """A SQuAD 1.1/2.0 json file ({"data": [{"paragraphs": [{"context", "qas": [...]}]}]}) as one row per
    question (id, question, context, answers {text, answer_start}); None for other json files."""
    with open(path) as handle:
        head = handle.read(64).lstrip()
    if not head.startswith("{"):
        return None
    try:
        loaded = json.loads(Path(path).read_text())
    except json.JSONDecodeError:
        return None  # json lines, read as a table
    if not isinstance(loaded, dict) or not isinstance(loaded.get("data"), list):
        return None
    rows = collections.defaultdict(list)
    for article in loaded["data"]:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                rows["id"].append(str(qa.get("id", len(rows["id"]))))
                rows["question"].append(qa["question"])
                rows["context"].append(paragraph["context"])
                rows["answers"].append({"text": [a["text"] for a in answers],
                                        "answer_start": [int(a["answer_start"]) for a in answers]})
    if not rows:
        raise TedcacheError(f"{path} is SQuAD json without questions; give a file with at least one question")
    return datasets.Dataset.from_dict(dict(rows))


def checked_answers(value, row: int, context: str, source: str) -> tuple[list[str], list[int]]:
    """An answers cell ({"text": [...], "answer_start": [...]}, or a list of {"text", "answer_start"})
    checked against its context."""
    if isinstance(value, list):
        value = {"text": [a["text"] for a in value], "answer_start": [a["answer_start"] for a in value]}
    if not isinstance(value, dict) or "text" not in value or "answer_start" not in value:
        raise TedcacheError(f"{source}: row {row}: answers must be {{'text': [...], 'answer_start': [...]}} "
                            "(SQuAD's form); give an empty text list for an unanswerable question")
    texts, starts = list(value["text"] or []), [int(s) for s in value["answer_start"] or []]
    if len(texts) != len(starts):
        raise TedcacheError(f"{source}: row {row} has {len(texts)} answer texts but {len(starts)} answer_start "
                            "values; give one start per answer")
    for text, start in zip(texts, starts):
        if context[start:start + len(text)] != text:
            raise TedcacheError(f"{source}: row {row}: answer '{text[:40]}' is not at character {start} of its "
                                "context; fix answer_start (the answer must be a span of the context)")
    return texts, starts


def answer_tokens(spans: np.ndarray, start: int, end: int) -> tuple[int, int]:
    """The window's (first, last) token covering characters start:end, or the no-answer position when
    the answer is not wholly inside the window's part of the context."""
    context = np.flatnonzero(spans[:, 0] != NOT_CONTEXT)
    if not len(context) or start < spans[context[0], 0] or end > spans[context[-1], 1]:
        return NO_ANSWER, NO_ANSWER
    first = context[spans[context, 0] <= start][-1]
    last = context[spans[context, 1] >= end][0]
    return int(first), int(last)


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
