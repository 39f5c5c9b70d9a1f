"""The torch adapters: a cache split as an IterableDataset of tedcache's batches (CacheBatches), or as a
map-style Dataset of examples for a loop of one's own (CacheDataset)."""

from __future__ import annotations

import collections
import weakref

import torch

from ..cache import Cache, Location, ReaderLease
from ..cache.claims import check_reading
from ..errors import TedcacheError
from .collate import collate_examples, example
from .plan import iterate_batches, num_batches
from .sources import CacheSource, Window, window_examples


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
        for batch in iterate_batches(source, self.batch_size, cache.metadata.pad_token_id, self.shuffle, self.seed,
                                     self.epoch, worker=worker, process=self.process,
                                     shard_reads=self.shard_reads, read_ahead=self.read_ahead):
            check_reading(self.cache)
            yield batch


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
        self._lease = ReaderLease(Location(cache), "CacheDataset").__enter__()  # held until the dataset is collected
        weakref.finalize(self, self._lease.__exit__)
        self._open()

    def _open(self) -> None:
        cache = Cache(self.cache)
        self.source = CacheSource(cache.split(self.split), cache.layers if self.layers is None else self.layers,
                                  self.with_logits)
        self.window_size = window_examples(self.source, self.source.lengths)
        self._held: collections.OrderedDict[int, Window] = collections.OrderedDict()

    def __getstate__(self) -> dict:  # a worker reopens the cache rather than receive open arrays
        return {k: v for k, v in self.__dict__.items() if k not in ("source", "_held", "_lease")}

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
