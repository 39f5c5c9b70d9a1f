"""Stage I: train one filter + throw-away head per tapped layer on a frozen model, and measure each filter."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import OptimConfig
from .distributed import ALONE, Processes
from .errors import TedcacheError
from .filters import FilterBank, LMHead, SequenceHead, TokenHead
from .loop import Checkpoint, Phase, Runtime, Validation, fit
from .losses import labelled, labels_or_teacher, lm_loss, task_loss
from .models import input_device
from .reader import iterate_batches, num_batches
from .state_store import frozen_forward
from .taps import in_own_dtype, is_decoder_only, model_parts, pooled
from .tasks import TASK
from .transfer import to_device


@dataclass
class FilterTraining:
    """What Stage I trains the filters for and how: the task and its outputs per example (classes, 1 for
    regression, 2 per token for question answering), the optimiser, the padding id, the seed, a causal LM's
    head kind (see LMHead), and the progress bar's name."""

    task: str
    num_outputs: int | None
    optim: OptimConfig
    pad_id: int
    seed: int
    lm_head: str = "tied"
    desc: str = "stage I"


def train_filters(model, bank: FilterBank, source, training: FilterTraining, eval_source=None,
                  processes: Processes = ALONE, checkpoint: Checkpoint | None = None) -> dict:
    """Train `bank` in place; only filter and head weights change. The loss is the mean over filters of
    each head's task loss (causal-lm: next-token loss through an LM head, see LMHead). Sources made by
    `state_store.stored_source` bring the frozen backbone's states with every batch; otherwise the
    backbone runs at every step in train mode (dropout on), as in the reference, without autograd since
    nothing in it is trained. With `eval_source`, the filters are scored after every epoch, training stops
    once their mean validation loss has not improved for `patience` epochs, and the best filters are kept.
    0 epochs leave them untrained (the ablation).

    With several `processes` (all calling this), filters and heads train under DDP at the same global
    batch (the optimiser's batch size, each process a contiguous part of it, as one process would form it):
    the same training as one process up to float rounding and dropout, whose draws are each process's own.
    Every process scores the whole `eval_source`, so all stop at the same epoch.

    With `checkpoint`, the filters, heads, optimiser, schedule, data position and generators are saved
    as fit saves them, and a saved state is resumed: the result equals an uninterrupted run's.

    Returns fit's result plus "filters": each filter's metrics (see filter_metrics; a causal LM's also
    logit_lens_losses) on `eval_source`, else on the training data, with the split they were measured on
    and the steps trained."""
    task, cfg, seed, pad_id = training.task, training.optim, training.seed, training.pad_id
    if cfg.batch_size % processes.size:
        raise TedcacheError(f"--stage1-batch-size ({cfg.batch_size}) must be a multiple of the number of "
                            f"processes ({processes.size}): Stage I trains at that global batch")
    torch.manual_seed(seed)
    heads = _heads(model, bank, training)
    model.requires_grad_(False)

    def loss_fn(batch):
        logits, hidden = frozen_forward(model, batch, bank.spec.layers)
        hidden, batch = at_head_positions(model, hidden, batch, task)
        if not TASK[task].causal:  # unlabelled examples: the teacher's prediction (the cache's, or this model's own)
            batch = {**batch, "labels": labels_or_teacher(batch["labels"], batch.get("teacher_logits", logits), task)}
        share = (batch.get("share") or {}).get("pairs" if TASK[task].causal else "examples", 1.0)  # loop.batch_shares
        losses = torch.stack([head_loss(head, f, batch, task) for head, f in zip(heads, bank(hidden))]) * share
        return losses.mean(), {f"layer_{layer}": value for layer, value in zip(bank.spec.layers, losses.detach())}

    device = input_device(model)
    heads.to(device)
    scored = eval_source if eval_source is not None else source

    def measure() -> dict:
        return filter_metrics(model, bank, heads, scored, task, pad_id, cfg.batch_size)

    per_process, place = cfg.batch_size // processes.size, (processes.rank, processes.size)
    if processes.size > 1:  # the backbone's dropout: each process its own draws (one keeps the seeding above)
        processes.seed(seed)
    result = fit(Phase([model, bank, heads],
                       lambda epoch: iterate_batches(source, per_process, pad_id, shuffle=True, seed=seed, epoch=epoch,
                                                     process=place),
                       num_batches(source, per_process, processes.size), loss_fn, cfg, training.desc),
                 Runtime(Validation(measure, "loss", lower_is_better=True) if eval_source is not None else None,
                         device=device, processes=processes, checkpoint=checkpoint))
    final = result["best"] if eval_source is not None else measure()
    if TASK[task].causal:
        final = {**final, **logit_lens_losses(model, bank.spec.layers, scored, pad_id, cfg.batch_size)}
    model.train()
    result["filters"] = {"split": "eval" if eval_source is not None else "train", "steps": result["steps"],
                         "stopped_early": result["stopped_early"], "metrics": final}
    return result


