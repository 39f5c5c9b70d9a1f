"""What an extraction decides before it writes anything (ExtractRun): the teacher loaded and placed, the
data splits, the filters' shape, the logit rows kept, and the cache's identity and location."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .cache import Location, cache_name
from .cache.logits import LogitSpec, parse_logit_spec
from .config import DEFAULT_CACHE_DIR, ExtractConfig
from .data import Examples
from .data.splits import load_splits
from .distributed import Processes
from .errors import TedcacheError
from .filters import FilterSpec
from .models import (
    device_group,
    input_device,
    load_for_task,
    load_tokenizer,
    placement,
    teacher_dtype,
    tokenizer_hash,
    weights_hash,
)
from .taps import hidden_size, model_parts, num_layers, parse_layers
from .tasks import TASK


@dataclass
class ExtractRun:
    """An extraction once set up: its settings, processes and log, the teacher (eval mode, placed) with its
    tokenizer and input device, the splits and label names, the filters' shape, the logit rows a causal LM
    keeps, the cache's identity (what determines its content) and location, and when it started."""

    cfg: ExtractConfig
    procs: Processes
    log: Callable
    tokenizer: object
    teacher: torch.nn.Module
    device: torch.device
    splits: dict[str, Examples]
    label_names: list[str] | None
    spec: FilterSpec
    logit_spec: LogitSpec | None
    identity: dict
    location: Location
    started: float

    @property
    def filtered(self) -> bool:
        return self.cfg.states == "filtered"

    @property
    def layers(self) -> list[int]:
        return self.spec.layers


def set_up(cfg: ExtractConfig, procs: Processes, log: Callable) -> ExtractRun:
    """Load and place the teacher, tokenize the splits, decide the filters and the cache's identity."""
    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg.teacher, "teacher", cfg.trust_remote_code)
    task = cfg.data.task
    device = procs.device(cfg.device)
    dtype = teacher_dtype(cfg.dtype, device)
    gpus = device_group(cfg.devices_per_process, int(os.environ.get("LOCAL_RANK", 0)),
                        int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()) if cfg.device_map else None
    placed = placement(cfg.device_map, Path(cfg.offload_dir or DEFAULT_CACHE_DIR / "offload"), gpus)
    teacher = load_for_task(cfg.teacher, "teacher", task, resize=False, trust_remote_code=cfg.trust_remote_code,
                            dtype=dtype, placement=placed)
    teacher = teacher.to(device) if placed is None else teacher
    device = input_device(teacher)
    if cfg.compile:
        teacher.forward = torch.compile(teacher.forward, dynamic=True)  # batches vary in length: one graph
    logit_spec = parse_logit_spec(cfg.logits, _tokenizer_width(teacher, tokenizer, cfg.teacher),
                                  cfg.logits_temperature) if TASK[task].causal else None
    if task == "regression" and teacher.config.num_labels != 1:
        raise TedcacheError(f"--task regression needs a teacher with one output, {cfg.teacher} has "
                            f"{teacher.config.num_labels}; fine-tune one with tedcache finetune --task regression")
    with procs.main_first():  # the first process fills the datasets cache, the others then read it
        splits, label_names = load_splits(cfg.data, tokenizer, teacher.config)
    filtered = cfg.states == "filtered"
    layers = parse_layers(cfg.filters.layers, num_layers(teacher)) if cfg.states != "none" else []
    dim = (cfg.filters.dim or hidden_size(teacher)) if filtered else hidden_size(teacher)
    spec = FilterSpec(layers, hidden_size(teacher), dim, cfg.filters.kind)
    identity = cache_identity(cfg, teacher, tokenizer, splits, spec, logit_spec, dtype)
    location = Location(cfg.cache_dir).child(cache_name(cfg.teacher, identity))
    teacher.eval()
    return ExtractRun(cfg, procs, log, tokenizer, teacher, device, splits, label_names, spec, logit_spec, identity,
                      location, started)


def cache_identity(cfg: ExtractConfig, teacher, tokenizer, splits: dict[str, Examples], spec: FilterSpec,
                   logit_spec: LogitSpec | None, dtype: str) -> dict:
    """Everything that determines the cache's content; its hash ends the cache's folder name."""
    lm, filtered = TASK[cfg.data.task].causal, cfg.states == "filtered"
    identity = {
        "teacher_weights": weights_hash(teacher), "tokenizer": tokenizer_hash(tokenizer),
        **{f"{s}_data" if s != "train" else "data": ex.fingerprint for s, ex in splits.items()},
        "task": cfg.data.task, "max_length": cfg.data.block_size if lm else cfg.data.max_length, "states": cfg.states,
        "layers": spec.layers, "filters": asdict(spec) if filtered else None,
        "stage1": {**asdict(cfg.stage1), "states": cfg.stage1_states} if filtered else None,
        "precision": cfg.precision, "shard_tokens": cfg.shard_tokens, "seed": cfg.seed,
    }
    if lm:
        identity.update(logits=asdict(logit_spec), lm_head=cfg.filters.lm_head if filtered else None)
    if filtered and cfg.stage1_examples is not None and cfg.stage1_examples < len(splits["train"]):
        identity["stage1_examples"] = cfg.stage1_examples  # (only when set: other caches keep their names)
    if dtype != "fp32":
        identity["teacher_dtype"] = dtype  # (likewise)
    if cfg.compile:
        identity["compiled"] = True  # (likewise)
    return identity


def _tokenizer_width(teacher, tokenizer, name: str) -> int:
    """The ids the teacher's logit rows are kept for: the tokenizer's (a padded output layer's extra rows
    are never produced as tokens)."""
    rows = model_parts(teacher).head.weight.shape[0]
    if rows < len(tokenizer):
        raise TedcacheError(f"teacher {name} has {rows} output rows but its tokenizer has {len(tokenizer)} ids: "
                            "it cannot predict the last ones; resize its embeddings to the tokenizer "
                            "(model.resize_token_embeddings) and save it again")
    return len(tokenizer)
