"""Collation: one example's arrays out of a window (compact dtypes, views), and items padded and stacked
into tedcache's batch."""

from __future__ import annotations

import numpy as np
import torch

from ..cache import CompactStates, decode_values
from ..cache.layout import CONTEXT_SPANS, TOKEN_LABELS, TOKEN_LOGITS
from ..data import IGNORED
from .sources import Window


def collate(items: list[tuple[Window, int]], source, pad_id: int) -> dict:
    """The batch of (window, example) items: see collate_examples."""
    return collate_examples([example(window, i, source) for window, i in items], source, pad_id)


def example(window: Window, i: int, source) -> dict:
    """Example `i`'s own arrays, unpadded, in the compact dtypes the cache holds (views into `window`):
    example_index, input_ids (n,), [token_type_ids], [labels], [teacher_logits], [question_index],
    [teacher_states: per layer (values (n, d), int8 token scales (n,) or None)], [teacher_rows: causal-lm
    sparse rows {ids, logprobs[, counts]} (n, S)], [token_arrays: per-token labels, teacher logits and
    context spans of token classification and question answering]."""
    a = int(source.starts[i]) - window.base
    b = a + int(source.lengths[i])
    item = {"example_index": i, "input_ids": window.input_ids[a:b]}
    if window.token_type_ids is not None:
        item["token_type_ids"] = window.token_type_ids[a:b]
    for key, values in (("labels", source.labels), ("teacher_logits", source.teacher_logits),
                        ("question_index", source.question_index)):
        if values is not None:
            item[key] = values[i]
    if window.states is not None:
        item["teacher_states"] = [(v[a:b], None if t is None else t[a:b]) for v, t in window.states]
    if window.logits is not None:
        item["teacher_rows"] = {name: v[a:b] for name, v in window.logits.items()}
    if window.token_arrays:
        item["token_arrays"] = {name: v[a:b] for name, v in window.token_arrays.items()}
    return item


def collate_examples(items: list[dict], source, pad_id: int) -> dict:
    """Pad `example` items to the longest and stack them. Keys: input_ids, attention_mask,
    [token_type_ids], [labels], example_index, [teacher_logits], [teacher_states (or the source's
    states_key): one CompactStates (B, L, d) per layer],
    [teacher_rows: causal-lm sparse rows {ids, logprobs[, counts]} (B, L, S), padding has id -1];
    [teacher_hidden: --logits hidden, one CompactStates (B, L, d) of final hidden states];
    token classification: labels and teacher_logits per token; question answering: teacher_logits per
    token (B, L, 2), context_spans (B, L, 2) and question_index (B,)."""
    lengths = [len(item["input_ids"]) for item in items]
    size, batch_len = len(items), max(lengths)
    mask = np.zeros((size, batch_len), dtype=np.int64)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    batch = {"input_ids": torch.from_numpy(_pad([item["input_ids"] for item in items], batch_len, pad_id, np.int64)),
             "attention_mask": torch.from_numpy(mask),
             "example_index": torch.tensor([item["example_index"] for item in items], dtype=torch.int64)}
    first = items[0]
    for key in ("labels", "token_type_ids", "teacher_logits", "question_index"):
        if key in first:
            values = [item[key] for item in items]
            batch[key] = torch.from_numpy(_pad(values, batch_len, 0, np.int64) if key == "token_type_ids"
                                          else np.stack(values))
    if "teacher_states" in first:
        states = []
        for layer, channel_scale in enumerate(source.channel_scales):
            values = _pad([item["teacher_states"][layer][0] for item in items], batch_len, 0)
            scales = None if first["teacher_states"][layer][1] is None else \
                torch.from_numpy(_pad([item["teacher_states"][layer][1] for item in items], batch_len, 1))
            states.append(CompactStates(decode_values(values, source.precision), scales, channel_scale))
        if source.final:
            batch["teacher_hidden"] = states.pop()
        if states:
            batch[source.states_key] = states
    if "teacher_rows" in first:
        batch["teacher_rows"] = {name: torch.from_numpy(_pad([item["teacher_rows"][name] for item in items], batch_len,
                                                             -1 if name == "ids" else 0))
                                 for name in first["teacher_rows"]}
    if "token_arrays" in first:  # token classification and question answering
        for name, key, fill in ((TOKEN_LABELS, "labels", IGNORED), (TOKEN_LOGITS, "teacher_logits", 0.0),
                                (CONTEXT_SPANS, "context_spans", -1)):
            if name in first["token_arrays"]:
                arrays = [item["token_arrays"][name] for item in items]
                batch[key] = torch.from_numpy(_pad(arrays, batch_len, fill, np.int64 if arrays[0].dtype.kind == "i" else None))
    return batch


def _pad(arrays: list[np.ndarray], length: int, fill, dtype=None) -> np.ndarray:
    """Per-token arrays (n, ...) padded to `length` with `fill` and stacked: (B, length, ...), in `dtype`
    (default: theirs)."""
    first = arrays[0]
    out = np.full((len(arrays), length, *first.shape[1:]), fill, dtype=dtype or first.dtype)
    for row, values in enumerate(arrays):
        out[row, :len(values)] = values
    return out
