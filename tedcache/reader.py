"""Batches for training and evaluation, from tokenized examples in memory or from a cache on disk.

Both sources expose the same window read, so one batching routine serves fine-tuning, Stage I,
extraction and Stage II. Training order: the example range is cut into windows of contiguous
examples (at most 65,536 tokens and WINDOW_BYTES of states, with a random start each epoch), visited in random
order and shuffled in memory. Caches store examples pre-shuffled, so contiguous windows are random
samples and each window costs one slice read per array.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .cache import Cache, CompactStates, Split, decode_values
from .cache.layout import CONTEXT_SPANS, FINAL, TOKEN_LABELS, TOKEN_LOGITS
from .data import IGNORED, Examples
from .errors import TedcacheError


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
        done = dict(zip(reads, _pool().map(lambda read: read(), reads.values())))
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
_POOLS: dict[tuple[int, str], ThreadPoolExecutor] = {}


def _pool(name: str = "tedcache-read", threads: int = 8) -> ThreadPoolExecutor:
    """A thread pool per process (threads do not survive the fork of a DataLoader worker)."""
    key = (os.getpid(), name)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
    return _POOLS[key]


def _ahead_pool() -> ThreadPoolExecutor:
    """Whole-window reads; apart from `_pool`, whose threads a window's array reads wait on."""
    return _pool("tedcache-window", 16)


class CacheBatches(torch.utils.data.IterableDataset):
    """The batches of one cache split as a torch IterableDataset, for DataLoader(batch_size=None,
    num_workers=N): each worker opens the cache itself and reads its own share of the windows.
    Batches hold compact dtypes; widen them after moving them to the training device."""

    def __init__(self, cache: str, split: str, layers: list[int] | None, batch_size: int, shuffle: bool = True,
                 seed: int = 0, with_logits: bool = False, process: tuple[int, int] = (0, 1),
                 shard_reads: bool = False, read_ahead: int = 0, read_targets: bool = True):
        super().__init__()
        self.cache, self.split, self.layers, self.with_logits = cache, split, layers, with_logits
        self.read_targets = read_targets
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0
        self.process, self.shard_reads, self.read_ahead = process, shard_reads, read_ahead

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        cache = Cache(self.cache)
        info = torch.utils.data.get_worker_info()
        worker = (info.id, info.num_workers) if info is not None else (0, 1)
        source = CacheSource(cache.split(self.split), self.layers, self.with_logits, self.read_targets)
        yield from iterate_batches(source, self.batch_size, cache.metadata.pad_token_id, self.shuffle, self.seed,
                                   self.epoch, worker=worker, process=self.process,
                                   shard_reads=self.shard_reads, read_ahead=self.read_ahead)


    def __len__(self) -> int:
        """Batches per epoch in this process (over all DataLoader workers)."""
        source = CacheSource(Cache(self.cache).split(self.split), self.layers, self.with_logits, read_targets=False)
        return num_batches(source, self.batch_size, self.process[1], self.shard_reads)


