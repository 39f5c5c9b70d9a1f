"""TED's Stage II step and the settings of its loss: the student's forward through the loss module, the KD
targets' form and temperature, the method's weights, the vocabulary KD spans, the state variances."""

from __future__ import annotations

import functools
import inspect
from dataclasses import replace

import torch

from .cache import Cache, CacheMetadata
from .config import DistillConfig
from .errors import TedcacheError
from .filters import FilterBank
from .losses import Stage2Loss, method_weights
from .taps import forward_with_taps, model_parts, num_layers
from .tasks import TASK

PROBE_EVERY = 5  # logged steps between gradient-ratio probes


def stage2_step(student, loss: Stage2Loss, batch: dict, probe: bool = False) -> tuple[torch.Tensor, dict]:
    """One Stage-II loss: the student's forward (tapping the layers the loss maps) and `loss` on it
    (see Stage2Loss). With `probe`, the terms also carry grad_ratio: |grad of mse_alpha * MSE| /
    |grad of kl_alpha * KL| on the student's backbone (its weights less the task head)."""
    if loss.from_head:  # the final hidden states and the output layer, not the (B, L, V) logits
        keep = {"logits_to_keep": 1} if _keeps_some_logits(type(student)) else {}
        _, hidden = forward_with_taps(student, batch, [*loss.layers, num_layers(student) - 1], **keep)
        total, terms = loss(None, hidden[:-1], batch, head=(hidden[-1], model_parts(student).head))
    else:
        logits, hidden = forward_with_taps(student, batch, loss.layers)
        total, terms = loss(logits, hidden, batch)
    if probe and "mse" in terms and "kl" in terms:
        terms["grad_ratio"] = _gradient_ratio(student, loss.mse_alpha * terms["mse"], loss.kl_alpha * terms["kl"])
    return total, {k: v.detach() for k, v in terms.items()}


@functools.cache
def _keeps_some_logits(model_class: type) -> bool:
    """Whether the model's forward can return the logits of its last positions only (logits_to_keep)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _gradient_ratio(student, state_term: torch.Tensor, kl_term: torch.Tensor) -> torch.Tensor:
    backbone = [p for p in student.base_model.parameters() if p.requires_grad]
    norms = []
    for term in (state_term, kl_term):
        grads = torch.autograd.grad(term, backbone, retain_graph=True, allow_unused=True)
        norms.append(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
    return norms[0] / norms[1].clamp_min(1e-12)


def _student_width(student, meta: CacheMetadata) -> int:
    """The ids KD compares over: the tokenizer's, as the cache's rows span them (a student's padded output
    rows beyond them are left out of its distribution); a student with fewer output rows is refused."""
    vocab = (meta.logits or {}).get("vocab") or meta.vocab_size
    rows = model_parts(student).head.weight.shape[0]
    if rows < vocab:
        raise TedcacheError(f"the student has {rows} output rows, fewer than the {vocab} token ids the teacher's rows "
                            "span: it cannot produce the last ones; resize its embeddings "
                            "(model.resize_token_embeddings(len(tokenizer))) and save it again")
    return vocab


def kd_form(cfg: DistillConfig, meta: CacheMetadata) -> str:
    """Which causal-lm KD targets to train on: "sampled" (counts; unbiased, only at the sampling
    temperature), "logits" (renormalised over the stored ids, any temperature) or, from a --logits
    hidden cache, "hidden" (the exact full distribution, any temperature)."""
    spec = meta.logits or {}
    form = cfg.kd_targets
    if spec.get("kind") == "hidden" and form in ("auto", "logits"):
        return "hidden"
    if form == "auto":
        form = "sampled" if spec.get("kind") == "sample" else "logits"
    if form == "sampled" and spec.get("kind") != "sample":
        raise TedcacheError(f"--kd-targets sampled needs a cache extracted with --logits sample:N, this one holds "
                            f"{spec.get('kind')} rows; use --kd-targets logits")
    if form == "sampled" and cfg.kl_alpha > 0 and cfg.temperature not in (None, spec["temperature"]):
        raise TedcacheError(f"the cache's tokens were sampled at temperature {spec['temperature']}, not "
                            f"{cfg.temperature}; pass --temperature {spec['temperature']} or --kd-targets logits")
    return form


def kd_temperature(cfg: DistillConfig, meta: CacheMetadata) -> float:
    """The KD temperature: as given, else for a causal LM the cache's --logits-temperature (default 1:
    on the LM demo, top-k KD at TED's T = 2 ended at test perplexity 709.67 against 238-242 at T = 1,
    docs/causal-lm.md), else TED's 2."""
    if cfg.temperature is not None:
        return cfg.temperature
    return meta.logits["temperature"] if meta.logits else 2.0


def effective_weights(cfg: DistillConfig) -> DistillConfig:
    """The configuration with the weights its method uses (see losses.method_weights): what a run records."""
    kl_alpha, mse_alpha = method_weights(cfg.method, cfg.kl_alpha, cfg.mse_alpha)
    return replace(cfg, kl_alpha=kl_alpha, mse_alpha=mse_alpha)


def stage2_loss(cfg: DistillConfig, cache: Cache, student, bank: FilterBank | None,
                 teacher_layers: list[int]) -> Stage2Loss:
    meta = cache.metadata
    form = kd_form(cfg, meta) if TASK[meta.task].causal else "logits"
    return Stage2Loss(meta.task, cfg.method, cfg.kl_alpha, cfg.mse_alpha, cfg.temperature, bank,
                      state_variance(cfg, meta, teacher_layers) if bank is not None else None, form,
                      _student_width(student, meta) if TASK[meta.task].causal else None,
                      cache.teacher_head() if form == "hidden" else None, from_head=not cfg.whole_logits)


def state_variance(cfg: DistillConfig, meta: CacheMetadata, teacher_layers: list[int]) -> torch.Tensor | None:
    """--mse-norm variance: the cached variance of each mapped teacher layer's states."""
    if cfg.mse_norm == "none":
        return None
    if not meta.state_variance:
        raise TedcacheError(f"--mse-norm variance needs the teacher-state variances that caches record; {cfg.cache} "
                            "was written before they were: rebuild it with tedcache extract --force, or use "
                            "--mse-norm none")
    return torch.tensor([meta.state_variance[str(layer)] for layer in teacher_layers], dtype=torch.float32)
