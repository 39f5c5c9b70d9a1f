"""`tedcache extract`: Stage I on the teacher, then one frozen-teacher pass whose targets are handed to
the cache writer, unit by unit.

Killing an extraction at any moment and running the same command again resumes it: the Stage-I
filters, the token arrays and every finished unit are kept, and only the missing units are computed."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save
from tqdm.auto import tqdm

from .cache import BackgroundWriter, CacheLock, CacheMetadata, CacheWriter, Location, UnitStates, cache_name, load_metadata
from .cache.codecs import STATE_DTYPES
from .cache.host_copies import HostCopies
from .cache.layout import FINAL, pack, storage_order
from .cache.logits import LogitSpec, check_rebuilt, head_tensors, id_dtype, parse_logit_spec, sparsify
from .cache.object_store import count_retries, retried_requests, store_errors
from .cache.read import read_filter_files
from .config import DEFAULT_CACHE_DIR, ExtractConfig
from .data import Examples, concatenate, load_blocks, load_examples
from .distributed import processes
from .errors import TedcacheError, environment_error, note, size_text
from .filters import FilterBank, FilterSpec
from .loop import Checkpoint
from .losses import labelled, lm_loss_per_block
from .models import (
    device_group,
    input_device,
    load_for_task,
    load_tokenizer,
    pad_id,
    placement,
    teacher_dtype,
    tokenizer_hash,
    vocab_hash,
    weights_hash,
)
from .reader import ExamplesSource, iterate_batches, to_device
from .run_folder import METRICS_FILE
from .schema import check_choices, to_dict
from .stage1 import FilterTraining, describe_filters, train_filters
from .state_store import StateStore, StoredSource, in_order, stored_source
from .taps import hidden_size, model_parts, num_layers, parse_layers
from .tasks import TASK
from .teacher import teacher_targets


def _validate(cfg: ExtractConfig) -> None:
    check_choices(cfg)
    if cfg.filters.dim is not None and cfg.filters.dim < 1:
        raise TedcacheError(f"--filter-dim must be positive, got {cfg.filters.dim}")
    lm = TASK[cfg.data.task].causal
    length, flag = (cfg.data.block_size, "--block-size") if lm else (cfg.data.max_length, "--max-length")
    if length < 2:
        raise TedcacheError(f"{flag} must be at least 2, got {length}")
    if cfg.shard_tokens < length:
        raise TedcacheError(f"--shard-tokens ({cfg.shard_tokens}) must be at least {flag} "
                            f"({length}): an example never straddles a shard")
    if cfg.stage1_examples is not None and cfg.stage1_examples < 1:
        raise TedcacheError(f"--stage1-examples must be at least 1, got {cfg.stage1_examples}")


def extract(cfg: ExtractConfig, log=None) -> str:
    """Build, resume or reuse the cache for `cfg`; returns its location (a path or URL).

    Under `accelerate launch` / `torchrun` with N processes: every process trains the Stage-I filters
    under DDP (each on its part of every batch, gradients all-reduced); the first alone creates the cache
    (arrays, metadata, filters, int8 scales); then every process loads the stored filters and writes
    its own whole units (shards), and the first marks the cache complete once all are written. Given
    the filters, the cache is the one process's value for value; the filters themselves are one
    process's up to float rounding and dropout draws (docs/distributed.md)."""
    procs = processes()
    log = (log or note) if procs.main else (lambda *_: None)
    _validate(cfg)
    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg.teacher, "teacher", cfg.trust_remote_code)
    task = cfg.data.task
    lm = TASK[task].causal
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
                                  cfg.logits_temperature) if lm else None
    if task == "regression" and teacher.config.num_labels != 1:
        raise TedcacheError(f"--task regression needs a teacher with one output, {cfg.teacher} has "
                            f"{teacher.config.num_labels}; fine-tune one with tedcache finetune --task regression")
    with procs.main_first():  # the first process fills the datasets cache, the others then read it
        splits, label_names = load_splits(cfg, tokenizer, teacher.config)
    train = splits["train"]
    filtered = cfg.states == "filtered"
    layers = parse_layers(cfg.filters.layers, num_layers(teacher)) if cfg.states != "none" else []
    dim = (cfg.filters.dim or hidden_size(teacher)) if filtered else hidden_size(teacher)
    spec = FilterSpec(layers, hidden_size(teacher), dim, cfg.filters.kind)

    identity = {
        "teacher_weights": weights_hash(teacher), "tokenizer": tokenizer_hash(tokenizer),
        **{f"{s}_data" if s != "train" else "data": ex.fingerprint for s, ex in splits.items()},
        "task": task, "max_length": cfg.data.block_size if lm else cfg.data.max_length, "states": cfg.states,
        "layers": layers, "filters": asdict(spec) if filtered else None,
        "stage1": {**asdict(cfg.stage1), "states": cfg.stage1_states} if filtered else None,
        "precision": cfg.precision, "shard_tokens": cfg.shard_tokens, "seed": cfg.seed,
    }
    if lm:
        identity.update(logits=asdict(logit_spec), lm_head=cfg.filters.lm_head if filtered else None)
    if filtered and cfg.stage1_examples is not None and cfg.stage1_examples < len(train):
        identity["stage1_examples"] = cfg.stage1_examples  # (only when set: other caches keep their names)
    if dtype != "fp32":
        identity["teacher_dtype"] = dtype  # (likewise)
    if cfg.compile:
        identity["compiled"] = True  # (likewise)
    location = Location(cfg.cache_dir).child(cache_name(cfg.teacher, identity))
    planned = _planned_bytes(cfg, splits, spec, logit_spec)
    if not location.local:
        count_retries()
    teacher.eval()
    with store_errors(location.url):
        if procs.main:
            _check_room(location, planned, log)
        try:
            return _extract_into(location, cfg, log, procs, identity, splits, label_names, spec, tokenizer, teacher,
                                 logit_spec, device, layers, filtered, started)
        except OSError as exc:  # a full disk, a folder one may not write in: said as such
            refusal = environment_error(exc, location.url, planned - location.size() if location.local else None)
            if refusal is None:
                raise
            raise refusal from exc


