"""Sparse teacher distributions for caching language-model logits (full logits are vocab x 2 bytes a token).

Per token the cache keeps a fixed-width row of `ids` (the smallest integer type that holds the
vocabulary, -1 = unused slot) and the teacher's log-probabilities there (`logprobs`, fp16, at T = 1),
plus, for sampled rows, how often each id was drawn (`counts`):

- sample:N ("Sparse Logit Sampling", Anshumann et al., ACL 2025): N draws from softmax(z / T_s), the
  distinct ids and their counts. counts / N is an unbiased estimate of the teacher's distribution, so
  the cross-entropy against it has the full KD loss's expectation and gradient.
- topk:K: the K most likely ids. A truncated distribution, renormalised: biased (the tail is lost).
- full: every id (only for small vocabularies).
- hidden: no rows. The cache keeps, per token, the teacher's final normed hidden state (the input of
  its output layer, stored as a state of the cache's precision) and, once, the output layer itself
  (`teacher_head.safetensors`); Stage II rebuilds the exact full-vocabulary distribution from them
  (`head_logits`). d values a token instead of V, and no sampling noise or truncation.

The rows span the tokenizer's ids only (`vocab`): a teacher whose output layer is padded beyond its
tokenizer (Qwen2.5: 152,064 rows for 151,936 ids) has its extra rows dropped before anything is drawn.

Stage II can train on either target form: "sampled" (counts / N; needs T = T_s) or "logits"
(softmax(logprobs / T) renormalised over the stored ids, at any T: the usual top-k KD); the loss
terms on these rows (kd_targets, sparse_cross_entropy, sparse_kd_loss) are in tedcache.losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import TedcacheError

FULL_VOCAB_LIMIT = 8192  # `full` stores vocab x 4 bytes a token: refuse it above this


@dataclass(frozen=True)
class LogitSpec:
    kind: str  # sample | topk | full | hidden
    size: int  # draws (sample), K (topk), vocabulary (full, hidden)
    temperature: float  # sampling temperature (sample only)
    vocab: int | None = None  # the ids rows span (the tokenizer's); None in caches made before it was recorded


def parse_logit_spec(text: str, vocab_size: int, temperature: float) -> LogitSpec:
    """'sample:N', 'topk:K', 'full' or 'hidden' over `vocab_size` ids -> LogitSpec, with one-line errors for
    bad values."""
    kind, _, number = text.partition(":")
    if kind == "hidden" and not number:
        return LogitSpec("hidden", vocab_size, temperature, vocab_size)
    if kind == "full" and not number:
        if vocab_size > FULL_VOCAB_LIMIT:
            raise TedcacheError(f"--logits full would store {vocab_size} values a token (vocabulary {vocab_size}); "
                                f"it is allowed up to {FULL_VOCAB_LIMIT}: use sample:N or topk:K")
        return LogitSpec("full", vocab_size, temperature, vocab_size)
    if kind in ("sample", "topk") and number.isdigit():
        size = int(number)
        limit = min(vocab_size, 255) if kind == "sample" else vocab_size  # counts are stored as uint8
        if 1 <= size <= limit:
            if kind == "sample" and temperature <= 0:
                raise TedcacheError(f"--logits-temperature must be positive, got {temperature}")
            return LogitSpec(kind, size, temperature, vocab_size)
    raise TedcacheError(f"--logits '{text}' is not sample:N (1..{min(vocab_size, 255)}), topk:K (1..{vocab_size}, "
                        f"the vocabulary), full or hidden; e.g. sample:{min(vocab_size, 50)}")


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest signed integer type that holds every id and the -1 padding."""
    for dtype in (np.int8, np.int16, np.int32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


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


def sparsify(logits: torch.Tensor, spec: LogitSpec, generator: torch.Generator | None = None) -> dict:
    """(n, V) teacher logits -> the rows the cache stores: ids, logprobs (fp16) and, sampled, counts, over
    the first `spec.vocab` ids."""
    logits = logits[:, :spec.vocab].float()
    if spec.kind == "sample":
        ids, counts = sample(logits, spec.size, spec.temperature, generator)
    elif spec.kind == "topk":
        ids, counts = logits.topk(spec.size, dim=-1).indices, None
    else:
        ids, counts = torch.arange(logits.shape[-1], device=logits.device).expand(len(logits), -1), None
    logprobs = F.log_softmax(logits, dim=-1).gather(-1, ids.clamp_min(0)).masked_fill(ids < 0, 0.0)
    rows = {"ids": ids, "logprobs": logprobs.half()}
    if counts is not None:
        rows["counts"] = counts.to(torch.uint8)
    return rows



HEAD_TOLERANCE = 1e-3  # |rebuilt - teacher logits| allowed, relative to the logits' largest magnitude


def head_tensors(layer: torch.nn.Module, vocab: int) -> dict[str, torch.Tensor]:
    """A teacher's output layer over the first `vocab` ids: {"weight": (vocab, d)[, "bias": (vocab,)]},
    in the teacher's own dtype (what it computed its logits with), on its device."""
    head = {"weight": layer.weight[:vocab]}
    if getattr(layer, "bias", None) is not None:
        head["bias"] = layer.bias[:vocab]
    return {name: t.detach() for name, t in head.items()}


def head_logits(hidden: torch.Tensor, head: dict[str, torch.Tensor]) -> torch.Tensor:
    """Teacher logits rebuilt from final hidden states (..., d): (..., vocab), in fp32."""
    weight = head["weight"].float()
    bias = head.get("bias")
    return F.linear(hidden.float(), weight, None if bias is None else bias.float())


def check_rebuilt(logits: torch.Tensor, hidden: torch.Tensor, head: dict[str, torch.Tensor]) -> None:
    """Refuse --logits hidden for a teacher whose logits are not its output layer applied to its final
    hidden state (logit soft-capping or scaling, as in Gemma 2 or Cohere): the cache would rebuild
    other logits than the teacher's. logits (n, >= vocab), hidden (n, d). A bf16 or fp16 teacher computed its
    logits to its precision's rounding, which the fp32 rebuild does not repeat: up to two of its epsilons."""
    rebuilt = head_logits(hidden, head)
    expected = logits[:, :rebuilt.shape[-1]].float()
    error = float((rebuilt - expected).abs().max()) / max(1e-6, float(expected.abs().max()))
    if error > max(HEAD_TOLERANCE, 2 * torch.finfo(head["weight"].dtype).eps):
        raise TedcacheError(f"--logits hidden: the teacher's logits are not its output layer applied to its final "
                            f"hidden state (relative difference {error:.2g}); use --logits sample:N or topk:K")