def _heads(model, bank: FilterBank, training: FilterTraining) -> nn.ModuleList:
    """One throw-away head per filter: the model's own output layer behind a causal LM's, a token head
    (question answering: start and end logits per token), else a sequence head."""
    dim, layers = bank.spec.out_dim, bank.spec.layers
    if TASK[training.task].causal:
        return nn.ModuleList(LMHead(dim, model_parts(model).head, training.lm_head) for _ in layers)
    if TASK[training.task].per_token:
        return nn.ModuleList(TokenHead(dim, training.num_outputs, head_dropout(model.config)) for _ in layers)
    last_token = is_decoder_only(model)
    return nn.ModuleList(SequenceHead(dim, training.num_outputs, last_token, head_dropout(model.config)) for _ in layers)


def head_dropout(config) -> float:
    """The dropout the model's own task head would use (its classifier dropout, else its hidden dropout);
    0.1 for a model that names neither."""
    for name in ("classifier_dropout", "seq_classif_dropout", "hidden_dropout_prob", "hidden_dropout"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.1


def at_head_positions(model, hidden: list[torch.Tensor], batch: dict, task: str) -> tuple[list[torch.Tensor], dict]:
    """For a sequence task, each state at the one position its head reads (taps.pooled), as (B, 1, d) under a
    mask of ones; other tasks' as they are. A filter maps each token on its own, so the head sees what it saw
    when every token was filtered, and the filters do one token's arithmetic an example instead of all of them."""
    if TASK[task].causal or TASK[task].per_token:
        return hidden, batch
    mask = batch["attention_mask"]
    last = is_decoder_only(model)
    ones = torch.ones(len(mask), 1, dtype=mask.dtype, device=mask.device)
    return [pooled(state, mask, last)[:, None] for state in hidden], {**batch, "attention_mask": ones}


def head_loss(head, filtered: torch.Tensor, batch: dict, task: str) -> torch.Tensor:
    if TASK[task].causal:
        return lm_loss(head(filtered), batch["input_ids"], batch["attention_mask"])
    return task_loss(head(filtered, batch["attention_mask"]), batch["labels"], task)


@torch.no_grad()
def filter_metrics(model, bank: FilterBank, heads, source, task: str, pad_id: int, batch_size: int) -> dict:
    """Every filter through its head over `source`, dropout off: {"loss": mean over filters, and per
    layer "<layer>/loss" (the task loss: cross-entropy, squared error, or next-token loss), classification
    "<layer>/accuracy" (question answering: of whole answer spans in a window)}. Examples without a gold
    label count only in causal-lm."""
    for module in (model, bank, heads):
        module.eval()
    layers = bank.spec.layers
    sums: dict[str, float] = {}
    total = 0.0
    for batch, hidden, weight in _frozen_batches(model, source, layers, task, pad_id, batch_size):
        total += weight
        mask = batch["attention_mask"]
        for layer, head, filtered in zip(layers, heads, bank(hidden)):
            values = {"loss": head_loss(head, filtered, batch, task)}
            if task in ("classification", "token-classification"):
                known = labelled(batch["labels"], task)
                values["accuracy"] = (head(filtered, mask).argmax(-1) == batch["labels"])[known].float().mean()
            elif task == "question-answering":  # both ends of the window's answer span right
                known = labelled(batch["labels"], task).all(-1)
                right = (head(filtered, mask).argmax(1) == batch["labels"]).all(-1)
                values["accuracy"] = right[known].float().mean()
            for name, value in values.items():
                key = f"{layer}/{name}"
                sums[key] = sums.get(key, 0.0) + float(value) * weight
    result = {key: value / max(total, 1.0) for key, value in sums.items()}
    result["loss"] = sum(result[f"{layer}/loss"] for layer in layers) / len(layers)
    return result


@torch.no_grad()
def logit_lens_losses(model, layers: list[int], source, pad_id: int, batch_size: int) -> dict:
    """A causal LM's {"<layer>/logit_lens_loss"}: each layer's state read by the model's own final norm and
    output head, no filter, over `source` (what the layer says without training). It does not depend on
    the filters, so Stage I measures it once, not at every validation."""
    model.eval()
    head = model_parts(model).head
    sums, total = [0.0] * len(layers), 0.0
    for batch, hidden, weight in _frozen_batches(model, source, layers, "causal-lm", pad_id, batch_size):
        total += weight
        for j, state in enumerate(hidden):
            sums[j] += float(lm_loss(in_own_dtype(head, state), batch["input_ids"], batch["attention_mask"])) * weight
    return {f"{layer}/logit_lens_loss": value / max(total, 1.0) for layer, value in zip(layers, sums)}


def _frozen_batches(model, source, layers: list[int], task: str, pad_id: int, batch_size: int):
    """(batch, the frozen model's states at the positions the heads read, the batch's weight in a mean over
    the source: its next-token pairs for a causal LM, else its labelled examples) for each batch of `source`
    that has any weight."""
    device = input_device(model)
    for batch in iterate_batches(source, batch_size, pad_id):
        batch = to_device(batch, device)
        _, hidden = frozen_forward(model, batch, layers)
        hidden, batch = at_head_positions(model, hidden, batch, task)
        weight = (float(batch["attention_mask"][:, 1:].sum()) if TASK[task].causal
                  else float(labelled(batch["labels"], task).sum()))
        if weight:
            yield batch, hidden, weight


def describe_filters(measured: dict) -> str:
    """One line per filter for the log: its Stage-I metrics and where they were measured."""
    metrics = measured["metrics"]
    layers = sorted({key.split("/")[0] for key in metrics if "/" in key}, key=int)
    parts = [f"layer {layer}: " + ", ".join(f"{key.split('/')[1]} {value:.4f}" for key, value in metrics.items()
                                            if key.startswith(f"{layer}/")) for layer in layers]
    return (f"stage I filters after {measured['steps']} steps"
            + (" (stopped: no better validation loss)" if measured["stopped_early"] else "")
            + f", on the {measured['split']} split: " + "; ".join(parts))


def stored_filters(folder: Path, key: str, bank: FilterBank) -> dict | None:
    """The Stage I result kept under `key` by keep_filters, its filters loaded into `bank`; None when none is."""
    if not (folder / key / "result.json").is_file():
        return None
    bank.load_state_dict(load_file(str(folder / key / "filters.safetensors"), device=str(next(bank.parameters()).device)))
    return json.loads((folder / key / "result.json").read_text())


def keep_filters(folder: Path, key: str, bank: FilterBank, result: dict) -> None:
    """Keep trained filters and their Stage I record under `key` (written whole, then renamed into place)."""
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder))
    save_file({k: v.detach().cpu().contiguous() for k, v in bank.state_dict().items()}, str(staging / "filters.safetensors"))
    (staging / "result.json").write_text(json.dumps({k: result[k] for k in ("history", "seconds", "filters")}))
    try:
        os.rename(staging, folder / key)
    except OSError:  # another process kept the same filters first
        for path in staging.iterdir():
            path.unlink()
        staging.rmdir()