def _extract_into(location: Location, cfg: ExtractConfig, log, procs, identity: dict, splits, label_names, spec,
                  tokenizer, teacher, logit_spec, device, layers: list[int], filtered: bool, started: float) -> str:
    """extract's writing part, under the cache's lock: Stage I, then every unit not yet written."""
    train = splits["train"]
    with CacheLock(location) if procs.main else nullcontext():
        metadata = _metadata(cfg, identity, splits, label_names, spec, tokenizer, teacher, logit_spec)
        found = _first_then_all(procs, lambda: _found(location, cfg, metadata, log))
        if found == "complete":
            return location.url
        bank, stage1_seconds, stored = None, 0.0, {}
        checkpoint = _stage1_checkpoint(location, metadata, cfg, procs.size)
        if found == "new" and filtered:
            stage1_started = time.perf_counter()
            if checkpoint.exists():
                log(f"stage I resumes from its checkpoint in {checkpoint.folder}")
            bank, measured, stored = _train_teacher_filters(teacher, spec, splits, metadata, cfg, log, procs,
                                                            checkpoint)
            metadata = replace(metadata, stage1_filters=measured)
            stage1_seconds = time.perf_counter() - stage1_started
        plan = _first_then_all(procs, lambda: _prepare(location, cfg, metadata, found, bank, splits, teacher,
                                                      logit_spec, device, log, procs.size, stored))
        if procs.main:  # the cache holds the filters now
            checkpoint.remove()
        writer = CacheWriter(location)
        bank = FilterBank.from_bytes(read_filter_files(location)).to(device).eval() if filtered else None
        units = [(split, unit) for split, todo in plan["todo"].items() for unit in todo]
        mine = units[procs.rank::procs.size]  # disjoint whole units: no shard has two writers
        pass_started = time.perf_counter()
        _teacher_pass(writer, teacher, bank, layers, splits, logit_spec, cfg.batch_size, mine, stored, cfg.writer)
        pass_seconds = plan["calibration_s"] + time.perf_counter() - pass_started
        procs.barrier()
        if procs.main:
            missing = writer.missing_units()
            if any(missing.values()):
                raise TedcacheError(f"units {missing} have no record after the teacher pass; run the same "
                                    "command again to compute them")
            writer.complete(timings={"total_s": time.perf_counter() - started, "stage1_s": stage1_seconds,
                                     "teacher_pass_s": pass_seconds, "processes": procs.size})
        procs.barrier()
    if procs.main:  # (the size is read once the lock is gone, which the other processes must not race)
        log(f"cache complete in {time.perf_counter() - started:.0f}s (Stage I {stage1_seconds:.0f}s, teacher pass "
            f"{pass_seconds:.0f}s): {len(train)} examples, {train.num_tokens} tokens; targets: "
            f"{_targets(cfg, layers)}, {location.size() / 2**20:.1f} MiB"
            + (f", {procs.size} processes" if procs.size > 1 else "")
            + ("" if location.local else f"; {retried_requests()} object-store requests retried"))
    return location.url


