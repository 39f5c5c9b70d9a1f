"""Stage I on stored states: a frozen model's tapped hidden states computed once, with dropout off, and
read back at every Stage-I step instead of running the model again (the reference re-runs it, dropout
on, at every step). Extraction also reuses them for its cache pass (see StoredSource and
teacher.teacher_targets)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace

import numpy as np
import torch

from .cache.layout import TOKEN_LOGITS
from .reader import iterate_batches
from .taps import forward_with_taps, hidden_size
from .tasks import TASK
from .transfer import to_device

STORED_KEY = "frozen_states"  # the batch key StoredSource's states arrive under


@dataclass
class StateStore:
    """A frozen model's float32 hidden states after each of `layers` for every real token of a source,
    at the source's token positions (`states[j][t]`: layer j, token t), and its outputs: per example
    (N, C) for sequence tasks, per token (tokens, C) for token classification and question answering,
    None for causal LMs (whose vocabulary-wide logits are not kept)."""

    layers: list[int]
    states: list[np.ndarray]
    example_outputs: np.ndarray | None = None
    token_outputs: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.states)

    def take(self, source, order: np.ndarray) -> "StateStore":
        """The store of the examples `order` of `source` (this store's source), in that order."""
        tokens = _token_positions(source, order)
        return StateStore(self.layers, [s[tokens] for s in self.states],
                          None if self.example_outputs is None else self.example_outputs[order],
                          None if self.token_outputs is None else self.token_outputs[tokens])


def in_order(source, batch_size: int, pad_id: int):
    """(example indices, batch) over `source` in its order: the batches a store is filled from by default."""
    for batch in iterate_batches(source, batch_size, pad_id):
        yield batch["example_index"].numpy(), batch


def stored_source(model, source, layers: list[int], task: str, batches) -> "StoredSource":
    """`source` with the states of `layers` and the outputs of `model`, run once over `batches` ((example
    indices, batch) pairs covering every example of `source`, see in_order), attached to its batches."""
    return StoredSource(source, store_states(model, source, layers, task, batches))


@torch.no_grad()
def store_states(model, source, layers: list[int], task: str, batches) -> StateStore:
    """Run `model` once over `batches` (see stored_source) in eval mode (dropout off) and keep what
    `layers` output for every real token. An example's values are those of the batch it came in, bit for
    bit, so a store filled with the batches of extraction's cache pass gives that pass exactly what the
    teacher would. The states are spooled to a file in the temporary folder (TMPDIR), unlinked at once:
    its pages stay mapped while the store lives, the kernel keeps them in memory while it can and drops
    them under pressure, and nothing is left behind, even by a killed process."""
    model.eval()
    device = next(model.parameters()).device
    tokens = int(max(source.starts + source.lengths)) if len(source) else 0
    states = [_array((tokens, hidden_size(model))) for _ in layers]
    example_outputs = token_outputs = None
    per_token = TASK[task].per_token
    for index, batch in batches:
        positions = _token_positions(source, index)
        real = batch["attention_mask"].flatten().nonzero().squeeze(1)
        logits, hidden = forward_with_taps(model, to_device(batch, device), layers)
        for array, state in zip(states, hidden):
            array[positions] = state.float().flatten(0, 1)[real.to(state.device)].cpu().numpy()
        if TASK[task].causal:
            continue
        logits = logits.float().cpu()
        if per_token:
            if token_outputs is None:
                token_outputs = np.zeros((tokens, logits.shape[-1]), np.float32)
            token_outputs[positions] = logits.flatten(0, 1)[real].numpy()
        else:
            if example_outputs is None:
                example_outputs = np.zeros((len(source), logits.shape[-1]), np.float32)
            example_outputs[index] = logits.numpy()
    return StateStore(list(layers), states, example_outputs, token_outputs)


def _token_positions(source, examples: np.ndarray) -> np.ndarray:
    """The token positions of `examples` in `source`, example after example."""
    return np.concatenate([np.arange(source.starts[i], source.starts[i] + source.lengths[i]) for i in examples])


def _array(shape: tuple[int, int]) -> np.ndarray:
    """A float32 array memory-mapped from an unlinked temporary file."""
    handle, path = tempfile.mkstemp(prefix="tedcache-stage1-", suffix=".npy")
    os.close(handle)
    try:
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    finally:
        os.unlink(path)


class StoredSource:
    """`source` (an ExamplesSource or CacheSource) whose batches also carry the stored states of their
    examples (under STORED_KEY, one CompactStates (B, L, d) per layer, zero on padding) and, where the
    source has none, the stored outputs as "teacher_logits" (what fills unlabelled examples' labels)."""

    states_key = STORED_KEY
    precision = "fp32"
    final = False

    def __init__(self, source, store: StateStore):
        self.source, self.store = source, store
        self.starts, self.lengths = source.starts, source.lengths
        self.labels, self.question_index = source.labels, source.question_index
        own = source.teacher_logits
        self.teacher_logits = own if own is not None else store.example_outputs
        self.layers, self.channel_scales = store.layers, [None] * len(store.layers)
        # windows as the source alone plans them, so batches come in the order a live Stage I sees
        self.state_bytes_per_token = source.state_bytes_per_token

    def __len__(self) -> int:
        return len(self.source)

    def read(self, first: int, last: int):
        window = self.source.read(first, last)
        a, b = window.base, window.base + len(window.input_ids)
        arrays = dict(window.token_arrays or {})
        if self.store.token_outputs is not None and TOKEN_LOGITS not in arrays:
            arrays[TOKEN_LOGITS] = self.store.token_outputs[a:b]
        return replace(window, states=[(s[a:b], None) for s in self.store.states], token_arrays=arrays or None)


def frozen_forward(model, batch: dict, layers: list[int]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(logits, tapped states) of a frozen model for a batch: the stored ones when the batch carries them
    (see StoredSource; causal-lm: no logits), else the model's forward now (no autograd)."""
    if STORED_KEY in batch:
        return batch.get("teacher_logits"), [s.widen() for s in batch[STORED_KEY]]
    with torch.no_grad():
        logits, states = forward_with_taps(model, batch, layers)
    # a bf16 or fp16 teacher's states as fp32 (what the filters read); a teacher spread over devices by a
    # device map: its states gathered where the batch is, beside the filters
    device = batch["input_ids"].device
    return logits.float().to(device), [s.float().to(device) for s in states]
