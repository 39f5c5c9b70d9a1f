"""One training loop for every phase: fine-tuning, Stage I, and Stage II (TED, KD, fine-tune baseline)."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .config import TrainConfig
from .errors import TedcacheError
from .evaluate import better
from .reader import prefetch


def fit(params: list[torch.nn.Parameter], modules: list[torch.nn.Module], epoch_batches: Callable[[int], Iterable],
        steps_per_epoch: int, loss_fn: Callable[[dict], tuple[torch.Tensor, dict]], cfg: TrainConfig, desc: str,
        evaluate: Callable[[], dict] | None = None, select: str | None = None, eval_every: int = 0,
        max_steps: int | None = None, log_every: int = 10, device: torch.device = torch.device("cpu"),
        autocast: bool = False) -> dict:
    """AdamW + linear warm-up/decay over `cfg.epochs` (fractions allowed) of `epoch_batches(epoch)`.

    `modules` are put in train mode; with `evaluate`, it runs every `eval_every` steps (0: each epoch)
    and the state of `modules` at the best `select` metric is restored at the end.
    Batches are read ahead in a background thread and moved to `device`; `autocast` runs the forward
    passes in bf16. Returns {"history": [...loss terms...], "evals": [...], "best": {...}, "seconds": s}."""
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if max_steps is not None:
        total = min(total, max_steps)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    history, evals, best, best_state = [], [], None, None
    step, epoch, started = 0, 0, time.perf_counter()
    bar = tqdm(total=total, desc=desc, leave=False, disable=None)

    def run_eval():
        nonlocal best, best_state
        result = {"step": step, "epoch": round(step / steps_per_epoch, 3), **evaluate()}
        evals.append(result)
        for m in modules:
            m.train()
        if better(result, best, select):
            best = result
            best_state = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]

    while step < total:
        for m in modules:
            m.train()
        for batch in prefetch(epoch_batches(epoch), device):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, terms = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == total:
                history.append({"step": step, "loss": loss.item(), **{k: float(v) for k, v in terms.items()}})
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            if evaluate is not None and eval_every and step % eval_every == 0:
                run_eval()
            if step >= total:
                break
        epoch += 1
        if evaluate is not None and not eval_every and (step % steps_per_epoch == 0 or step >= total):
            run_eval()
    bar.close()
    if evaluate is not None and (not evals or evals[-1]["step"] != step):
        run_eval()
    if best_state is not None:
        for m, state in zip(modules, best_state):
            m.load_state_dict(state)
    return {"history": history, "evals": evals, "best": best, "seconds": time.perf_counter() - started}


def save_run(model, tokenizer, out: str, metrics: dict) -> Path:
    """Write the model (save_pretrained), its tokenizer and metrics.json to `out`, atomically: everything
    goes to a temporary sibling folder that replaces `out` only once complete."""
    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()) and not (out_path / "metrics.json").exists():
        raise TedcacheError(f"--out {out} exists and is not a tedcache run folder; choose an empty or new folder")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if out_path.exists():
            shutil.rmtree(out_path)
        staging.rename(out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_path


def pick_device(name: str = "auto") -> torch.device:
    """"auto": the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