def _planned_bytes(cfg: ExtractConfig, splits: dict[str, Examples], spec: FilterSpec, logit_spec: LogitSpec | None) -> int:
    """About what the cache will take on disk, uncompressed: per token its ids, each cached layer's state
    (and int8's token scale) and a causal LM's stored rows or final state; per example its outputs."""
    tokens = sum(ex.num_tokens for ex in splits.values())
    examples = sum(len(ex) for ex in splits.values())
    value = np.dtype(STATE_DTYPES[cfg.precision]).itemsize
    per_token = 4 + len(spec.layers) * (spec.out_dim * value + (2 if cfg.precision == "int8" else 0))
    if logit_spec is not None and logit_spec.kind == "hidden":
        per_token += spec.in_dim * value
    elif logit_spec is not None:
        per_token += logit_spec.size * (4 + 2 + (1 if logit_spec.kind == "sample" else 0))
    if TASK[cfg.data.task].per_token:
        per_token += 4 * 2 * 2  # token labels, per-token outputs, spans
    return tokens * per_token + examples * 4 * 8


def _check_room(location: Location, planned: int, log) -> None:
    """Log the cache's planned size; refuse at once where its disk has clearly too little room (less than half
    of what is still to write: the plan is uncompressed, and states compress little)."""
    if not location.local:
        bucket = location.root.split("/")[0]
        try:  # (an object store would make one for a misspelt name; `exists` would hide a store that fails)
            location.fs.info(bucket)
        except FileNotFoundError:
            raise TedcacheError(f"the bucket {bucket} of {location.url} does not exist; create it, or fix the bucket "
                                "name in --cache-dir") from None
        log(f"the cache will take up to about {size_text(planned)}")
        return
    folder = Path(location.root)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free, needed = shutil.disk_usage(existing).free, max(0, planned - location.size())
    log(f"the cache will take up to about {size_text(planned)} ({size_text(free)} free in {existing})")
    if free < needed / 2:
        raise TedcacheError(f"{existing} has {size_text(free)} free and the cache needs about {size_text(needed)}; "
                            "free space or give another --cache-dir, then run the same command")


def _targets(cfg: ExtractConfig, layers: list[int]) -> str:
    """What a cache holds, in words, for extract's log."""
    outputs = "the teacher's outputs" if not TASK[cfg.data.task].causal else f"the teacher's --logits {cfg.logits} rows"
    if cfg.states == "none":
        return f"{outputs} only (--states none: no Stage I, no states)"
    return f"{cfg.states} states of layers {layers} ({cfg.precision}) and {outputs}"


def _first_then_all(procs, work):
    """`work()` on the first process, its result on every process; when it fails there, every process
    fails (the others would otherwise wait for it forever)."""
    outcome = None
    if procs.main:
        try:
            outcome = {"value": work()}
        except Exception as exc:
            procs.broadcast({"error": str(exc) if isinstance(exc, TedcacheError) else None})
            raise
    outcome = procs.broadcast(outcome)
    if "error" in outcome:
        raise TedcacheError(outcome["error"] or "the first process failed while preparing the cache (see its error)")
    return outcome["value"]


def _found(location: Location, cfg: ExtractConfig, metadata: CacheMetadata, log) -> str:
    """What is at `location` (the first process looks, holding the lock): "complete" (reused), "resume"
    (inputs written from the same inputs) or "new" (nothing, something unreadable or other, or --force)."""
    try:
        existing = load_metadata(location) if location.exists("zarr.json") else None
    except TedcacheError:  # unreadable or of another format: we hold the lock, so it is rebuilt
        existing = None
    if existing and existing.complete and not cfg.force:
        log("reusing the cache built earlier from the same inputs (--force rebuilds it)")
        return "complete"
    if existing is not None and not cfg.force and existing.inputs_written and existing.identity == metadata.identity:
        return "resume"
    return "new"


