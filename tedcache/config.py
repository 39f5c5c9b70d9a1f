"""Typed configuration shared by the Python API and the CLI (the CLI only fills these in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TASKS = ("classification", "regression", "causal-lm")
METHODS = ("ted", "kd", "lwd", "finetune")
FILTER_KINDS = ("linear", "mlp")
STATE_KINDS = ("filtered", "raw")  # raw: unfiltered hidden states, for the LWD baseline
LM_HEADS = ("tied", "new")  # causal-lm Stage-I heads: the frozen output embedding, or a fresh one
KD_TARGETS = ("auto", "sampled", "logits")

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "tedcache"


@dataclass
class DataConfig:
    """Where the examples come from and how they are read and tokenized."""

    train: list[str]
    eval: list[str] | None = None
    test: list[str] | None = None
    task: str = "classification"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    max_length: int = 128
    limit: int | None = None  # keep only the first N training examples (causal-lm: blocks) after loading
    block_size: int = 128  # causal-lm: tokens per packed block (documents joined by EOS, then cut)


@dataclass
class TrainConfig:
    """Optimiser settings for one training phase (fine-tuning, Stage I, Stage II)."""

    epochs: float = 3.0
    lr: float = 5e-5
    batch_size: int = 32  # per process and micro-batch: the global batch is this x processes x grad_accum
    grad_accum: int = 1  # micro-batches per optimiser step
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    seed: int = 42


@dataclass
class FilterConfig:
    """TED filters: which layers get one, its shape and its output width."""

    layers: str = "all"  # "all", "every:K" or a comma list of 0-based layer indices
    kind: str = "linear"
    dim: int | None = None  # None: the teacher's hidden size
    lm_head: str = "tied"  # causal-lm Stage I: "tied" (frozen output embedding after a trainable d_f -> d map) or "new"


@dataclass
class ExtractConfig:
    """`tedcache extract`: Stage I on the teacher, then one teacher pass written to a cache."""

    teacher: str
    data: DataConfig
    filters: FilterConfig = field(default_factory=FilterConfig)
    stage1: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=1e-3))
    cache_dir: str = str(DEFAULT_CACHE_DIR / "caches")  # a folder or an fsspec URL (s3://...)
    precision: str = "int8"  # fp32 | fp16 | bf16 | int8 (see docs/design.md for the measurements)
    states: str = "filtered"
    logits: str = "sample:50"  # causal-lm: sample:N | topk:K | full (see tedcache.sparse_logits)
    logits_temperature: float = 1.0  # causal-lm: sample:N draws from softmax(logits / this) (docs/causal-lm.md)
    batch_size: int = 64  # teacher forward batch during extraction
    shard_tokens: int = 16384  # tokens per shard: the unit of writing, resuming and checksumming
    seed: int = 42  # storage order (Stage I has its own seed in stage1)
    device: str = "auto"  # auto: cuda when available, else cpu
    force: bool = False


@dataclass
class DistillConfig:
    """`tedcache distill`: train a student against a cache (the teacher is never loaded)."""

    cache: str
    student: str
    out: str
    method: str = "ted"
    kl_alpha: float = 1.0
    mse_alpha: float = 1.0
    temperature: float | None = None  # None: TED's 2.0; for a causal-lm cache of samples, their temperature
    kd_targets: str = "auto"  # causal-lm: sampled (counts; auto for sample caches) or logits (renormalised)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=5e-5))
    student_layers: str = "all"  # which student layers get filters (ted)
    layer_map: str | None = None  # "s:t,s:t" student layer -> cache layer; default pairs in order
    finetune_first: float = 0.0  # epochs of plain fine-tuning before Stage I (the reference does it)
    stage1: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, lr=1e-3))
    eval_every: int = 0  # steps between evaluations; 0 = once per epoch
    max_steps: int | None = None
    log_every: int = 10  # steps between loss records in metrics.json
    verify: bool = False  # check every shard's checksum before training
    workers: int = 0  # DataLoader worker processes reading the cache (0: read in the training process)
    teacher: str | None = None  # online mode: compute the targets live with this teacher (and the cache's filters)
    device: str = "auto"  # auto: cuda when available, else cpu
    autocast: bool | None = None  # bf16 autocast; None: on when the device is cuda
    resume: bool = False  # continue from the checkpoint an interrupted run left in <out>.checkpoint
    checkpoint_every: int = 0  # optimiser steps between checkpoints; 0: after every epoch


def what_it_computes(requested: dict) -> dict:
    """A distill configuration (as saved in metrics.json) less the settings that only say how the run
    survives interruption: two runs that agree on the rest train the same student."""
    return {k: v for k, v in requested.items() if k not in ("resume", "checkpoint_every")}


@dataclass
class FinetuneConfig:
    """`tedcache finetune`: ordinary fine-tuning of a model on labelled data."""

    model: str
    data: DataConfig
    out: str
    train: TrainConfig = field(default_factory=TrainConfig)
