"""One training loop for every phase: fine-tuning, Stage I, and Stage II (TED, KD, LWD, fine-tune baseline)."""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .config import OptimConfig
from .distributed import ALONE, Processes
from .errors import TedcacheError
from .evaluate import better
from .reader import prefetch

COUNT_KINDS = ("examples", "tokens", "pairs")  # what a loss term averages over: sequences, real tokens, next-token pairs


class LossModule(torch.nn.Module):
    """The trained modules and their loss as one module, so DDP sees every parameter and hooks one forward."""

    def __init__(self, modules: list[torch.nn.Module], loss_fn: Callable[[dict], tuple[torch.Tensor, dict]]):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)
        self.loss_fn = loss_fn

    def forward(self, batch: dict):
        return self.loss_fn(batch)


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


class Checkpoint:
    """A training loop's whole state in one file, replaced atomically every time it is saved."""

    def __init__(self, folder: Path, fingerprint: dict, every: int = 0):
        self.folder, self.fingerprint, self.every = Path(folder), fingerprint, every
        self.path = self.folder / "state.pt"

    def exists(self) -> bool:
        return self.path.is_file()

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


def fit(params: list[torch.nn.Parameter], modules: list[torch.nn.Module], epoch_batches: Callable[[int], Iterable],
        batches_per_epoch: int, loss_fn: Callable[[dict], tuple[torch.Tensor, dict]], cfg: OptimConfig, desc: str,
        evaluate: Callable[[], dict] | None = None, select: str | None = None, eval_every: int = 0,
        max_steps: int | None = None, log_every: int = 10, device: torch.device = torch.device("cpu"),
        autocast: bool = False, processes: Processes = ALONE, checkpoint: Checkpoint | None = None) -> dict:
    """AdamW + linear warm-up/decay over `cfg.epochs` (fractions allowed) of `epoch_batches(epoch)`; an
    optimiser step takes `cfg.grad_accum` micro-batches (and, with several processes, one from each: the
    modules are wrapped in DDP). `loss_fn` gets each batch with its "share" (see batch_shares) and the
    number of the optimiser step it is part of ("step", from 1).

    `modules` are put in train mode; with `evaluate`, it runs every `eval_every` steps (0: each epoch)
    and the state of `modules` at the best `select` metric is restored at the end; with `cfg.patience`,
    training stops after that many evaluations without a better one. With `checkpoint`,
    the loop's state is saved every `checkpoint.every` steps (0: each epoch) and a saved one is resumed.
    Batches are read ahead in a background thread and moved to `device`; `autocast` runs the forward
    passes in bf16. Returns {"history": [...loss terms, averaged over processes...], "evals": [...],
    "best": {...}, "seconds": s, "median_step_s": median wall time of an optimiser step in this process
    since it started, waiting for batches included}."""
    accum = max(1, cfg.grad_accum)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / accum))
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch)) if cfg.epochs > 0 else 0
    if max_steps is not None:
        total = min(total, max_steps)
    model = processes.wrap(LossModule(modules, loss_fn))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    loop = {"step": 0, "epoch": 0, "consumed": 0, "history": [], "evals": [], "best": None, "stale": 0}
    best_state, step_seconds = None, []
    started = time.perf_counter()
    if checkpoint is not None and checkpoint.exists():
        saved = checkpoint.load()
        for m, state in zip(modules, saved["modules"]):
            m.load_state_dict(state)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        loop, best_state = saved["loop"], saved["best_state"]
        rng = saved["rng"]  # one state per process (checkpoints of earlier versions kept one tensor)
        torch.set_rng_state(rng if isinstance(rng, torch.Tensor) else rng[processes.rank])
        started -= saved["seconds"]
    bar = tqdm(total=total, initial=loop["step"], desc=desc, leave=False, disable=None if processes.main else True)

    def snapshot():
        return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]

    def run_eval():
        nonlocal best_state
        result = {"step": loop["step"], "epoch": round(loop["step"] / steps_per_epoch, 3), **evaluate()}
        loop["evals"].append(result)
        for m in modules:
            m.train()
        if better(result, loop["best"], select):
            loop["best"] = result
            best_state = snapshot()
            loop["stale"] = 0
        else:
            loop["stale"] += 1

    def patience_spent() -> bool:
        return bool(cfg.patience) and evaluate is not None and loop.get("stale", 0) >= cfg.patience

    def save_checkpoint():
        rng = processes.gather(torch.get_rng_state())  # a collective: every process takes part
        if processes.main:
            checkpoint.save({"modules": snapshot(), "optimizer": optimizer.state_dict(),
                             "schedule": schedule.state_dict(), "loop": loop, "best_state": best_state,
                             "rng": rng, "seconds": time.perf_counter() - started})
        processes.barrier()

    while loop["step"] < total:
        for m in modules:
            m.train()
        batches = prefetch(epoch_batches(loop["epoch"]), device)
        for _ in range(loop["consumed"]):  # resumed mid-epoch: these micro-batches were trained on
            next(batches)
        tick = time.perf_counter()
        for micro in _groups(batches, accum):
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_terms = 0.0, {}
            for i, (batch, share) in enumerate(zip(micro, batch_shares(micro, processes))):
                with processes.no_sync(model, skip=i < len(micro) - 1):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        loss, terms = model({**batch, "share": share, "step": loop["step"] + 1})
                    (loss / len(micro)).backward()
                step_loss = step_loss + loss.detach() / len(micro)
                for k, v in terms.items():
                    step_terms[k] = step_terms.get(k, 0.0) + v.detach() / len(micro)
            optimizer.step()
            schedule.step()
            step_seconds.append(time.perf_counter() - tick)  # waiting for data included
            loop["step"] += 1
            loop["consumed"] += len(micro)
            step = loop["step"]
            bar.update(1)
            if step % log_every == 0 or step == total:
                values = processes.sum(torch.stack([torch.as_tensor(step_loss).float().cpu()]
                                                   + [torch.as_tensor(v).float().cpu() for v in step_terms.values()]))
                values = (values / processes.size).tolist()
                loop["history"].append({"step": step, "loss": values[0], **dict(zip(step_terms, values[1:]))})
                bar.set_postfix(loss=f"{values[0]:.4f}")
            if evaluate is not None and eval_every and step % eval_every == 0:
                run_eval()
            if checkpoint is not None and checkpoint.every and step % checkpoint.every == 0 and step < total:
                save_checkpoint()
            if step >= total or patience_spent():
                break
            tick = time.perf_counter()  # (evaluations and checkpoints are not part of a step)
        loop["epoch"] += 1
        loop["consumed"] = 0
        if evaluate is not None and not eval_every and (loop["step"] % steps_per_epoch == 0 or loop["step"] >= total):
            run_eval()
        if patience_spent():
            break
        if checkpoint is not None and not checkpoint.every and loop["step"] < total:
            save_checkpoint()
    bar.close()
    if evaluate is not None and not patience_spent() and (not loop["evals"] or loop["evals"][-1]["step"] != loop["step"]):
        run_eval()
    if best_state is not None:
        for m, state in zip(modules, best_state):
            m.load_state_dict(state)
    return {"history": loop["history"], "evals": loop["evals"], "best": loop["best"], "steps": loop["step"],
            "stopped_early": loop["step"] < total, "seconds": time.perf_counter() - started,
            "median_step_s": float(np.median(step_seconds)) if step_seconds else None}
