"""Extractive question answering's reading half: question/context/answers rows cut into windows of at most
max_length tokens, consecutive windows sharing doc_stride tokens; each window's label is the (start, end)
token of the first gold answer when it lies wholly inside the window, else (0, 0), the no-answer position;
each context token keeps its character span."""

from __future__ import annotations

import numpy as np

from ..errors import TedcacheError
from .examples import Examples, TokenSpool
from .files import check_columns
from .fingerprint import HASHED_ROWS, hash_array, hash_rows, table_digest

NO_ANSWER = 0  # the token position that stands for "no answer in this window" ([CLS] for BERT-style models)


NOT_CONTEXT = -1  # character span of a token that is not part of the context (question, special tokens)


def question_columns(cfg) -> tuple[str, str, str]:
    """(question, context, answers) column names: --text-column / --text-pair-column / --label-column
    when given, else question / context / answers (SQuAD's)."""
    return (cfg.text_column if cfg.text_column != "text" else "question", cfg.text_pair_column or "context",
            cfg.label_column if cfg.label_column != "label" else "answers")


def doc_stride(cfg) -> int:
    """Tokens consecutive windows share: --doc-stride, else a third of --max-length (HF's 128 of 384)."""
    return cfg.doc_stride if cfg.doc_stride is not None else cfg.max_length // 3


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


def load_questions(table, cfg, tokenizer, source: str):
    """Rows of question / context / answers -> an Examples of windows (see the module doc), with
    per token its character span in the context (`context_spans`), per window its question
    (`question_index`), and per question its id, context and gold answer texts (`questions`)."""
    question_col, context_col, answer_col = question_columns(cfg)
    id_col = "id" if "id" in table.column_names else None
    check_columns(table, [question_col, context_col, answer_col], source)
    if not tokenizer.is_fast:
        raise TedcacheError("question-answering needs a fast tokenizer (it maps tokens to characters); "
                            "save the model with its tokenizer.json")
    stride = doc_stride(cfg)
    if stride >= cfg.max_length // 2:
        raise TedcacheError(f"--doc-stride ({stride}) must be below half of --max-length "
                            f"({cfg.max_length}); e.g. --doc-stride {cfg.max_length // 3}")
    columns = [id_col, question_col, context_col, answer_col]
    ids, types, spans = TokenSpool(np.int32), TokenSpool(np.int8), TokenSpool(np.int32)  # spans: 2 a token
    lengths, labels, owner, questions, digest = [], [], [], [], table_digest(columns)
    for first in range(0, len(table), HASHED_ROWS):
        rows = table[first:first + HASHED_ROWS]
        hash_rows(digest, rows, columns)
        for name in (question_col, context_col):
            if any(not isinstance(t, str) or not t for t in rows[name]):
                raise TedcacheError(f"{source}: column '{name}' has empty or non-text rows; drop or fill them")
        try:
            enc = tokenizer(rows[question_col], rows[context_col], truncation="only_second",
                            max_length=cfg.max_length, stride=stride, return_overflowing_tokens=True,
                            return_offsets_mapping=True)
        except Exception as exc:  # the tokenizers library raises a bare Exception when a question leaves no room
            raise TedcacheError(f"{source}: a question leaves no room for its context in --max-length "
                                f"{cfg.max_length} with --doc-stride {stride}; raise --max-length or "
                                f"lower --doc-stride ({str(exc).splitlines()[0][:80]})") from exc
        answers = [checked_answers(value, first + i, context, source)
                   for i, (value, context) in enumerate(zip(rows[answer_col], rows[context_col]))]
        for i, (context, (texts, _)) in enumerate(zip(rows[context_col], answers)):
            row_id = str(rows[id_col][i]) if id_col else str(first + i)
            questions.append({"id": row_id, "context": context, "answers": texts})
        for window, row in enumerate(enc["overflow_to_sample_mapping"]):
            in_context = np.asarray([s == 1 for s in enc.sequence_ids(window)])
            offsets = np.asarray(enc["offset_mapping"][window], dtype=np.int32).reshape(-1, 2)
            window_spans = np.where(in_context[:, None], offsets, NOT_CONTEXT).astype(np.int32)
            texts, starts = answers[row]
            labels.append(answer_tokens(window_spans, starts[0], starts[0] + len(texts[0])) if texts
                          else (NO_ANSWER, NO_ANSWER))
            ids.extend(np.asarray(enc["input_ids"][window]))
            if "token_type_ids" in enc:
                types.extend(np.asarray(enc["token_type_ids"][window]))
            spans.extend(window_spans.ravel())
            lengths.append(len(enc["input_ids"][window]))
            owner.append(first + row)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1, 2)
    fingerprint = digest.hexdigest() + f"-stride{stride}" + hash_array(labels)
    return Examples(ids.array(), np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
                    types.array() if types.count else None, labels, fingerprint,
                    context_spans=spans.array().reshape(-1, 2), question_index=np.asarray(owner, dtype=np.int64),
                    questions=questions)
