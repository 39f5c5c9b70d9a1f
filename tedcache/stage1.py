"""Stage I: train one filter + throw-away head per tapped layer on a frozen model."""

from __future__ import annotations

import torch
from torch import nn

from .config import OptimConfig
from .filters import FilterBank, LMHead, SequenceHead
from .loop import fit
from .losses import lm_loss, task_loss
from .reader import iterate_batches, num_batches
from .taps import forward_with_taps


def train_filters(model, bank: FilterBank, source, task: str, num_outputs: int, cfg: OptimConfig, pad_id: int,
                  seed: int, desc: str = "stage I", lm_head: str = "tied") -> dict:
    """Train `bank` in place; only filter and head weights change. The loss is the mean over filters of
    each head's task loss (causal-lm: next-token loss through an `lm_head` head, see LMHead). The frozen
    backbone stays in train mode (dropout on), as in the reference, and runs without autograd since
    nothing in it is trained."""
    torch.manual_seed(seed)
    dim = bank.spec.out_dim
    if task == "causal-lm":
        heads = nn.ModuleList(LMHead(dim, model.get_output_embeddings(), lm_head) for _ in bank.spec.layers)
    else:
        heads = nn.ModuleList(SequenceHead(dim, num_outputs) for _ in bank.spec.layers)
    model.requires_grad_(False)

    def head_loss(head, filtered, batch):
        if task == "causal-lm":
            return lm_loss(head(filtered), batch["input_ids"], batch["attention_mask"])
        return task_loss(head(filtered), batch["labels"], task)

    def loss_fn(batch):
        with torch.no_grad():
            _, hidden = forward_with_taps(model, batch, bank.spec.layers)
        losses = torch.stack([head_loss(head, f, batch) for head, f in zip(heads, bank(hidden))])
        return losses.mean(), {f"layer_{layer}": value for layer, value in zip(bank.spec.layers, losses.detach())}

    device = next(model.parameters()).device
    heads.to(device)
    params = list(bank.parameters()) + list(heads.parameters())
    return fit(params, [model, bank, heads],
               lambda epoch: iterate_batches(source, cfg.batch_size, pad_id, shuffle=True, seed=seed,
                                             epoch=epoch),
               num_batches(source, cfg.batch_size), loss_fn, cfg, desc, device=device)
