"""`tedcache extract`: Stage I on the teacher, then one frozen-teacher pass whose targets are handed to
the cache writer, unit by unit.

Killing an extraction at any moment and running the same command again resumes it: the Stage-I
filters, the token arrays and every finished unit are kept, and only the missing units are computed."""

from __future__ import annotations

import shutil
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from .cache import CacheLock, CacheMetadata, CacheWriter, load_metadata
from .cache.codecs import planned_bytes
from .cache.object_store import count_retries, retried_requests, store_errors
from .cache.read import read_filter_files
from .config import ExtractConfig
from .distributed import processes
from .errors import TedcacheError, environment_error, note, size_text
from .extract_run import ExtractRun, set_up
from .filters import FilterBank
from .new_cache import cache_metadata, create_cache
from .schema import check_choices
from .tasks import TASK
from .teacher_filters import stage1_checkpoint, train_teacher_filters
from .teacher_pass import teacher_pass


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
    run = set_up(cfg, procs, log)
    location = run.location
    planned = _planned_bytes(run)
    if not location.local:
        count_retries()
    with store_errors(location.url):
        if procs.main:
            location.check_bucket()
            _check_room(run, planned)
        try:
            return _extract_into(run)
        except OSError as exc:  # a full disk, a folder one may not write in: said as such
            refusal = environment_error(exc, location.url, planned - location.size() if location.local else None)
            if refusal is None:
                raise
            raise refusal from exc


def _extract_into(run: ExtractRun) -> str:
    """extract's writing part, under the cache's lock: Stage I, then every unit not yet written."""
    procs, location, log = run.procs, run.location, run.log
    lock = CacheLock(location, run.cfg.wait, log) if procs.main and run.cfg.lock else nullcontext()
    with lock:
        metadata = cache_metadata(run)
        found = _first_then_all(procs, lambda: _found(run, metadata))
        if found == "complete":
            return location.url
        bank, stage1_seconds, stored = None, 0.0, {}
        checkpoint = stage1_checkpoint(run, metadata)
        if found == "new" and run.filtered:
            stage1_started = time.perf_counter()
            if checkpoint.exists():
                log(f"stage I resumes from its checkpoint in {checkpoint.folder}")
            bank, measured, stored = train_teacher_filters(run, metadata, checkpoint)
            metadata = replace(metadata, stage1_filters=measured)
            stage1_seconds = time.perf_counter() - stage1_started
        plan = _first_then_all(procs, lambda: _prepare(run, metadata, found, bank, stored))
        if procs.main:  # the cache holds the filters now
            checkpoint.remove()
        pass_seconds = _write_units(run, plan, stored)
        if procs.main:
            _complete(run, stage1_seconds, pass_seconds)
        procs.barrier()
    if procs.main:  # (the size is read once the lock is gone, which the other processes must not race)
        train = run.splits["train"]
        log(f"cache complete in {time.perf_counter() - run.started:.0f}s (Stage I {stage1_seconds:.0f}s, teacher pass "
            f"{pass_seconds:.0f}s): {len(train)} examples, {train.num_tokens} tokens; targets: "
            f"{_targets(run.cfg, run.layers)}, {location.size() / 2**20:.1f} MiB"
            + (f", {procs.size} processes" if procs.size > 1 else "")
            + ("" if location.local else f"; {retried_requests()} object-store requests retried"))
    return location.url


def _write_units(run: ExtractRun, plan: dict, stored: dict) -> float:
    """This process's share of the units left (whole units: no shard has two writers) through the teacher
    pass, with the filters the cache holds; returns the pass's seconds (with the first unit's calibration)."""
    writer = CacheWriter(run.location)
    bank = FilterBank.from_bytes(read_filter_files(run.location)).to(run.device).eval() if run.filtered else None
    units = [(split, unit) for split, todo in plan["todo"].items() for unit in todo]
    started = time.perf_counter()
    teacher_pass(run, writer, bank, units[run.procs.rank::run.procs.size], stored)
    seconds = plan["calibration_s"] + time.perf_counter() - started
    run.procs.barrier()
    return seconds


def _complete(run: ExtractRun, stage1_seconds: float, pass_seconds: float) -> None:
    """Mark the cache complete once every unit has its record (the first process)."""
    writer = CacheWriter(run.location)
    missing = writer.missing_units()
    if any(missing.values()):
        raise TedcacheError(f"units {missing} have no record after the teacher pass; run the same "
                            "command again to compute them")
    writer.complete(timings={"total_s": time.perf_counter() - run.started, "stage1_s": stage1_seconds,
                             "teacher_pass_s": pass_seconds, "processes": run.procs.size})


def _planned_bytes(run: ExtractRun) -> int:
    """About what the cache will take on disk, uncompressed (cache.codecs.planned_bytes)."""
    splits, spec, logit_spec = run.splits, run.spec, run.logit_spec
    rows = None if logit_spec is None else ("hidden", spec.in_dim) if logit_spec.kind == "hidden" else \
        (logit_spec.kind, logit_spec.size)
    return planned_bytes(sum(ex.num_tokens for ex in splits.values()), sum(len(ex) for ex in splits.values()),
                         [spec.out_dim] * len(spec.layers), run.cfg.precision, rows, TASK[run.cfg.data.task].per_token)


def _check_room(run: ExtractRun, planned: int) -> None:
    """Log the cache's planned size; refuse at once where its disk has clearly too little room (less than half
    of what is still to write: the plan is uncompressed, and states compress little)."""
    location = run.location
    if not location.local:
        run.log(f"the cache will take up to about {size_text(planned)}")
        return
    folder = Path(location.root)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free, needed = shutil.disk_usage(existing).free, max(0, planned - location.size())
    run.log(f"the cache will take up to about {size_text(planned)} ({size_text(free)} free in {existing})")
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


def _found(run: ExtractRun, metadata: CacheMetadata) -> str:
    """What is at `location` (the first process looks, holding the lock): "complete" (reused), "resume"
    (inputs written from the same inputs) or "new" (nothing, something unreadable or other, or --force)."""
    location, cfg, log = run.location, run.cfg, run.log
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


def _prepare(run: ExtractRun, metadata: CacheMetadata, found: str, bank: FilterBank | None, stored: dict) -> dict:
    """The first process's part: open the cache to resume, or create it (with the Stage-I `bank`). With
    several processes, it also computes train unit 0, whose states set the int8 scales, so that every
    process encodes with the same scales (one process sets them in its teacher pass, where unit 0 comes
    first). Returns {"todo": units left, "calibration_s": seconds of that first unit's teacher pass}."""
    if found == "resume":
        writer = CacheWriter(run.location)
        if run.filtered:
            bank = FilterBank.from_bytes(read_filter_files(run.location)).to(run.device)
    else:
        writer = create_cache(run, metadata, bank)
    if bank is not None:
        bank.eval()
    calibration_started = time.perf_counter()
    if run.procs.size > 1 and writer.needs_channel_scales() and 0 not in writer.done_units("train"):
        teacher_pass(run, writer, bank, [("train", 0)], stored)
    calibration_s = time.perf_counter() - calibration_started
    todo = writer.missing_units()
    total, remaining = sum(writer.metadata.units.values()), sum(len(v) for v in todo.values())
    if found == "resume" and remaining < total:
        run.log(f"resuming: {total - remaining} of {total} units already written, {remaining} to go")
    return {"todo": todo, "calibration_s": calibration_s}
