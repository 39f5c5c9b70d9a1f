"""Stage one: Stage I on the teacher, then one frozen-teacher pass written to a cache, unit by unit.

Killing an extraction at any moment and running the same command again resumes it: the Stage-I
filters, the token arrays and every finished unit are kept, and only the missing units are computed."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .config import FILTER_KINDS, LM_HEADS, STATE_KINDS, TASKS, ExtractConfig
from .data import Examples, load_blocks, load_examples
from .distributed import processes
from .errors import TedcacheError, note
from .filters import FilterBank, FilterSpec
from .losses import lm_loss
from .models import load_for_task, load_tokenizer, vocab_hash, weights_hash
from .reader import ExamplesSource, iterate_batches, to_device
from .stage1 import train_filters
from .store import (
    PRECISIONS,
    CacheLock,
    CacheWriter,
    Location,
    cache_key,
    calibrate_channel_scales,
    encode_states,
    read_filters,
    read_metadata,
)
from .sparse_logits import LogitSpec, id_dtype, parse_logit_spec, sparsify
from .taps import forward_with_taps, hidden_size, num_layers, parse_layers


@torch.no_grad()
def teacher_targets(teacher, bank: FilterBank | None, batch: dict,
                    layers: list[int] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """What the cache stores for a batch: teacher logits (B, C; causal-lm (B, L, V)) and per tapped layer the filtered state
    (B, L, d_f), or the raw hidden state (B, L, d) when `bank` is None (then `layers` says which).
    Teacher and filters must be in eval mode; the online path calls this same function."""
    logits, hidden = forward_with_taps(teacher, batch, bank.spec.layers if bank is not None else layers)
    states = bank(hidden) if bank is not None else hidden
    return logits.float(), [s.float() for s in states]


def _validate(cfg: ExtractConfig) -> None:
    choices = {"task": (cfg.data.task, TASKS), "precision": (cfg.precision, PRECISIONS),
               "filter": (cfg.filters.kind, FILTER_KINDS), "states": (cfg.states, STATE_KINDS),
               "lm-head": (cfg.filters.lm_head, LM_HEADS)}
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise TedcacheError(f"unknown {flag} '{value}'; use one of {', '.join(allowed)}")
    if cfg.filters.dim is not None and cfg.filters.dim < 1:
        raise TedcacheError(f"--filter-dim must be positive, got {cfg.filters.dim}")
    lm = cfg.data.task == "causal-lm"
    length, flag = (cfg.data.block_size, "--block-size") if lm else (cfg.data.max_length, "--max-length")
    if length < 2:
        raise TedcacheError(f"{flag} must be at least 2, got {length}")
    if cfg.shard_tokens < length:
        raise TedcacheError(f"--shard-tokens ({cfg.shard_tokens}) must be at least {flag} "
                            f"({length}): an example never straddles a shard")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", Path(name.rstrip("/")).name).strip("-")[:40] or "teacher"


def storage_order(split: str, size: int, seed: int) -> np.ndarray:
    """Training rows are stored in a seeded shuffled order (so contiguous reads are random samples)."""
    return np.random.default_rng(seed).permutation(size) if split == "train" else np.arange(size)


def extract(cfg: ExtractConfig, log=None) -> str:
    """Build, resume or reuse the cache for `cfg`; returns its location (a path or URL).

    Under `accelerate launch` / `torchrun` with N processes: the first process alone trains the Stage-I
    filters and creates the cache (arrays, metadata, filters, int8 scales); then every process loads
    the stored filters and writes its own whole units (shards), and the first marks the cache complete
    once all are written. The result is the same cache, value for value, as one process makes."""
    procs = processes()
    log = (log or note) if procs.main else (lambda *_: None)
    _validate(cfg)
    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg.teacher, "teacher")
    task = cfg.data.task
    lm = task == "causal-lm"
    device = procs.device(cfg.device)
    teacher = load_for_task(cfg.teacher, "teacher", task, resize=False).to(device)
    logit_spec = parse_logit_spec(cfg.logits, teacher.config.vocab_size, cfg.logits_temperature) if lm else None
    if task == "regression" and teacher.config.num_labels != 1:
        raise TedcacheError(f"--task regression needs a teacher with one output, {cfg.teacher} has "
                            f"{teacher.config.num_labels}; fine-tune one with tedcache finetune --task regression")
    with procs.main_first():  # the first process fills the datasets cache, the others then read it
        splits, label_names = _load_splits(cfg, tokenizer, teacher.config)
    train = splits["train"]
    layers = parse_layers(cfg.filters.layers, num_layers(teacher))
    raw = cfg.states == "raw"
    dim = hidden_size(teacher) if raw else (cfg.filters.dim or hidden_size(teacher))
    spec = FilterSpec(layers, hidden_size(teacher), dim, cfg.filters.kind)

    identity = {
        "teacher_weights": weights_hash(teacher), "tokenizer_vocab": vocab_hash(tokenizer),
        **{f"{s}_data" if s != "train" else "data": ex.fingerprint for s, ex in splits.items()},
        "task": task, "max_length": cfg.data.block_size if lm else cfg.data.max_length, "states": cfg.states,
        "layers": layers, "filters": None if raw else asdict(spec), "stage1": None if raw else asdict(cfg.stage1),
        "precision": cfg.precision, "shard_tokens": cfg.shard_tokens, "seed": cfg.seed,
    }
    if lm:
        identity.update(logits=asdict(logit_spec), lm_head=None if raw else cfg.filters.lm_head)
    location = Location(cfg.cache_dir).child(f"{_slug(cfg.teacher)}-{cache_key(identity)}")
    teacher.eval()
    with CacheLock(location) if procs.main else nullcontext():
        plan = None
        if procs.main:
            try:
                plan = _prepare(location, cfg, identity, splits, label_names, spec, tokenizer, teacher, logit_spec,
                                device, log)
            except Exception as exc:  # the other processes wait for the plan: tell them, then fail here
                procs.broadcast({"error": str(exc) if isinstance(exc, TedcacheError) else None})
                raise
        plan = procs.broadcast(plan)
        if "error" in plan:
            raise TedcacheError(plan["error"] or "the first process failed while preparing the cache (see its error)")
        if plan["reuse"]:
            return location.url
        writer = CacheWriter(location)
        bank = None if raw else FilterBank.from_bytes(read_filters(location)).to(device).eval()
        units = [(split, unit) for split, todo in plan["todo"].items() for unit in todo]
        mine = units[procs.rank::procs.size]  # disjoint whole units: no shard has two writers
        pass_started = time.perf_counter()
        _teacher_pass(writer, teacher, bank, layers, splits, cfg, logit_spec, mine)
        procs.barrier()
        if procs.main:
            missing = {s: sorted(set(range(n)) - writer.done_units(s)) for s, n in writer.metadata["units"].items()}
            if any(missing.values()):
                raise TedcacheError(f"units {missing} have no record after the teacher pass; run the same "
                                    "command again to compute them")
            writer.metadata["timings"] = {"total_s": time.perf_counter() - started,
                                          "teacher_pass_s": time.perf_counter() - pass_started,
                                          "processes": procs.size}
            writer.complete()
        procs.barrier()
    if procs.main:  # (the size is read once the lock is gone, which the other processes must not race)
        log(f"cache complete in {time.perf_counter() - started:.0f}s: {len(train)} examples, {train.num_tokens} "
            f"tokens, layers {layers}, {cfg.precision}, {location.size() / 2**20:.1f} MiB"
            + (f", {procs.size} processes" if procs.size > 1 else ""))
    return location.url


def _prepare(location, cfg, identity, splits, label_names, spec, tokenizer, teacher, logit_spec, device, log) -> dict:
    """The first process's part: reuse, resume, or Stage I + a new cache; the int8 scales from train unit 0
    (written here, so every process encodes with the same scales). Returns {"reuse", "todo": units left}."""
    existing = read_metadata(location) if location.exists("zarr.json") else None
    if existing and existing.get("complete") and not cfg.force:
        log("reusing the cache built earlier from the same inputs (--force rebuilds it)")
        return {"reuse": True}
    resuming = (existing is not None and not cfg.force and existing.get("inputs_written")
                and existing.get("identity") == identity)
    raw = cfg.states == "raw"
    if resuming:
        writer = CacheWriter(location)
        bank = None if raw else FilterBank.from_bytes(read_filters(location)).to(device)
    else:
        bank = None if raw else _train_teacher_filters(teacher, spec, splits["train"], cfg.data.task, label_names,
                                                       tokenizer, cfg)
        writer = _create_cache(location, cfg, identity, splits, label_names, spec, tokenizer, teacher, bank,
                               logit_spec)
    if bank is not None:
        bank.eval()
    meta = writer.metadata
    needs_scales = meta["precision"] == "int8" and "train/channel_scales" not in writer.root
    if needs_scales and 0 not in writer.done_units("train"):
        _teacher_pass(writer, teacher, bank, spec.layers, splits, cfg, logit_spec, [("train", 0)])
    todo = {s: sorted(set(range(meta["units"][s])) - writer.done_units(s)) for s in splits}
    total, remaining = sum(meta["units"].values()), sum(len(v) for v in todo.values())
    if resuming and remaining < total:
        log(f"resuming: {total - remaining} of {total} units already written, {remaining} to go")
    return {"reuse": False, "todo": todo}


def _load_splits(cfg: ExtractConfig, tokenizer, model_config) -> tuple[dict[str, Examples], list[str] | None]:
    """Tokenized train [, eval, test] splits (causal-lm: packed blocks) and the label names."""
    data = cfg.data
    lm = data.task == "causal-lm"
    if lm:
        train, label_names = load_blocks(data.train, data, tokenizer, "--data", data.limit), None
    else:
        train, label_names = load_examples(data.train, data, tokenizer, None, "--data", data.limit,
                                           model_config if data.task == "classification" else None)
    splits = {"train": train}
    for split, paths in (("eval", data.eval), ("test", data.test)):
        if paths:
            source = f"--{split}-data"
            splits[split] = load_blocks(paths, data, tokenizer, source) if lm \
                else load_examples(paths, data, tokenizer, label_names, source)[0]
    return splits, label_names


def _train_teacher_filters(teacher, spec, train, task, label_names, tokenizer, cfg) -> FilterBank:
    torch.manual_seed(cfg.stage1.seed)
    bank = FilterBank(spec).to(next(teacher.parameters()).device)
    num_outputs = len(label_names) if task == "classification" else 1
    train_filters(teacher, bank, ExamplesSource(train), task, num_outputs, cfg.stage1, _pad_id(tokenizer),
                  desc="stage I (teacher filters)", lm_head=cfg.filters.lm_head)
    teacher.eval()
    return bank


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _create_cache(location, cfg, identity, splits, label_names, spec, tokenizer, teacher, bank,
                  logit_spec: LogitSpec | None) -> CacheWriter:
    """Metadata, token arrays and the teacher filters: everything before the teacher pass."""
    task = cfg.data.task
    metadata = {
        "identity": identity, "created_by": f"tedcache {__version__}", "task": task, "label_names": label_names,
        "num_outputs": len(label_names) if task == "classification" else (1 if task == "regression" else None),
        "states": cfg.states, "layers": spec.layers, "filter_dim": spec.out_dim,
        "filter_kind": None if bank is None else spec.kind, "teacher": cfg.teacher,
        "teacher_hidden_size": spec.in_dim, "teacher_num_layers": num_layers(teacher),
        "teacher_weights_sha256": identity["teacher_weights"], "tokenizer": cfg.teacher,
        "tokenizer_vocab_sha256": identity["tokenizer_vocab"], "pad_token_id": _pad_id(tokenizer),
        "data": {"train": cfg.data.train, "eval": cfg.data.eval, "test": cfg.data.test,
                 "text_column": cfg.data.text_column, "text_pair_column": cfg.data.text_pair_column,
                 "label_column": cfg.data.label_column, "limit": cfg.data.limit},
        "data_fingerprint": identity["data"], "max_length": identity["max_length"], "precision": cfg.precision,
        "logits": None if logit_spec is None else asdict(logit_spec), "vocab_size": teacher.config.vocab_size,
        "lm_head": identity.get("lm_head"),
        "stage1": None if bank is None else asdict(cfg.stage1), "seed": cfg.seed,
        "splits": {s: len(ex) for s, ex in splits.items()},
        "tokens": {s: ex.num_tokens for s, ex in splits.items()},
    }
    writer = CacheWriter.create(location, metadata, cfg.shard_tokens)
    for split, examples in splits.items():
        order = storage_order(split, len(examples), cfg.seed)
        writer.write_inputs(split, examples.reorder(order), order)
    if bank is not None:
        writer.save_filters(bank)
    writer.create_state_arrays(spec.layers, spec.out_dim)
    if logit_spec is not None:
        dtypes = {"ids": id_dtype(teacher.config.vocab_size), "logprobs": np.float16}
        if logit_spec.kind == "sample":
            dtypes["counts"] = np.uint8
        writer.create_logit_arrays(logit_spec.size, dtypes)
    writer.finish_inputs()
    return writer


def _run_unit(teacher, bank, layers, examples: Examples, pad_id: int, batch_size: int,
              logit_spec: LogitSpec | None, generator: torch.Generator | None):
    """One unit through the teacher. Returns (per-example outputs, per-token rows in storage order):
    outputs {"logits": (n, C) rows} or, causal-lm, {"nll": the mean next-token loss of each block};
    rows {"states/<layer>": (tokens, d)} plus, causal-lm with a generator, the sparse rows
    {"logits/ids", "logits/logprobs"[, "logits/counts"]} (tokens, S)."""
    device = next(teacher.parameters()).device
    outputs, rows = [], {}
    for batch in iterate_batches(ExamplesSource(examples), batch_size, pad_id):
        batch = to_device(batch, device)
        logits, states = teacher_targets(teacher, bank, batch, layers)
        real = batch["attention_mask"].bool()  # row-major: tokens come out in storage order
        parts = {f"states/{layer}": s[real] for layer, s in zip(layers, states)}
        if logit_spec is None:
            outputs.extend(logits.cpu().tolist())
        else:
            outputs.extend(lm_loss(row[None], ids[None], mask[None]).item()
                           for row, ids, mask in zip(logits, batch["input_ids"], batch["attention_mask"]))
            if generator is not None:
                parts.update({f"logits/{k}": v for k, v in sparsify(logits[real].cpu(), logit_spec, generator).items()})
        for name, part in parts.items():
            rows.setdefault(name, []).append(part.cpu())
    return outputs, {name: torch.cat(parts) for name, parts in rows.items()}


def _unit_generator(seed: int, unit: int) -> torch.Generator:
    """Sampling is seeded per unit, so a resumed or repaired unit draws exactly what a clean run drew."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, unit]).generate_state(1)[0]))