class CacheDataset(torch.utils.data.Dataset):
    """One cache split as a map-style dataset, for a training loop of one's own: item i is example i's
    input ids and token types, label, teacher logits, teacher states of `layers` (default: every cached
    layer), and for causal LMs its sparse teacher rows or (`--logits hidden` caches) final states, in
    the cache's compact dtypes (see `example`); `collate` pads and stacks items into tedcache's batch
    (see collate_examples). Reads go through CacheSource a window of contiguous examples at a time, and
    only the last `windows` windows are held; each DataLoader worker opens the cache itself. Any sampler
    works (DistributedSampler, shuffling): a random order reads about one window per item, where
    CacheBatches' window-wise shuffle reads each window once."""

    def __init__(self, cache: str, split: str = "train", layers: list[int] | None = None, with_logits: bool = True,
                 windows: int = 2):
        self.cache, self.split, self.layers, self.with_logits, self.windows = cache, split, layers, with_logits, windows
        opened = Cache(cache)
        if opened.split(split) is None:
            raise TedcacheError(f"cache {cache} has no {split} split")
        self.pad_id = opened.metadata.pad_token_id
        self._open()

    def _open(self) -> None:
        cache = Cache(self.cache)
        self.source = CacheSource(cache.split(self.split), cache.layers if self.layers is None else self.layers,
                                  self.with_logits)
        self.window_size = window_examples(self.source, self.source.lengths)
        self._held: collections.OrderedDict[int, Window] = collections.OrderedDict()

    def __getstate__(self) -> dict:  # a worker reopens the cache rather than receive open arrays
        return {k: v for k, v in self.__dict__.items() if k not in ("source", "_held")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.source):
            raise IndexError(f"example {i} of {len(self.source)}")
        number = i // self.window_size
        if number in self._held:
            self._held.move_to_end(number)
        else:
            first = number * self.window_size
            self._held[number] = self.source.read(first, min(len(self.source), first + self.window_size))
            while len(self._held) > self.windows:
                self._held.popitem(last=False)
        return example(self._held[number], i, self.source)

    def collate(self, items: list[dict]) -> dict:
        """A padded batch of items (a DataLoader's collate_fn)."""
        return collate_examples(items, self.source, self.pad_id)


def _windows(num_examples: int, size: int, rng: np.random.Generator | None) -> list[tuple[int, int]]:
    shift = int(rng.integers(size)) if rng is not None and num_examples > size else 0
    cuts = sorted({0, num_examples, *range(shift, num_examples, size)})
    spans = list(zip(cuts[:-1], cuts[1:]))
    if rng is not None:
        rng.shuffle(spans)
    return spans


def iterate_batches(source, batch_size: int, pad_id: int, shuffle: bool = False, seed: int = 0,
                    epoch: int = 0, worker: tuple[int, int] = (0, 1), process: tuple[int, int] = (0, 1),
                    shard_reads: bool = False, read_ahead: int = 0):
    """Yield padded batch dicts (see `collate`) over the whole source, once. With worker=(i, n), only
    every n-th window from the i-th (DataLoader workers split an epoch this way). With process=(r, p),
    batches of p x batch_size are formed exactly as one process would form them, and process r keeps
    its r-th part of each (a global batch with fewer examples than processes is skipped by all): every
    process reads every window.

    With `shard_reads` and p > 1, the examples are cut into p x n contiguous parts, one per reader
    (process, worker), and each reader reads and batches only its own part: 1/(p x n) of the reads.
    Every reader yields the same number of batches (`num_batches`), of batch_size examples, its last
    holding the rest (at most one more); a global batch then has the statistics of one process's but
    not its exact composition. `read_ahead`: windows read concurrently ahead (see `_visit`)."""
    rank, size = process
    n = len(source)
    if shard_reads and size > 1:
        reader, readers = rank * worker[1] + worker[0], size * worker[1]
        if n < readers:
            raise TedcacheError(f"--shard-reads needs at least one training example per reader ({readers} "
                                f"processes x workers), the cache has {n}; run without --shard-reads")
        lo, hi = reader * n // readers, (reader + 1) * n // readers
        count = _reader_batches(n, batch_size, readers)
        pending, yielded = [], 0
        for item in _visit(source, lo, hi, batch_size, shuffle, (seed, epoch, reader), read_ahead=read_ahead):
            pending.append(item)
            if len(pending) == batch_size and yielded < count - 1:
                yield collate(pending, source, pad_id)
                pending, yielded = [], yielded + 1
        yield collate(pending, source, pad_id)
        return
    pending: list[tuple[Window, int]] = []
    for item in _visit(source, 0, n, batch_size * size, shuffle, (seed, epoch), worker, read_ahead):
        pending.append(item)
        if len(pending) == batch_size * size:
            yield collate(_part(pending, rank, size), source, pad_id)
            pending = []
    if len(pending) >= size:
        yield collate(_part(pending, rank, size), source, pad_id)


