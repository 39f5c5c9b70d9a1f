"""One training loop for every phase: fine-tuning, Stage I, and Stage II (TED, KD, LWD, fine-tune baseline)."""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .config import OptimConfig
from .distributed import ALONE, Processes
from .errors import TedcacheError
from .transfer import prefetch


class LossModule(torch.nn.Module):
    """The trained modules and their loss as one module, so DDP sees every parameter and hooks one forward."""

    def __init__(self, modules: list[torch.nn.Module], loss_fn: Callable[[dict], tuple[torch.Tensor, dict]]):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)
        self.loss_fn = loss_fn

    def forward(self, batch: dict):
        return self.loss_fn(batch)


COUNT_KINDS = ("examples", "tokens", "pairs")  # what a loss term averages over: sequences, real tokens, next-token pairs


def batch_shares(micro: list[dict], processes: Processes) -> list[dict[str, float]]:
    """Per micro-batch and count kind: its count x (micro-batches x processes) / the step's total count.

    A loss term that is a mean over this micro-batch's examples (or tokens, or pairs), multiplied by its
    share, then averaged over micro-batches and processes (as accumulation and DDP do), equals the mean
    over the whole global batch: many processes and accumulation train on exactly the loss of one big
    batch, whatever the sequence lengths. Alone, without accumulation, every share is 1: nothing to count."""
    if len(micro) == 1 and processes.size == 1:
        return [{}]
    counts = torch.tensor([[len(b["input_ids"]), int(b["attention_mask"].sum()), int(b["attention_mask"][:, 1:].sum())]
                           for b in micro], dtype=torch.float64)
    totals = processes.sum(counts.sum(0))
    scale = len(micro) * processes.size
    return [{kind: float(c * scale / t) if t > 0 else 0.0 for kind, c, t in zip(COUNT_KINDS, row, totals)}
            for row in counts]


def _groups(batches: Iterable, size: int):
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _timed(batches: Iterable, waited: list[float]):
    """`batches`, adding to waited[0] the seconds the caller waited for each one."""
    batches = iter(batches)
    while True:
        started = time.perf_counter()
        batch = next(batches, None)
        waited[0] += time.perf_counter() - started
        if batch is None:
            return
        yield batch


