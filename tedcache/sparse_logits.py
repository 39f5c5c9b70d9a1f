"""Sparse teacher distributions for caching language-model logits (full logits are vocab x 2 bytes a token).

- top-k: the k largest logits and their ids. Compact, but a truncated distribution: biased.
- sampled ("Sparse Logit Sampling", Anshumann et al., ACL 2025): draw N tokens from the teacher's
  distribution per position and keep the distinct ids with their counts. counts / N is an unbiased
  estimate of the distribution, so a cross-entropy against it has the full KD loss's expectation.

Both are stored per token as fixed-width rows: ids (the smallest integer type that holds the
vocabulary) and values (top-k logits as fp16, or sample counts as uint8), padded with id -1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest signed integer type that holds every id and the -1 padding."""
    for dtype in (np.int8, np.int16, np.int32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, V) logits -> ids (n, k) and their logits (n, k), largest first."""
    values, ids = logits.float().topk(k, dim=-1)
    return ids, values


def sample(logits: torch.Tensor, draws: int, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, V) logits -> ids (n, draws) and counts (n, draws) of the distinct tokens among `draws` samples
    from softmax(logits / temperature); unused slots have id -1 and count 0. Rows sum to `draws`."""
    probs = F.softmax(logits.float() / temperature, dim=-1)
    drawn = torch.multinomial(probs, draws, replacement=True, generator=generator)  # (n, draws)
    drawn, _ = drawn.sort(dim=-1)
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = first.cumsum(-1) - 1  # index of each draw's distinct id within its row
    ids = torch.full_like(drawn, -1)
    counts = torch.zeros_like(drawn)
    ids.scatter_(1, slot, drawn)
    counts.scatter_add_(1, slot, torch.ones_like(drawn))
    return ids, counts


def sparse_targets(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Normalise per-row weights (sample counts) into target probabilities; padding (id -1) gets 0."""
    weights = weights.float() * (ids >= 0)
    return weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)


def sparse_kd_loss(student_logits: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor,
                   temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * cross-entropy of the student's softmax(z/T) against sparse target probabilities, mean over
    (unmasked) positions. student_logits (..., V); ids, targets (..., S). With sampled targets its
    expectation equals the full KD cross-entropy (KL up to the teacher's entropy, a constant)."""
    log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    picked = log_probs.gather(-1, ids.clamp_min(0))
    per_position = -(targets * picked).sum(-1)
    if mask is not None:
        per_position = per_position[mask.bool()]
    return temperature ** 2 * per_position.mean()
