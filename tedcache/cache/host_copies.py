"""A unit's results from the device to the host without stopping the device. On a GPU each unit's tensors
are copied on a side stream into pinned host memory (torch's caching host allocator recycles those
buffers, so two units' worth are reused over and over) and a CUDA event marks the copy done; the host
waits on that event only when it hands the unit to the writer, after the next unit's work is queued,
so the copy of unit u overlaps the computation of unit u+1 and no batch waits for the host."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map


class HostCopies:
    """`push(results)` starts moving a tree of tensors (tuples, lists, dicts) to the host and returns the
    results pushed earlier that are now there; `drain()` returns the rest. On a CPU the results are
    there already, so `push` returns them at once."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.copying: list[tuple[object, torch.cuda.Event]] = []

    def push(self, results) -> list:
        if self.stream is None:
            return [results]
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the results are computed first
        with torch.cuda.stream(self.stream):
            host = tree_map(self._copy, results)
            done = torch.cuda.Event()
            done.record(self.stream)
        landed = self.drain()
        self.copying.append((host, done))
        return landed

    def drain(self) -> list:
        landed = []
        for host, done in self.copying:
            done.synchronize()
            landed.append(host)
        self.copying.clear()
        return landed

    def _copy(self, value):
        if not isinstance(value, torch.Tensor) or value.device.type != "cuda":
            return value
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        host.copy_(value, non_blocking=True)
        value.record_stream(self.stream)  # its memory is not reused before the side stream has read it
        return host