def _visit(source, lo: int, hi: int, batch_size: int, shuffle: bool, seed: tuple, worker: tuple[int, int] = (0, 1),
           read_ahead: int = 0):
    """(window, example) for examples [lo, hi) of `source`: windows of contiguous examples (at least a
    batch), each read as one slice per array, in random order and shuffled inside when `shuffle`; with
    worker=(i, n) only every n-th window from the i-th. The next `read_ahead` windows are read
    concurrently while one is batched (from an object store, their latencies overlap)."""
    n = hi - lo
    window_size = window_examples(source, source.lengths[lo:hi], at_least=batch_size)
    rng = np.random.default_rng(list(seed)) if shuffle else None
    spans = [(lo + first, lo + last) for number, (first, last) in enumerate(_windows(n, window_size, rng))
             if number % worker[1] == worker[0]]
    if not read_ahead:
        for first, last in spans:
            yield from _in_window(source.read(first, last), first, last, shuffle, seed)
        return
    todo, reads = iter(spans), collections.deque()

    def submit():
        span = next(todo, None)
        if span is not None:
            reads.append((*span, _ahead_pool().submit(source.read, *span)))

    for _ in range(read_ahead):
        submit()
    while reads:
        first, last, window = reads.popleft()
        submit()
        yield from _in_window(window.result(), first, last, shuffle, seed)


def _in_window(window: Window, first: int, last: int, shuffle: bool, seed: tuple):
    order = np.arange(first, last)
    if shuffle:
        np.random.default_rng([*seed, first]).shuffle(order)
    for i in order:
        yield window, int(i)


def _part(items: list, rank: int, size: int) -> list:
    """Process `rank`'s contiguous part of a global batch (part sizes differ by at most one)."""
    return [items[i] for i in np.array_split(np.arange(len(items)), size)[rank]]


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


def num_batches(source, batch_size: int, processes: int = 1, shard_reads: bool = False, workers: int = 0) -> int:
    """Batches per epoch that iterate_batches yields to each of `processes` (with `shard_reads`, over its
    `workers` DataLoader workers)."""
    n, size = len(source), batch_size * processes
    if shard_reads and processes > 1:
        return max(1, workers) * _reader_batches(n, batch_size, processes * max(1, workers))
    return n // size + (n % size >= processes)


def _reader_batches(n: int, batch_size: int, readers: int) -> int:
    """Batches of each reader with shard reads: its smallest part's, rounded up (a larger part's one extra
    example joins its last batch)."""
    return -(-(n // readers) // batch_size)


def to_device(batch: dict, device: torch.device, non_blocking: bool = False) -> dict:
    """Move a batch (tensors and CompactStates) to `device`, keeping compact dtypes."""
    if device.type == "cpu":
        return batch
    moved = {}
    for key, value in batch.items():
        if isinstance(value, list):
            moved[key] = [v.to(device, non_blocking=non_blocking) for v in value]
        elif isinstance(value, dict):
            moved[key] = {k: v.to(device, non_blocking=non_blocking) for k, v in value.items()}
        else:
            moved[key] = value.to(device, non_blocking=non_blocking)
    return moved


def _pin(batch: dict) -> dict:
    def pinned(value):
        if isinstance(value, list):
            return [s.pin_memory() for s in value]
        if isinstance(value, dict):
            return {k: v.pin_memory() for k, v in value.items()}
        return value.pin_memory()

    return {k: pinned(v) for k, v in batch.items()}


def prefetch(batches, device: torch.device, depth: int = 2):
    """Iterate `batches` in a background thread, `depth` batches ahead, so reading (and, on a GPU, the
    pinned host-to-device copy) overlaps the training step."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    failure: list[BaseException] = []

    def produce():
        try:
            for batch in batches:
                if device.type == "cuda":
                    batch = to_device(_pin(batch), device, non_blocking=True)
                slots.put(batch)
        except BaseException as exc:  # re-raised in the consumer
            failure.append(exc)
        finally:
            slots.put(done)

    thread = threading.Thread(target=produce, daemon=True, name="tedcache-prefetch")
    thread.start()
    while (batch := slots.get()) is not done:
        yield batch
    thread.join()
    if failure:
        raise failure[0]