def _teacher_pass(writer: CacheWriter, teacher, bank, layers, splits, cfg: ExtractConfig,
                  logit_spec: LogitSpec | None, units: list[tuple[str, int]]) -> None:
    """Compute and write `units` ((split, unit) pairs); int8 scales come from the first unit computed
    when the cache has none yet (that is train unit 0: see _prepare)."""
    meta = writer.metadata
    shard, precision = meta["shard_tokens"], meta["precision"]
    pad_id = meta["pad_token_id"]
    channel_scales = {}
    if precision == "int8" and "train/channel_scales" in writer.root:
        channel_scales = {layer: torch.from_numpy(writer.root[f"train/channel_scales/{layer}"][...]) for layer in layers}
    output_key = "logits" if logit_spec is None else "nll"

    def write(split, unit, outputs, rows):
        arrays = {}
        for name, values in rows.items():
            padded = torch.full((shard, *values.shape[1:]), -1 if name == "logits/ids" else 0, dtype=values.dtype)
            padded[:len(values)] = values
            if name.startswith("states/"):
                layer = int(name.split("/")[1])
                arrays[name], arrays[f"token_scales/{layer}"] = encode_states(padded, precision,
                                                                              channel_scales.get(layer))
            else:
                arrays[name] = padded.numpy()
        writer.write_unit(split, unit, {output_key: outputs}, arrays)

    # The teacher computes unit u+1 while a background thread encodes, writes and checksums unit u.
    bar = tqdm(total=len(units), desc="teacher pass (units)", leave=False, disable=None)
    stored = {split: examples.reorder(storage_order(split, len(examples), cfg.seed)) for split, examples in splits.items()}
    bounds = {split: writer.root[f"{split}/unit_bounds"][...] for split in splits}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tedcache-write") as background:
        pending = None
        for split, unit in units:
            part = stored[split].reorder(np.arange(bounds[split][unit], bounds[split][unit + 1]))
            generator = _unit_generator(cfg.seed, unit) if split == "train" and logit_spec is not None else None
            outputs, rows = _run_unit(teacher, bank, layers, part, pad_id, cfg.batch_size, logit_spec, generator)
            if precision == "int8" and not channel_scales and layers:
                # stored before any unit is written, so a resumed run (whose unit 0 is then done) reads the same
                channel_scales = {layer: calibrate_channel_scales(rows[f"states/{layer}"]) for layer in layers}
                writer.save_channel_scales(layers, list(channel_scales.values()))
            if pending is not None:
                pending.result()  # at most one unit in flight: memory stays bounded
            pending = background.submit(write, split, unit, outputs, rows if split == "train" else {})
            bar.update(1)
        if pending is not None:
            pending.result()
    bar.close()
