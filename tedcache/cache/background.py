"""Writing units beside the computation. `process`: a forked process owns its own
CacheWriter and is fed through a bounded queue whose tensors travel in shared memory
(torch.multiprocessing), so padding, compression, writing and checksums never hold the computing
interpreter's lock; it dies with its parent. `thread`: a thread of the computing process, one unit in
flight. Either way a unit is whole only once its record is written, so a unit cut short is redone on
resume."""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.multiprocessing as mp

from ..errors import TedcacheError
from .location import Location
from .object_store import add_retried, is_store_error, retried_requests, store_failure
from .writer import CacheWriter


class BackgroundWriter:
    """Runs `writer.write_unit` in the background: `write(...)` takes its arguments and returns once the
    unit is queued (blocking while `depth` units wait: backpressure); `close()` waits for every unit and
    raises if the writer failed. Use as a context manager: leaving it on an error stops the writer (a
    process at once; a thread once its unit is written). The process opens its own CacheWriter on
    `writer.location`; the thread uses `writer` itself."""

    def __init__(self, writer: CacheWriter, kind: str = "process", depth: int = 2):
        self.kind = kind if sys.platform == "linux" else "thread"  # fork and the parent-death signal are Linux's
        if self.kind == "thread":
            self.executor, self.pending, self.writer = ThreadPoolExecutor(1, thread_name_prefix="tedcache-write"), None, writer
            return
        context = mp.get_context("fork")  # a spawned child would import torch again: seconds per extraction
        self.units, self.outcome = context.Queue(maxsize=depth), context.SimpleQueue()  # the process's last word
        self.location = writer.location
        self.process = context.Process(target=_write_units, args=(writer.location, self.units, self.outcome,
                                                                  os.getpid()), name="tedcache-writer", daemon=True)
        self.process.start()

    def write(self, split: str, unit: int, outputs: dict, states=None, logit_rows=None, token_logits=None) -> None:
        item = (split, unit, outputs, states, logit_rows, token_logits)
        if self.kind == "thread":
            self._wait_for_thread()  # at most one unit in flight: memory stays bounded
            self.pending = self.executor.submit(self.writer.write_unit, *item)
            return
        while True:
            self._check_process()
            try:
                self.units.put(item, timeout=1.0)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Every queued unit written (or the writer's error raised)."""
        if self.kind == "thread":
            self._wait_for_thread()
            self.executor.shutdown()
            return
        self._check_process()
        self.units.put(None)
        self.process.join()
        self._check_process(finished=True)
        add_retried(self.outcome.get()["retried"])

    def abort(self) -> None:
        if self.kind == "thread":
            self.executor.shutdown(wait=True, cancel_futures=True)
        elif self.process.is_alive():
            self.process.kill()
            self.process.join()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is not None:
            self.abort()

    def _wait_for_thread(self) -> None:
        pending: Future | None = self.pending
        self.pending = None
        if pending is not None:
            pending.result()

    def _check_process(self, finished: bool = False) -> None:
        """Raise the writer process's error, if it ended with one."""
        if self.process.is_alive() and not finished:
            return
        if self.process.exitcode == 0:
            return
        failure = self.outcome.get() if not self.outcome.empty() else {"reason": f"exit code {self.process.exitcode}"}
        if failure.get("errno") is not None:  # the environment's (a full disk, ...): raised as itself for the caller to phrase
            raise OSError(failure["errno"], failure["reason"])
        if failure.get("store"):
            add_retried(failure["retried"])
            raise store_failure(self.location.url, failure["reason"])
        raise TedcacheError(f"the cache writer process failed ({failure['reason']}); the units it had written are kept: "
                            "fix the cause and run the same command again to resume")


def _write_units(location: Location, units, outcome, parent: int) -> None:
    """The writer process: write queued units until the None that ends them; then put its outcome (the
    retries it counted, or its error)."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an interrupt is the parent's to handle: it stops us
    torch.set_num_threads(1)  # (as DataLoader's workers do: the parent's thread pool is not forked)
    counted_before = retried_requests()  # (the parent's count, forked with us)
    try:
        writer = CacheWriter(location)
        while (item := units.get()) is not None:
            writer.write_unit(*item)
    except BaseException as exc:
        store = is_store_error(exc)
        outcome.put({"errno": None if store else getattr(exc, "errno", None), "reason": f"{type(exc).__name__}: {exc}",
                     "store": store, "retried": retried_requests() - counted_before})
        os._exit(1)
    outcome.put({"retried": retried_requests() - counted_before})


def _die_with_parent(parent: int) -> None:
    """Killed with the parent (even by SIGKILL), so no orphan writes into a cache being resumed."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