def _prepare(location, cfg, metadata: CacheMetadata, found: str, bank: FilterBank | None, splits, teacher,
             logit_spec, device, log, processes: int, stored: dict) -> dict:
    """The first process's part: open the cache to resume, or create it (with the Stage-I `bank`). With
    several processes, it also computes train unit 0, whose states set the int8 scales, so that every
    process encodes with the same scales (one process sets them in its teacher pass, where unit 0 comes
    first). Returns {"todo": units left, "calibration_s": seconds of that first unit's teacher pass}."""
    if found == "resume":
        writer = CacheWriter(location)
        if cfg.states == "filtered":
            bank = FilterBank.from_bytes(read_filter_files(location)).to(device)
    else:
        writer = _create_cache(location, metadata, splits, bank, logit_spec, teacher)
    if bank is not None:
        bank.eval()
    calibration_started = time.perf_counter()
    if processes > 1 and writer.needs_channel_scales() and 0 not in writer.done_units("train"):
        _teacher_pass(writer, teacher, bank, metadata.layers, splits, logit_spec, cfg.batch_size, [("train", 0)],
                      stored, cfg.writer)
    calibration_s = time.perf_counter() - calibration_started
    todo = writer.missing_units()
    total, remaining = sum(writer.metadata.units.values()), sum(len(v) for v in todo.values())
    if found == "resume" and remaining < total:
        log(f"resuming: {total - remaining} of {total} units already written, {remaining} to go")
    return {"todo": todo, "calibration_s": calibration_s}


def load_splits(cfg: ExtractConfig, tokenizer, model_config) -> tuple[dict[str, Examples], list[str] | None]:
    """Tokenized train [, eval, test] splits (causal-lm: packed blocks) and the label names."""
    data = cfg.data
    lm = TASK[data.task].causal
    if lm:
        train, label_names = load_blocks(data.train, data, tokenizer, "--data", data.limit), None
    else:
        train, label_names = load_examples(data.train, data, tokenizer, None, "--data", data.limit,
                                           model_config if data.task != "regression" else None,
                                           unlabelled="allow")
    if data.transfer:
        transfer = load_blocks(data.transfer, data, tokenizer, "--transfer-data") if lm else \
            load_examples(data.transfer, data, tokenizer, label_names, "--transfer-data", unlabelled="all")[0]
        train = concatenate(train, transfer)
    splits = {"train": train}
    for split, paths in (("eval", data.eval), ("test", data.test)):
        if paths:
            source = f"--{split}-data"
            splits[split] = load_blocks(paths, data, tokenizer, source) if lm \
                else load_examples(paths, data, tokenizer, label_names, source)[0]
    return splits, label_names


STAGE1_CHECKPOINT = "stage1.checkpoint"  # inside an unfinished cache folder


def _stage1_checkpoint(location: Location, metadata: CacheMetadata, cfg: ExtractConfig, processes: int) -> Checkpoint:
    """Where Stage I keeps its state while it trains: inside the cache folder (whose creation, once the
    filters are trained, clears it); for a cache on an object store, a local folder named after it."""
    name = Path(location.url.rstrip("/")).name
    folder = Path(location.path(STAGE1_CHECKPOINT)) if location.local else DEFAULT_CACHE_DIR / "stage1" / name
    return Checkpoint(folder, {"cache": metadata.identity, "processes": processes}, cfg.stage1_checkpoint_every)


