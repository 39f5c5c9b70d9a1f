"""Stage one: Stage I on the teacher, then one frozen-teacher pass written to a cache."""

from __future__ import annotations

import re
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .config import FILTER_KINDS, PRECISIONS, TASKS, ExtractConfig
from .data import load_examples
from .errors import TedcacheError, note
from .filters import FilterBank, FilterSpec
from .models import load_classifier, load_tokenizer, vocab_hash, weights_hash
from .reader import ExamplesSource, iterate_batches
from .stage1 import train_filters
from .store import Cache, CacheWriter, cache_key, encode_states, read_metadata
from .taps import forward_with_taps, hidden_size, num_layers, parse_layers


@torch.no_grad()
def teacher_targets(teacher, bank: FilterBank, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """What the cache stores for a batch: teacher logits (B, C) and filtered states, (B, L, d_f) per layer.
    Teacher and filters must be in eval mode; the online path calls this same function."""
    logits, hidden = forward_with_taps(teacher, batch, bank.spec.layers)
    return logits.float(), [s.float() for s in bank(hidden)]


def _validate(cfg: ExtractConfig) -> None:
    if cfg.data.task not in TASKS:
        raise TedcacheError(f"unknown task '{cfg.data.task}'; use one of {', '.join(TASKS)}")
    if cfg.precision not in PRECISIONS:
        raise TedcacheError(f"unknown precision '{cfg.precision}'; use one of {', '.join(PRECISIONS)}")
    if cfg.filters.kind not in FILTER_KINDS:
        raise TedcacheError(f"unknown filter '{cfg.filters.kind}'; use one of {', '.join(FILTER_KINDS)}")
    if cfg.filters.dim is not None and cfg.filters.dim < 1:
        raise TedcacheError(f"--filter-dim must be positive, got {cfg.filters.dim}")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", Path(name.rstrip("/")).name).strip("-")[:40] or "teacher"


def extract(cfg: ExtractConfig, log=None) -> Path:
    """Build (or reuse) the cache for `cfg`; returns its path. Progress notes go to `log(msg)` (stderr)."""
    log = log or note
    _validate(cfg)
    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg.teacher, "teacher")
    teacher = load_classifier(cfg.teacher, "teacher")
    task = cfg.data.task
    if task == "regression" and teacher.config.num_labels != 1:
        raise TedcacheError(f"--task regression needs a teacher with one output, {cfg.teacher} has "
                            f"{teacher.config.num_labels}; fine-tune one with tedcache finetune --task regression")
    train, label_names = load_examples(cfg.data.train, cfg.data, tokenizer, None, "--data", cfg.data.limit,
                                       teacher.config if task == "classification" else None)
    others = {}
    for split, paths in (("eval", cfg.data.eval), ("test", cfg.data.test)):
        if paths:
            others[split], _ = load_examples(paths, cfg.data, tokenizer, label_names, f"--{split}-data")
    layers = parse_layers(cfg.filters.layers, num_layers(teacher))
    spec = FilterSpec(layers, hidden_size(teacher), cfg.filters.dim or hidden_size(teacher), cfg.filters.kind)

    identity = {
        "teacher_weights": weights_hash(teacher), "tokenizer_vocab": vocab_hash(tokenizer),
        "data": train.fingerprint, **{f"{s}_data": ex.fingerprint for s, ex in others.items()},
        "task": task, "max_length": cfg.data.max_length, "filters": asdict(spec),
        "stage1": asdict(cfg.stage1), "precision": cfg.precision,
    }
    path = Path(cfg.cache_dir) / f"{_slug(cfg.teacher)}-{cache_key(identity)}"
    if path.exists() and not cfg.force:
        if read_metadata(str(path)).get("complete"):
            log("reusing the cache built earlier from the same inputs (--force rebuilds it)")
            return path
        log("an incomplete cache from an interrupted run is there; rebuilding it")

    torch.manual_seed(cfg.stage1.seed)
    bank = FilterBank(spec)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    num_outputs = 1 if task == "regression" else len(label_names)
    stage1 = train_filters(teacher, bank, ExamplesSource(train), task, num_outputs, cfg.stage1, pad_id,
                           desc="stage I (teacher filters)")

    metadata = {
        "identity": identity, "created_by": f"tedcache {__version__}", "task": task, "label_names": label_names,
        "num_outputs": num_outputs, "layers": layers, "filter_dim": spec.out_dim, "filter_kind": spec.kind,
        "teacher": cfg.teacher, "teacher_hidden_size": spec.in_dim, "teacher_num_layers": num_layers(teacher),
        "teacher_weights_sha256": identity["teacher_weights"], "tokenizer": cfg.teacher,
        "tokenizer_vocab_sha256": identity["tokenizer_vocab"], "pad_token_id": pad_id,
        "data": {"train": cfg.data.train, "eval": cfg.data.eval, "test": cfg.data.test,
                 "text_column": cfg.data.text_column, "text_pair_column": cfg.data.text_pair_column,
                 "label_column": cfg.data.label_column, "limit": cfg.data.limit},
        "data_fingerprint": train.fingerprint, "max_length": cfg.data.max_length, "precision": cfg.precision,
        "stage1": {**asdict(cfg.stage1), "final_losses": stage1["history"][-1:]},
        "splits": {"train": len(train), **{s: len(ex) for s, ex in others.items()}},
    }
    writer = CacheWriter(str(path), metadata, cfg.shard_tokens)
    writer.save_filters(bank)
    teacher.eval()
    bank.eval()
    for split, examples in (("train", train), *others.items()):
        order = (np.random.default_rng(cfg.stage1.seed).permutation(len(examples)) if split == "train"
                 else np.arange(len(examples)))
        examples = examples.reorder(order)
        if split == "train":
            writer.start_states(split, layers, examples.num_tokens, spec.out_dim, cfg.precision)
        logits = []
        source = ExamplesSource(examples)
        total = -(-len(examples) // cfg.batch_size)
        for batch in tqdm(iterate_batches(source, cfg.batch_size, pad_id), total=total, leave=False,
                          desc=f"teacher pass ({split})", disable=None):
            batch_logits, states = teacher_targets(teacher, bank, batch)
            logits.append(batch_logits.numpy())
            if split == "train":
                real = batch["attention_mask"].bool()  # row-major: tokens come out in CSR order
                writer.append_states(split, layers, [encode_states(s[real], cfg.precision) for s in states])
        writer.write_examples(split, examples, order, np.concatenate(logits))
    writer.complete()
    log(f"cache written in {time.perf_counter() - started:.0f}s: {len(train)} examples, "
        f"{train.num_tokens} tokens, layers {layers}, {Cache(str(path)).bytes_on_disk() / 2**20:.1f} MiB")
    return path
