"""Batches for training and evaluation, from tokenized examples in memory or from a cache on disk.

Both sources expose the same window read (sources), so one batching routine (plan) serves fine-tuning,
Stage I, extraction and Stage II. Training order: the example range is cut into windows of contiguous
examples (at most WINDOW_TOKENS tokens and WINDOW_BYTES of states, with a random start each epoch),
visited in random order and shuffled in memory. Caches store examples pre-shuffled, so contiguous windows
are random samples and each window costs one slice read per array. Items become batches in collate; the
torch Dataset adapters are in adapters; moving batches to the device is the training side's (transfer).
"""

from .adapters import CacheBatches, CacheDataset
from .collate import collate, collate_examples, example
from .plan import iterate_batches, num_batches
from .sources import WINDOW_BYTES, WINDOW_TOKENS, CacheSource, ExamplesSource, Window, WindowSource, window_examples

__all__ = ["CacheBatches", "CacheDataset", "collate", "collate_examples", "example", "iterate_batches", "num_batches",
           "WINDOW_BYTES", "WINDOW_TOKENS", "CacheSource", "ExamplesSource", "Window", "WindowSource",
           "window_examples"]