def _train_teacher_filters(teacher, spec: FilterSpec, splits: dict[str, Examples], metadata: CacheMetadata,
                           cfg: ExtractConfig, log, procs, checkpoint: Checkpoint
                           ) -> tuple[FilterBank, dict, dict[str, StoredSource]]:
    """The trained filters, how well each learned (on the eval split when there is one), and the splits
    whose stored states and outputs the cache pass can use instead of the teacher (--stage1-states stored:
    the splits Stage I read whole; for a causal LM, only when its last layer is tapped). With many
    processes, trained under DDP by all of them."""
    torch.manual_seed(cfg.seed)
    bank = FilterBank(spec).to(input_device(teacher))
    train = splits["train"]
    if "stage1_examples" in metadata.identity:
        sample = np.random.default_rng(cfg.seed).choice(len(train), metadata.identity["stage1_examples"], replace=False)
        train = train.reorder(np.sort(sample))
        log(f"stage I on {len(train)} of the {len(splits['train'])} training examples (--stage1-examples)")
    source = ExamplesSource(train)
    evaluation = ExamplesSource(splits["eval"]) if "eval" in splits else None
    stored = {}
    if cfg.stage1_states == "stored":  # filled with the cache pass's own batches where Stage I reads a whole split
        whole = {"train": len(train) == len(splits["train"]), "eval": True}
        stored = {split: stored_source(teacher, s, spec.layers, metadata.task,
                                       _pass_batches(splits[split], split, cfg, metadata.pad_token_id) if whole[split]
                                       else in_order(s, cfg.batch_size, metadata.pad_token_id))
                  for split, s in (("train", source), ("eval", evaluation)) if s is not None}
        source, evaluation = stored["train"], stored.get("eval")
        log(f"stage I reads the teacher's states stored once ({sum(s.store.nbytes for s in stored.values()) / 2**20:.0f}"
            f" MiB in {tempfile.gettempdir()}, --stage1-states stored)")
    training = FilterTraining(metadata.task, metadata.num_outputs or 1, cfg.stage1, metadata.pad_token_id, cfg.seed,
                              cfg.filters.lm_head, "stage I (teacher filters)")
    result = train_filters(teacher, bank, source, training, evaluation, procs, checkpoint)
    teacher.eval()
    log(describe_filters(result["filters"]))
    # a causal LM's logits are its output layer on the last layer's state: stored when that layer is tapped
    reusable = not TASK[metadata.task].causal or spec.layers[-1] == num_layers(teacher) - 1
    return bank, result["filters"], {split: s for split, s in stored.items() if reusable and len(s) == len(splits[split])}


def _pass_batches(examples: Examples, split: str, cfg: ExtractConfig, pad: int):
    """(example indices, batch) of one split as the cache pass forms them: unit by unit in storage order,
    batches of --batch-size (see stored_units and _run_unit)."""
    order = storage_order(split, len(examples), cfg.seed)
    bounds = {split: pack(np.diff(examples.offsets)[order], cfg.shard_tokens)[1]}
    for _, _, indices, part in stored_units({split: examples}, bounds, cfg.seed,
                                            [(split, unit) for unit in range(len(bounds[split]) - 1)]):
        for batch in iterate_batches(ExamplesSource(part), cfg.batch_size, pad):
            yield indices[batch["example_index"].numpy()], batch


def _metadata(cfg: ExtractConfig, identity: dict, splits: dict[str, Examples], label_names, spec: FilterSpec,
              tokenizer, teacher, logit_spec: LogitSpec | None) -> CacheMetadata:
    """What the new cache says about itself (the writer adds the layout's counts as it writes)."""
    task, filtered = cfg.data.task, cfg.states == "filtered"
    lm = TASK[task].causal
    return CacheMetadata(
        format_version=0, identity=identity,  # format_version, chunk_tokens: set by CacheWriter.create
        created_by=f"tedcache {version('tedcache')}", task=task,
        states=cfg.states, layers=spec.layers, filter_dim=spec.out_dim, teacher=cfg.teacher,
        teacher_weights_sha256=identity["teacher_weights"], teacher_recipe=_teacher_recipe(cfg.teacher),
        teacher_dtype=identity.get("teacher_dtype", "fp32"),
        tokenizer_vocab_sha256=vocab_hash(tokenizer),
        pad_token_id=pad_id(tokenizer), precision=cfg.precision, seed=cfg.seed, shard_tokens=cfg.shard_tokens,
        chunk_tokens=0, tokenizer=cfg.teacher, tokenizer_sha256=identity["tokenizer"], label_names=label_names,
        num_outputs=1 if task == "regression" else 2 if task == "question-answering" else
        None if lm else len(label_names),
        filter_kind=spec.kind if filtered else None, teacher_hidden_size=spec.in_dim,
        teacher_num_layers=num_layers(teacher),
        data={"train": cfg.data.train, "transfer": cfg.data.transfer, "eval": cfg.data.eval, "test": cfg.data.test,
              "text_column": cfg.data.text_column, "text_pair_column": cfg.data.text_pair_column,
              "label_column": cfg.data.label_column, "limit": cfg.data.limit},
        data_fingerprint=identity["data"], max_length=identity["max_length"],
        logits=None if logit_spec is None else asdict(logit_spec), vocab_size=teacher.config.vocab_size,
        lm_head=identity.get("lm_head"), stage1=identity["stage1"],
        splits={s: len(ex) for s, ex in splits.items()}, tokens={s: ex.num_tokens for s, ex in splits.items()},
        labelled_train=None if lm else _labelled_examples(splits["train"], task),
        trust_remote_code=cfg.trust_remote_code,
        config=to_dict(cfg))


