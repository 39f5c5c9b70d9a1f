"""Many processes, through accelerate: `accelerate launch -m tedcache.cli.main ...` or `torchrun -m ...`
set the usual WORLD_SIZE / RANK variables, accelerate's PartialState joins the process group (gloo on
CPUs, NCCL on GPUs), and DDP comes from Accelerator.prepare_model. A plain `tedcache ...` is one process
and none of this is touched."""

from __future__ import annotations

import os
import resource
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch


class Processes:
    """This process's place in the run: rank, size, and the few collectives tedcache needs."""

    def __init__(self, join: bool = True):
        self.size = int(os.environ.get("WORLD_SIZE", "1")) if join else 1
        self.rank = 0
        self._accelerator = None
        if self.size > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.size = self.state.process_index, self.state.num_processes

    @property
    def main(self) -> bool:
        return self.rank == 0

    def seed(self, seed: int) -> None:
        """Seed torch's global generator, which draws the dropout masks: with `seed` itself in one process, with
        a seed drawn from (seed, rank) in each of several, so that no two processes draw the same masks."""
        torch.manual_seed(seed if self.size == 1 else int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0]))

    def device(self, name: str) -> torch.device:
        """The device this process trains on: with several processes and "auto", its own GPU (or the CPU)."""
        if self.size > 1 and name == "auto":
            return self.state.device
        return pick_device(name)

    def main_first(self):
        """A block the first process runs before the others (which then find what it cached)."""
        return self.state.main_process_first() if self.size > 1 else nullcontext()

    def barrier(self) -> None:
        if self.size > 1:
            self.state.wait_for_everyone()

    def broadcast(self, value):
        """The main process's `value`, on every process."""
        if self.size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every process's `value`, in rank order, on every process."""
        if self.size == 1:
            return [value]
        values = [None] * self.size
        torch.distributed.all_gather_object(values, value)
        return values

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes (float64 on the CPU, so sums of counts are exact)."""
        if self.size == 1:
            return tensor
        total = tensor.detach().to(torch.float64).cpu()
        if torch.distributed.get_backend() == "nccl":
            total = total.to(self.state.device)
        torch.distributed.all_reduce(total)
        return total.cpu()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP around `module` (its parameters are first broadcast from the main process); itself when alone."""
        if self.size == 1:
            return module
        if self._accelerator is None:
            from accelerate import Accelerator

            self._accelerator = Accelerator(cpu=not torch.cuda.is_available())
        return self._accelerator.prepare_model(module)

    @staticmethod
    def no_sync(wrapped: torch.nn.Module, skip: bool):
        """Inside it, DDP does not all-reduce gradients (the first micro-batches of an accumulated step)."""
        return wrapped.no_sync() if skip and hasattr(wrapped, "no_sync") else nullcontext()


def pick_device(name: str = "auto") -> torch.device:
    """"auto": the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


ALONE = Processes(join=False)  # for work every process does by itself (Stage I on the student, evaluation)
_PROCESSES: Processes | None = None


def processes() -> Processes:
    """The run's Processes (created once: joining the process group happens here)."""
    global _PROCESSES
    if _PROCESSES is None:
        _PROCESSES = Processes()
    return _PROCESSES


def reset_peak_memory(device: torch.device) -> None:
    """Start `peak_memory_mb`'s count afresh (a GPU's; a process's peak resident memory cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: on a GPU, what torch allocated there since `reset_peak_memory`; on a CPU, this
    process's peak resident memory (VmHWM: not getrusage's ru_maxrss, which Linux carries across fork and
    exec, so a child of a big parent would report the parent's size)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
