"""Thread pools for reads, one set per process (threads do not survive a DataLoader worker's fork)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

_POOLS: dict[tuple[int, str], ThreadPoolExecutor] = {}


def read_pool(name: str = "tedcache-read", threads: int = 8) -> ThreadPoolExecutor:
    """A thread pool per process (threads do not survive the fork of a DataLoader worker)."""
    key = (os.getpid(), name)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
    return _POOLS[key]


def window_pool() -> ThreadPoolExecutor:
    """Whole-window reads; apart from `read_pool`, whose threads a window's array reads wait on."""
    return read_pool("tedcache-window", 16)
