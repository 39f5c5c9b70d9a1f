"""Tokenized examples in flat (CSR) arrays, and the spool they are built in."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass

import numpy as np

from ..errors import TedcacheError

IGNORED = -100  # token-classification label of positions that are not a word's first sub-token


UNTAGGED = -1  # token-classification label of a word's first sub-token without a tag (unlabelled transfer text)


@dataclass
class Examples:
    """Tokenized examples stored flat (CSR): example i owns tokens offsets[i]:offsets[i+1]."""

    input_ids: np.ndarray  # (T,) int32
    offsets: np.ndarray  # (E+1,) int64
    token_type_ids: np.ndarray | None  # (T,) int8, when the tokenizer makes them
    labels: np.ndarray | None  # (E,) int64 class ids or float32 targets; None for causal-lm blocks
    fingerprint: str  # hash of the raw texts and labels that produced these examples
    token_labels: np.ndarray | None = None  # (T,) int16 token-classification tag ids, IGNORED off first sub-tokens
    # question-answering (see tedcache.data.questions): labels are (E, 2) answer start/end tokens of each window
    context_spans: np.ndarray | None = None  # (T, 2) int32 each token's character span in its context, or -1
    question_index: np.ndarray | None = None  # (E,) int64 the question each window belongs to
    questions: list[dict] | None = None  # per question: id, context, gold answer texts

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def reorder(self, order: np.ndarray) -> "Examples":
        """The examples in `order` (a permutation or subset of example indices), still flat."""
        lengths = np.diff(self.offsets)[order]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        token_index = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in order]) \
            if len(order) else np.zeros(0, dtype=np.int64)
        def per_token(values):
            return None if values is None else values[token_index]

        def per_example(values):
            return None if values is None else values[order]

        return Examples(self.input_ids[token_index], offsets, per_token(self.token_type_ids), per_example(self.labels),
                        self.fingerprint, per_token(self.token_labels), per_token(self.context_spans),
                        per_example(self.question_index), self.questions)


class TokenSpool:
    """A 1-D array built by appending, kept in an unlinked temporary file (under TMPDIR) and memory-mapped
    when read: tokenizing a corpus never holds its tokens in memory."""

    def __init__(self, dtype):
        self.file = tempfile.TemporaryFile(prefix="tedcache-tokens-")
        self.dtype, self.count = np.dtype(dtype), 0

    def extend(self, values) -> None:
        """Append an array, or the numbers an iterable yields."""
        data = values.astype(self.dtype) if isinstance(values, np.ndarray) else np.fromiter(values, dtype=self.dtype)
        self.file.write(data.tobytes())
        self.count += len(data)

    def array(self, count: int | None = None) -> np.ndarray:
        """The first `count` values (default: all), memory-mapped read-only."""
        count = self.count if count is None else count
        self.file.flush()
        return np.memmap(self.file, dtype=self.dtype, mode="r", shape=(count,)) if count else np.zeros(0, self.dtype)


def concatenate(first: Examples, second: Examples) -> Examples:
    """`first`'s examples followed by `second`'s (a training split and its unlabelled transfer text)."""
    if (first.token_type_ids is None) != (second.token_type_ids is None):
        raise TedcacheError("the training and transfer data were tokenized differently (token types); "
                            "give both the same columns")
    def joined(a, b):  # per-token arrays, joined in a spool (they may be memory-mapped)
        if a is None:
            return None
        spool = TokenSpool(a.dtype)
        for part in (a, b):
            for begin in range(0, len(part), 1 << 20):
                spool.extend(part[begin:begin + (1 << 20)])
        return spool.array()

    labels = None if first.labels is None else np.concatenate([first.labels, second.labels.astype(first.labels.dtype)])
    types, tags = joined(first.token_type_ids, second.token_type_ids), joined(first.token_labels, second.token_labels)
    return Examples(joined(first.input_ids, second.input_ids),
                    np.concatenate([first.offsets, first.offsets[-1] + second.offsets[1:]]), types, labels,
                    hashlib.sha256((first.fingerprint + second.fingerprint).encode()).hexdigest(), tags)
