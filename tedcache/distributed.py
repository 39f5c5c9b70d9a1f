"""Many processes, through accelerate: `accelerate launch -m tedcache.cli.main ...` or `torchrun -m ...`
set the usual WORLD_SIZE / RANK variables, accelerate's PartialState joins the process group (gloo on
CPUs, NCCL on GPUs), and DDP comes from Accelerator.prepare_model, or, with `distill --fsdp`, FSDP2's
fully_shard shards the trained modules instead. A plain `tedcache ...` is one process and none of this is
touched."""

from __future__ import annotations

import copy
import itertools
import os
import resource
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch


class Processes:
    """This process's place in the run: rank, size, and the few collectives tedcache needs."""

    def __init__(self, join: bool = True):
        self.size = int(os.environ.get("WORLD_SIZE", "1")) if join else 1
        self.rank = 0
        self.fsdp = False
        self._accelerator = None
        if self.size > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.size = self.state.process_index, self.state.num_processes

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharding(self) -> bool:
        """Whether the trained modules are sharded (FSDP) rather than replicated (DDP)."""
        return self.fsdp and self.size > 1

    def with_fsdp(self) -> Processes:
        """The same processes, training under FSDP: `wrap` shards, and states are gathered and scattered."""
        sharded = copy.copy(self)
        sharded.fsdp = True
        return sharded

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
        """`module` replicated by DDP (its parameters first broadcast from the main process), or under FSDP
        with each of its parts sharded in place; itself when alone."""
        if self.size == 1:
            return module
        if self.sharding:
            _fully_shard(module, self.state.device)
            return module
        if self._accelerator is None:
            from accelerate import Accelerator

            self._accelerator = Accelerator(cpu=not torch.cuda.is_available())
        return self._accelerator.prepare_model(module)

    def no_sync(self, wrapped: torch.nn.Module, skip: bool):
        """Inside it, gradients are not reduced over processes (the first micro-batches of an accumulated step)."""
        if not skip:
            return nullcontext()
        if self.sharding:
            return _without_gradient_sync(wrapped)
        return wrapped.no_sync() if hasattr(wrapped, "no_sync") else nullcontext()

    def share(self, batches):
        """This process's share of `batches`: every N-th. Under FSDP, where every forward pass is a collective,
        the processes left without a batch in the last round pass over the round's first one again, marked
        "padding" (its outputs are to be dropped)."""
        if not self.sharding:
            yield from itertools.islice(batches, self.rank, None, self.size)
            return
        batches = iter(batches)
        while rounds := list(itertools.islice(batches, self.size)):
            yield rounds[self.rank] if self.rank < len(rounds) else {**rounds[0], "padding": True}

    def state_of(self, module: torch.nn.Module) -> dict:
        """A copy of `module`'s state; under FSDP its whole state gathered to the main process's memory (a
        collective: the other processes get {})."""
        if not self.sharding:
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(_resharded(module), options=_whole_state(cpu_offload=True))

    def load_state(self, module: torch.nn.Module, state: dict) -> None:
        """Undo of state_of (under FSDP the main process's `state` is scattered: a collective)."""
        if not self.sharding:
            module.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(_resharded(module), state, options=_whole_state(broadcast_from_rank0=True))

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """`optimizer`'s state, as state_of gives `model`'s."""
        if not self.sharding:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_whole_state(cpu_offload=True))

    def load_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if not self.sharding:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=_whole_state(broadcast_from_rank0=True))


def _fully_shard(module: torch.nn.Module, device: torch.device) -> None:
    """FSDP2 over each trained part of a loop.LossModule: first each block an HF model names as not to be
    split (its transformer layers), then the part itself (the rest: embeddings, head; a filter bank)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for part in module.parts:
        blocks = set(getattr(part, "_no_split_modules", None) or ())
        for sub in part.modules():
            if type(sub).__name__ in blocks:
                fully_shard(sub, mesh=mesh)
        fully_shard(part, mesh=mesh)


def _resharded(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with every FSDP unit holding only its shard: the outermost unit keeps its whole parameters
    after a forward pass (for the backward that usually follows), which an evaluation never runs."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return module


@contextmanager
def _without_gradient_sync(module: torch.nn.Module):
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for m in sharded:
            m.set_requires_gradient_sync(True)


def _whole_state(**options):
    """Whole (unsharded) states on the CPU: gathered to the main process, or scattered from it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **options)


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