def _teacher_recipe(teacher: str) -> str | None:
    """The recipe tedcache finetune recorded in the teacher's folder (None for a teacher it did not make)."""
    path = Path(teacher) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("recipe")
    except ValueError:
        return None


def _labelled_examples(examples: Examples, task: str) -> int:
    """Training examples with a gold label (token classification: with at least one tagged word)."""
    if task == "question-answering":
        return len(examples)  # (it takes no unlabelled data)
    if task == "token-classification":
        tagged = np.add.reduceat(examples.token_labels >= 0, examples.offsets[:-1]) if len(examples) else []
        return int(np.count_nonzero(tagged))
    return int(labelled(torch.from_numpy(examples.labels), task).sum())


def _create_cache(location: Location, metadata: CacheMetadata, splits: dict[str, Examples], bank: FilterBank | None,
                  logit_spec: LogitSpec | None, teacher) -> CacheWriter:
    """Metadata, token arrays, the teacher filters (and for --logits hidden its output layer): everything
    before the teacher pass."""
    writer = CacheWriter.create(location, metadata)
    for split, examples in splits.items():
        writer.write_inputs(split, examples)
    if bank is not None:
        writer.save_filters(bank.to_bytes())
    writer.create_state_arrays(metadata.filter_dim)
    if TASK[metadata.task].per_token:
        writer.create_token_logit_arrays(metadata.num_outputs)
    if logit_spec is not None and logit_spec.kind == "hidden":
        head = head_tensors(model_parts(teacher).head, logit_spec.vocab)
        writer.save_head(save({k: v.contiguous().cpu() for k, v in head.items()}))
    elif logit_spec is not None:
        dtypes = {"ids": id_dtype(metadata.vocab_size), "logprobs": np.float16}
        if logit_spec.kind == "sample":
            dtypes["counts"] = np.uint8
        writer.create_logit_arrays(logit_spec.size, dtypes)
    writer.finish_inputs()
    return writer


def _tokenizer_width(teacher, tokenizer, name: str) -> int:
    """The ids the teacher's logit rows are kept for: the tokenizer's (a padded output layer's extra rows
    are never produced as tokens)."""
    rows = model_parts(teacher).head.weight.shape[0]
    if rows < len(tokenizer):
        raise TedcacheError(f"teacher {name} has {rows} output rows but its tokenizer has {len(tokenizer)} ids: "
                            "it cannot predict the last ones; resize its embeddings to the tokenizer "
                            "(model.resize_token_embeddings) and save it again")
    return len(tokenizer)


def _run_unit(teacher, bank, layers, examples: Examples, pad: int, batch_size: int, logit_spec: LogitSpec | None,
              states: dict | None, generator: torch.Generator | None, per_token: bool = False,
              stored: StateStore | None = None):
    """One unit through the teacher (or, with `stored`, read from the teacher's stored states and outputs
    for these examples: the values its forward gives, to float rounding). Training units pass `states`
    ({layer, or layout.FINAL for --logits hidden: codecs.UnitStates}), which receive each batch's
    per-token states in storage order. Returns
    (outputs, logit rows), where they were computed: outputs are the per-example (N, C) logit rows or, causal-lm,
    each block's mean next-token loss (N,), or with `per_token` (token classification, question
    answering) (tokens, C); with a `generator` (causal-lm training units), the sparse rows
    {"ids", "logprobs"[, "counts"]: (tokens, S)}. Nothing waits for the device inside the unit."""
    device = input_device(teacher)
    final = states is not None and FINAL in states
    outputs, rows = [], {}
    source = ExamplesSource(examples) if stored is None else StoredSource(ExamplesSource(examples), stored)
    for batch in iterate_batches(source, batch_size, pad):
        # real tokens, row-major (storage order), indexed from the host mask: no device sync per batch
        real = batch["attention_mask"].flatten().nonzero().squeeze(1).to(device)
        batch = to_device(batch, device)
        logits, filtered = teacher_targets(teacher, bank if states is not None else None, batch,
                                           layers if states is not None else [], final)
        for unit_states, s in zip((states or {}).values(), filtered):
            unit_states.add(_real(s, real))
        if per_token:
            outputs.append(_real(logits, real))
        elif logit_spec is None:
            outputs.append(logits)
        else:
            outputs.append(lm_loss_per_block(logits, batch["input_ids"], batch["attention_mask"]))
        if final and len(outputs) == 1:  # the unit's first batch
            head = head_tensors(model_parts(teacher).head, logit_spec.vocab)
            check_rebuilt(_real(logits, real), _real(filtered[-1], real), head)
        if generator is not None:
            for name, part in sparsify(_real(logits, real), logit_spec, generator).items():
                rows.setdefault(name, []).append(part)
    return torch.cat(outputs), {name: torch.cat(parts) for name, parts in rows.items()}


