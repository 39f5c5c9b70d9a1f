"""Window sources: tokenized examples in memory, or one split of a cache, read a window of contiguous
examples at a time (one slice per array), and the size of a window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..cache import Split
from ..cache.layout import CONTEXT_SPANS, FINAL, TOKEN_LABELS
from ..data import Examples
from .pools import read_pool


@dataclass
class Window:
    """Arrays for examples [first, last): token arrays start at token `base`."""

    first: int
    base: int
    input_ids: np.ndarray
    token_type_ids: np.ndarray | None
    states: list[tuple[np.ndarray, np.ndarray | None]] | None  # per requested layer: values, int8 token scales
    logits: dict[str, np.ndarray] | None = None  # causal-lm: sparse teacher rows per token
    token_arrays: dict[str, np.ndarray] | None = None  # token_labels, token_logits, context_spans (see layout)


class WindowSource(Protocol):
    """What batching reads: examples by index, their token spans and per-example arrays, and windows of
    contiguous examples; the states' form (precision, layers, channel scales, a final state) for collation."""

    states_key: str  # the batch key the states go under (a stored backbone's own states: "hidden_states")
    starts: np.ndarray  # (E,) each example's first token in the token arrays
    lengths: np.ndarray  # (E,) tokens per example
    labels: np.ndarray | None
    teacher_logits: np.ndarray | None
    question_index: np.ndarray | None
    precision: str | None  # of the states, None without states
    layers: list  # whose states a window holds
    state_bytes_per_token: int  # what a token's states (and rows) weigh: sets the window size
    final: bool  # the last of `layers` is a --logits hidden cache's final state

    def __len__(self) -> int: ...

    def read(self, first: int, last: int) -> "Window": ...


class ExamplesSource:
    """Tokenized examples held in memory (no teacher targets)."""

    states_key = "teacher_states"  # the batch key of a window's states (see collate)

    def __init__(self, examples: Examples):
        self.examples = examples
        self.starts, self.lengths = examples.offsets[:-1], np.diff(examples.offsets)
        self.labels, self.teacher_logits, self.question_index = examples.labels, None, examples.question_index
        self.precision, self.layers, self.state_bytes_per_token, self.final = None, [], 0, False

    def __len__(self) -> int:
        return len(self.examples)

    def read(self, first: int, last: int) -> Window:
        a, b = self.examples.offsets[first], self.examples.offsets[last]
        tt = self.examples.token_type_ids
        arrays = {name: values[a:b] for name, values in ((TOKEN_LABELS, self.examples.token_labels),
                                                         (CONTEXT_SPANS, self.examples.context_spans))
                  if values is not None}
        return Window(first, int(a), self.examples.input_ids[a:b], None if tt is None else tt[a:b], None,
                      token_arrays=arrays or None)


class CacheSource:
    """One split of a cache: tokens, labels, teacher logits and (optionally) the states of some layers and,
    causal-lm, the sparse per-token teacher distributions. With read_targets=False (online mode) the
    states and rows are not read, but the windows are planned as if they were (see `_visit`), so the
    examples come in the same order as from a source that reads them."""

    states_key = "teacher_states"

    def __init__(self, split: Split, layers: list[int] | None = None, with_logits: bool = False,
                 read_targets: bool = True):
        self.split, self.precision, self.layers = split, split.precision, layers or []
        self.read_targets = read_targets
        self.starts, self.lengths = split.starts, split.lengths
        self.labels, self.teacher_logits, self.question_index = split.labels, split.teacher_logits, split.question_index
        self.with_logits = with_logits and bool(split.logit_rows)
        self.final = with_logits and split.has_final  # --logits hidden: read as one more layer, the last
        if self.final:
            self.layers = [*self.layers, FINAL]
        self.channel_scales = [split.channel_scale(layer) for layer in self.layers]
        self.state_bytes_per_token = sum(split.state_bytes_per_token(layer) for layer in self.layers) \
            + (split.logit_bytes_per_token() if self.with_logits else 0)

    def __len__(self) -> int:
        return len(self.split)

    def read(self, first: int, last: int) -> Window:
        """One contiguous slice per array, the arrays read concurrently (a store's latency is paid once)."""
        a, b = int(self.starts[first]), int(self.starts[last - 1] + self.lengths[last - 1])
        reads = {"input_ids": lambda: self.split.tokens("input_ids", a, b)}
        if self.split.has_token_types:
            reads["token_type_ids"] = lambda: self.split.tokens("token_type_ids", a, b)
        layers = self.layers if self.read_targets else []
        for layer in layers:
            reads[layer] = lambda layer=layer: self.split.states(layer, a, b)
        if self.with_logits and self.read_targets:
            reads["logits"] = lambda: self.split.logits(a, b)
        for name in self.split.token_arrays:
            reads[name] = lambda name=name: self.split.tokens(name, a, b)
        done = dict(zip(reads, read_pool().map(lambda read: read(), reads.values())))
        states = [done[layer] for layer in layers] if layers else None
        extra = {name: done[name] for name in self.split.token_arrays} or None
        return Window(first, a, done["input_ids"], done.get("token_type_ids"), states, done.get("logits"), extra)


WINDOW_BYTES = 16 * 2**20  # states held per window: bounds the reader's memory, still ~10 batches a window


WINDOW_TOKENS = 65536  # at most this many tokens a window, whatever its states weigh (a cache without states)


def window_examples(source, lengths: np.ndarray, at_least: int = 1) -> int:
    """Examples per window: as many of this mean length as WINDOW_BYTES of states (and WINDOW_TOKENS) hold."""
    mean_len = max(1.0, float(lengths.mean())) if len(lengths) else 1.0
    tokens = min(WINDOW_TOKENS, WINDOW_BYTES // max(1, source.state_bytes_per_token))
    return max(at_least, int(tokens / mean_len))
