"""The training side's batch transfer: batches moved to the training device (pinned, non-blocking on a GPU)
and read ahead in a background thread, so reading and copying overlap the step."""

from __future__ import annotations

import queue
import threading

import torch


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
