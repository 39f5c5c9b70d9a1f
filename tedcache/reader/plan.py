"""Epoch planning: the windows an epoch visits (in random order, shuffled inside), read ahead where asked,
batched as one process would batch them and split between processes and DataLoader workers."""

from __future__ import annotations

import collections

import numpy as np

from ..errors import TedcacheError
from .collate import collate
from .pools import window_pool
from .sources import Window, WindowSource, window_examples


def _windows(num_examples: int, size: int, rng: np.random.Generator | None) -> list[tuple[int, int]]:
    shift = int(rng.integers(size)) if rng is not None and num_examples > size else 0
    cuts = sorted({0, num_examples, *range(shift, num_examples, size)})
    spans = list(zip(cuts[:-1], cuts[1:]))
    if rng is not None:
        rng.shuffle(spans)
    return spans


def iterate_batches(source: WindowSource, batch_size: int, pad_id: int, shuffle: bool = False, seed: int = 0,
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
    if shard_reads and process[1] > 1:
        yield from _own_part_batches(source, batch_size, pad_id, shuffle, (seed, epoch), worker, process, read_ahead)
    else:
        yield from _global_batches(source, batch_size, pad_id, shuffle, (seed, epoch), worker, process, read_ahead)


def _own_part_batches(source: WindowSource, batch_size: int, pad_id: int, shuffle: bool, seed: tuple,
                      worker: tuple[int, int], process: tuple[int, int], read_ahead: int):
    """--shard-reads: this reader's own contiguous part of the examples, batched alone (see iterate_batches)."""
    (rank, size), n = process, len(source)
    reader, readers = rank * worker[1] + worker[0], size * worker[1]
    if n < readers:
        raise TedcacheError(f"--shard-reads needs at least one training example per reader ({readers} "
                            f"processes x workers), the cache has {n}; run without --shard-reads")
    lo, hi = reader * n // readers, (reader + 1) * n // readers
    count = _reader_batches(n, batch_size, readers)
    pending, yielded = [], 0
    for item in _visit(source, lo, hi, batch_size, shuffle, (*seed, reader), read_ahead=read_ahead):
        pending.append(item)
        if len(pending) == batch_size and yielded < count - 1:
            yield collate(pending, source, pad_id)
            pending, yielded = [], yielded + 1
    yield collate(pending, source, pad_id)


def _global_batches(source: WindowSource, batch_size: int, pad_id: int, shuffle: bool, seed: tuple,
                    worker: tuple[int, int], process: tuple[int, int], read_ahead: int):
    """Global batches of every process's examples, as one process forms them; this process keeps its part."""
    rank, size = process
    pending: list[tuple[Window, int]] = []
    for item in _visit(source, 0, len(source), batch_size * size, shuffle, seed, worker, read_ahead):
        pending.append(item)
        if len(pending) == batch_size * size:
            yield collate(_part(pending, rank, size), source, pad_id)
            pending = []
    if len(pending) >= size:
        yield collate(_part(pending, rank, size), source, pad_id)


def _visit(source: WindowSource, lo: int, hi: int, batch_size: int, shuffle: bool, seed: tuple,
           worker: tuple[int, int] = (0, 1), read_ahead: int = 0):
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
            reads.append((*span, window_pool().submit(source.read, *span)))

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


def num_batches(source: WindowSource, batch_size: int, processes: int = 1, shard_reads: bool = False,
                workers: int = 0) -> int:
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