def _real(values: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(B, L, ...) -> the real tokens' rows (n, ...), `real` being their flat positions."""
    return values.flatten(0, 1).index_select(0, real)


def stored_units(splits: dict[str, Examples], bounds: dict[str, np.ndarray], seed: int,
                 units: list[tuple[str, int]]):
    """(split, unit, order, examples) for each of `units`: the unit's examples in the order the cache
    stores them (`order`: their indices in the split), `bounds[split]` being the cache's
    `<split>/unit_bounds`. Only one unit's tokens are gathered at a time."""
    orders = {split: storage_order(split, len(splits[split]), seed) for split in dict.fromkeys(s for s, _ in units)}
    for split, unit in units:
        order = orders[split][bounds[split][unit]:bounds[split][unit + 1]]
        yield split, unit, order, splits[split].reorder(order)


def _unit_generator(seed: int, unit: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Sampling is seeded per unit, so a resumed or repaired unit draws exactly what a clean run drew (on
    the same kind of device: the draws are made where the logits are)."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, unit]).generate_state(1)[0]))


def _teacher_pass(writer: CacheWriter, teacher, bank, layers, splits, logit_spec: LogitSpec | None, batch_size: int,
                  units: list[tuple[str, int]], stored: dict[str, StoredSource] | None = None,
                  writer_kind: str = "auto") -> None:
    """Compute `units` ((split, unit) pairs) and hand each to the writer; states and logit rows are
    stored for the training split only, per-token logits (token classification, question answering) for
    every split. The splits in `stored` are read from Stage I's stored states and outputs, the others run
    through the teacher. Without int8 channel scales yet, the first training unit sets them (see _prepare)."""
    stored = stored or {}
    meta = writer.metadata
    device = input_device(teacher)
    output_key = "logits" if logit_spec is None else "nll"
    per_token = TASK[meta.task].per_token
    sampled = logit_spec is not None and logit_spec.kind != "hidden"
    bounds = {split: writer.unit_bounds(split) for split in splits}
    # The teacher computes unit u+1 while the background writer pads, compresses, writes and checksums unit u.
    bar = tqdm(total=len(units), desc="teacher pass (units)", leave=False, disable=None)
    if writer_kind == "auto":
        writer_kind = "process" if device.type == "cuda" else "thread"
    copies = HostCopies(device)
    with BackgroundWriter(writer, writer_kind) as background:
        def hand_over(split, unit, outputs, rows, encoded):
            background.write(split, unit, {} if per_token else {output_key: outputs.tolist()}, encoded, rows,
                             outputs if per_token else None)
            bar.update(1)

        for split, unit, order, part in stored_units(splits, bounds, meta.seed, units):
            train = split == "train"
            states = {key: UnitStates(meta.precision, writer.channel_scales.get(key), device)
                      for key in writer.state_keys} if train else None
            generator = _unit_generator(meta.seed, unit, device) if train and sampled else None
            store = stored[split].store.take(stored[split], order) if split in stored else None
            outputs, rows = _run_unit(teacher, bank, layers, part, meta.pad_token_id, batch_size, logit_spec,
                                      states, generator, per_token, store)
            if states and writer.needs_channel_scales():
                writer.calibrate({key: s.float_states() for key, s in states.items()})
            encoded = {key: s.finish(writer.channel_scales.get(key)) for key, s in states.items()} if train else None
            for landed in copies.push((split, unit, outputs, rows, encoded)):
                hand_over(*landed)
        for landed in copies.drain():
            hand_over(*landed)
        background.close()
    bar.close()