class Checkpoint:
    """A training loop's whole state in one file, replaced atomically every time it is saved."""

    def __init__(self, folder: Path, fingerprint: dict, every: int = 0):
        self.folder, self.fingerprint, self.every = Path(folder), fingerprint, every
        self.path = self.folder / "state.pt"

    def exists(self) -> bool:
        return self.path.is_file()

    def part(self, name: str) -> "Checkpoint":
        """The checkpoint of one phase of the run (Stage I), inside this one's folder and removed with it."""
        return Checkpoint(self.folder / name, self.fingerprint, self.every)

    def anything_saved(self) -> bool:
        """Whether this checkpoint or one of its parts holds a saved state."""
        return self.folder.is_dir() and any(self.folder.rglob(self.path.name))

    def save(self, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_suffix(f".tmp-{os.getpid()}")
        torch.save({"fingerprint": self.fingerprint, **state}, staging)
        os.replace(staging, self.path)

    def load(self) -> dict:
        state = torch.load(self.path, map_location="cpu", weights_only=True)  # tensors and plain values, no pickle
        if state.pop("fingerprint") != self.fingerprint:
            raise TedcacheError(f"the checkpoint in {self.folder} is from a run with other settings; resume with "
                                f"the command that made it, or delete {self.folder} to start afresh")
        return state

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class Validation:
    """How a run is validated: `score()` gives the metrics, `select` names the one that picks the best state,
    every `every` optimiser steps (0: after each epoch). With the optimiser's `patience`, training stops
    after that many validations without a better one."""

    score: Callable[[], dict]
    select: str
    every: int = 0
    lower_is_better: bool = False

    def improves(self, result: dict, best: dict | None) -> bool:
        """Whether `result` beats `best` (None: nothing to beat) on the metric that selects."""
        if best is None:
            return True
        now, before = result[self.select], best[self.select]
        return now < before if self.lower_is_better else now > before


@dataclass
class LoopState:
    """What fit carries from step to step, and what a checkpoint saves and a resumed run restores."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0  # micro-batches of the current epoch already trained on
    history: list = field(default_factory=list)  # logged loss terms, averaged over processes
    evals: list = field(default_factory=list)
    best: dict | None = None  # the best validation so far
    stale: int = 0  # validations since the best one
    best_state: list | None = None  # the modules' state at the best validation
    seconds: float = 0.0  # time spent before this process started (a resumed run's)
    step_seconds: list = field(default_factory=list)  # this process's step times (not saved)
    wait_seconds: list = field(default_factory=list)  # of which waiting for batches (not saved)

    def progress(self) -> dict:
        """What a checkpoint keeps of the loop (its format since checkpoints began)."""
        return {"step": self.step, "epoch": self.epoch, "consumed": self.consumed, "history": self.history,
                "evals": self.evals, "best": self.best, "stale": self.stale}


@dataclass
class Phase:
    """One training phase: its modules (every parameter that requires a gradient trains), the batches of each
    epoch and how many an epoch has, a batch's loss and logged terms, the optimiser's settings, and the
    progress bar's name."""

    modules: list[torch.nn.Module]
    epoch_batches: Callable[[int], Iterable]
    batches_per_epoch: int
    loss_fn: Callable[[dict], tuple[torch.Tensor, dict]]
    optim: OptimConfig
    desc: str


@dataclass
class Runtime:
    """How a phase runs: validated (its best state kept), cut at `max_steps`, its loss logged every
    `log_every` steps, on `device` (bf16 forward passes with `autocast`), over `processes`, checkpointed."""

    validation: Validation | None = None
    max_steps: int | None = None
    log_every: int = 10
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: bool = False
    processes: Processes = ALONE
    checkpoint: Checkpoint | None = None


ADAMW_KERNEL = "fused on CPU and CUDA"  # what adamw runs; kept results name it in their keys (the last bits differ)


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where every parameter's device has one (CPU, CUDA): one pass over each
    tensor instead of a dozen elementwise ones, 6x faster a step on a 16M-parameter student on a CPU
    (docs/performance.md); elsewhere torch's default implementation. Both compute AdamW; their results
    differ in the last bits, and each is deterministic."""
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def fit(phase: Phase, runtime: Runtime = Runtime()) -> dict:
    """AdamW + linear warm-up/decay over `phase.optim.epochs` (fractions allowed) of the phase's batches; an
    optimiser step takes `grad_accum` micro-batches (and, with several processes, one from each: the modules
    are wrapped in DDP, or sharded by FSDP). `loss_fn` gets each batch with its "share" (see batch_shares) and
    the number of the optimiser step it is part of ("step", from 1).

    The modules are put in train mode; with a validation (see Validation), the state of the trained ones
    (those with a parameter that requires a gradient: a frozen backbone is neither copied nor saved) at
    the best validation is restored at the end. With a checkpoint, the loop's state is saved every
    `checkpoint.every` steps (0: each epoch) and a saved one is resumed. Batches are read ahead in a
    background thread and moved to the device. Returns {"history": [...loss terms, averaged over
    processes...], "evals": [...], "best": {...}, "steps", "stopped_early", "seconds": s, "median_step_s":
    median wall time of an optimiser step in this process since it started, waiting for batches included,
    "data_wait_share": the share of those steps' time spent waiting for batches (the reader's, and on a GPU
    the copies', part that the prefetch did not hide)}."""
    run = _Fitting(phase, runtime)
    while run.state.step < run.total:
        run.epoch()
        if run.patience_spent():
            break
        if runtime.checkpoint is not None and not runtime.checkpoint.every and run.state.step < run.total:
            run.save_checkpoint()
    return run.finish()


class _Fitting:
    """fit's working state: the wrapped model, its optimiser and schedule, the loop's progress."""

    def __init__(self, phase: Phase, runtime: Runtime):
        self.phase, self.runtime, cfg = phase, runtime, phase.optim
        self.accum = max(1, cfg.grad_accum)
        self.steps_per_epoch = max(1, math.ceil(phase.batches_per_epoch / self.accum))
        total = max(1, math.ceil(cfg.epochs * self.steps_per_epoch)) if cfg.epochs > 0 else 0
        self.total = total if runtime.max_steps is None else min(total, runtime.max_steps)
        self.model = runtime.processes.wrap(LossModule(phase.modules, phase.loss_fn))
        # taken after wrapping: FSDP replaces the parameters with sharded ones
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trained = [m for m in phase.modules if any(p.requires_grad for p in m.parameters())]
        self.optimizer = adamw(params, cfg.lr, cfg.weight_decay)
        self.schedule = get_linear_schedule_with_warmup(self.optimizer, int(cfg.warmup_ratio * self.total), self.total)
        self.state = _resume(runtime.checkpoint, self.model, self.trained, self.optimizer, self.schedule,
                             runtime.processes)
        self.started = time.perf_counter() - self.state.seconds
        self.bar = tqdm(total=self.total, initial=self.state.step, desc=phase.desc, leave=False,
                        disable=None if runtime.processes.main else True)

    def epoch(self) -> None:
        """The rest of the current epoch (a resumed one skips the micro-batches trained on), then its validation."""
        state, runtime = self.state, self.runtime
        for m in self.phase.modules:
            m.train()
        batches = prefetch(self.phase.epoch_batches(state.epoch), runtime.device)
        for _ in range(state.consumed):
            next(batches)
        tick, waited = time.perf_counter(), [0.0]
        for micro in _groups(_timed(batches, waited), self.accum):
            loss, terms = _step(self.model, micro, self.optimizer, self.schedule, state.step + 1, runtime.device,
                                runtime.autocast, runtime.processes)
            state.step_seconds.append(time.perf_counter() - tick)  # waiting for data included
            state.wait_seconds.append(waited[0])
            waited[0] = 0.0
            state.step += 1
            state.consumed += len(micro)
            self.after_step(loss, terms)
            if state.step >= self.total or self.patience_spent():
                break
            tick = time.perf_counter()  # (validations and checkpoints are not part of a step)
        state.epoch += 1
        state.consumed = 0
        validation = runtime.validation
        if validation is not None and not validation.every and (state.step % self.steps_per_epoch == 0
                                                                or state.step >= self.total):
            self.validate()

    def after_step(self, loss: torch.Tensor, terms: dict) -> None:
        """Log, validate and checkpoint where the runtime asks for it after this step."""
        state, runtime = self.state, self.runtime
        self.bar.update(1)
        if state.step % runtime.log_every == 0 or state.step == self.total:
            state.history.append(_logged(state.step, loss, terms, runtime.processes))
            self.bar.set_postfix(loss=f"{state.history[-1]['loss']:.4f}")
        if runtime.validation is not None and runtime.validation.every and state.step % runtime.validation.every == 0:
            self.validate()
        checkpoint = runtime.checkpoint
        if checkpoint is not None and checkpoint.every and state.step % checkpoint.every == 0 and state.step < self.total:
            self.save_checkpoint()

    def validate(self) -> None:
        _validate(self.runtime.validation, self.state, self.phase.modules, self.trained, self.steps_per_epoch,
                  self.runtime.processes)

    def patience_spent(self) -> bool:
        patience = self.phase.optim.patience
        return self.runtime.validation is not None and bool(patience) and self.state.stale >= patience

    def save_checkpoint(self) -> None:
        # collectives, which every process takes part in: the generators, and under FSDP the whole states
        processes = self.runtime.processes
        rng = processes.gather(torch.get_rng_state())
        modules_state = [processes.state_of(m) for m in self.trained]
        optimizer_state = processes.optimizer_state(self.model, self.optimizer)
        if processes.main:
            self.runtime.checkpoint.save({"modules": modules_state, "optimizer": optimizer_state,
                                          "schedule": self.schedule.state_dict(), "loop": self.state.progress(),
                                          "best_state": self.state.best_state, "rng": rng,
                                          "seconds": time.perf_counter() - self.started})
        processes.barrier()

    def finish(self) -> dict:
        """A last validation where the last step had none, the best state restored; fit's result."""
        state = self.state
        self.bar.close()
        if self.runtime.validation is not None and not self.patience_spent() and \
                (not state.evals or state.evals[-1]["step"] != state.step):
            self.validate()
        if state.best_state is not None:
            for m, saved in zip(self.trained, state.best_state):
                self.runtime.processes.load_state(m, saved)
        return {"history": state.history, "evals": state.evals, "best": state.best, "steps": state.step,
                "stopped_early": state.step < self.total, "seconds": time.perf_counter() - self.started,
                "median_step_s": float(np.median(state.step_seconds)) if state.step_seconds else None,
                "data_wait_share": sum(state.wait_seconds) / sum(state.step_seconds) if state.step_seconds else None}


def _resume(checkpoint: Checkpoint | None, model: torch.nn.Module, trained: list[torch.nn.Module], optimizer,
            schedule, processes: Processes) -> LoopState:
    """A fresh LoopState, or the one a saved checkpoint holds (the trained modules, optimiser, schedule
    and this process's generator restored with it)."""
    if checkpoint is None or not checkpoint.exists():
        return LoopState()
    saved = checkpoint.load()
    for m, module_state in zip(trained, saved["modules"]):
        processes.load_state(m, module_state)
    processes.load_optimizer_state(model, optimizer, saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    torch.set_rng_state(saved["rng"][processes.rank])  # one state per process
    return LoopState(**saved["loop"], best_state=saved["best_state"], seconds=saved["seconds"])


def _step(model, micro: list[dict], optimizer, schedule, step: int, device: torch.device, autocast: bool,
          processes: Processes) -> tuple[torch.Tensor, dict]:
    """One optimiser step over the micro-batches of `micro`; returns its loss and terms (detached)."""
    optimizer.zero_grad(set_to_none=True)
    step_loss, step_terms = 0.0, {}
    for i, (batch, share) in enumerate(zip(micro, batch_shares(micro, processes))):
        with processes.no_sync(model, skip=i < len(micro) - 1):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, terms = model({**batch, "share": share, "step": step})
            (loss / len(micro)).backward()
        step_loss = step_loss + loss.detach() / len(micro)
        for k, v in terms.items():
            step_terms[k] = step_terms.get(k, 0.0) + v.detach() / len(micro)
    optimizer.step()
    schedule.step()
    return step_loss, step_terms


def _logged(step: int, loss: torch.Tensor, terms: dict, processes: Processes) -> dict:
    """A history record: the step's loss and terms, averaged over processes (a collective)."""
    values = processes.sum(torch.stack([torch.as_tensor(loss).float().cpu()]
                                       + [torch.as_tensor(v).float().cpu() for v in terms.values()]))
    values = (values / processes.size).tolist()
    return {"step": step, "loss": values[0], **dict(zip(terms, values[1:]))}


def _validate(validation: Validation, state: LoopState, modules: list[torch.nn.Module],
              trained: list[torch.nn.Module], steps_per_epoch: int, processes: Processes) -> None:
    """Score the modules, record it, and keep their state when it is the best so far."""
    result = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 3), **validation.score()}
    state.evals.append(result)
    for m in modules:
        m.train()
    if validation.improves(result, state.best):
        state.best, state.best_state, state.stale = result, [processes.state_of(m) for m in trained], 0
    else:
        state.stale += 1
