"""`tedcache distill`: TED's Stage II (and the KD / LWD / fine-tuning baselines) against a cache.

The teacher is not loaded: targets come from the cache, or, in online mode, from tedcache.teacher's
LiveTargets, which computes them with the function the extraction used."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, replace
from importlib.metadata import version
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .cache import Cache, Location, ReaderLease, verify
from .cache.claims import removed_error, removed_while_read
from .cache.object_store import count_retries, retried_requests, store_errors
from .config import DEFAULT_CACHE_DIR, DistillConfig, what_it_computes
from .distill_report import run_report
from .distill_run import DistillRun
from .distributed import processes, reset_peak_memory
from .errors import TedcacheError, note
from .evaluate import evaluate, task_validation
from .filters import FilterBank, FilterSpec
from .layer_maps import describe_map, map_layers, map_rule
from .loop import ADAMW_KERNEL, Checkpoint, Phase, Runtime, fit
from .losses import Stage2Loss
from .models import load_for_task, load_tokenizer, vocab_hash, weights_hash
from .reader import CacheBatches, CacheSource, iterate_batches, num_batches
from .run_folder import save_run
from .schema import check_choices
from .stage1 import FilterTraining, describe_filters, keep_filters, stored_filters, train_filters
from .stage2 import PROBE_EVERY, effective_weights, kd_temperature, stage2_loss, stage2_step
from .state_store import in_order, stored_source
from .students import copied_from
from .taps import hidden_size, num_layers, parse_layers
from .tasks import PRIMARY_METRIC, TASK
from .teacher import LiveTargets

REMOTE_READ_AHEAD = 4  # windows in flight from an object store (see DistillConfig.read_ahead)
# students' Stage I filters kept for reuse (DistillConfig.reuse_stage1)
STAGE1_STORE = Path(os.environ.get("TEDCACHE_STAGE1_STORE", DEFAULT_CACHE_DIR / "student-filters"))


def _read_ahead(cfg: DistillConfig) -> int:
    if cfg.read_ahead is not None:
        return cfg.read_ahead
    return 0 if Location(cfg.cache).local else REMOTE_READ_AHEAD


def distill(cfg: DistillConfig, log=None, on_eval=None, score_test: bool = True, keep_model: bool = True) -> dict:
    """Train `cfg.student` against `cfg.cache` with `cfg.method`; save the best epoch to `cfg.out`.
    `on_eval(metrics)` is called after every validation (tune reports to Optuna there, and may raise to
    stop the run); with score_test=False the test split is not read at all, and with keep_model=False
    only metrics.json and config.yaml are saved."""
    location = Location(cfg.cache)
    remote = not location.local
    if remote:
        count_retries()
    run = None
    with store_errors(cfg.cache), ReaderLease(location, f"distill --method {cfg.method}"):
        try:
            run = set_up(cfg, log)
            phases = before_stage2(run)
            result = train(run, on_eval)
            report, test_outputs = run_report(run, result, phases, score_test)
        except Exception as exc:
            if run is not None and removed_while_read(location):
                raise removed_error(location.url, run.checkpoint.folder) from exc
            raise
    # under FSDP the student's whole state is gathered to the main process (a collective), which saves it
    weights = run.procs.state_of(run.student) if keep_model and run.procs.sharding else None
    if run.procs.main:  # the student is saved once
        save_run(run.student if keep_model else None, run.tokenizer, run.cfg.out, report, run.as_given, test_outputs,
                 weights)
        run.checkpoint.remove()
    run.procs.barrier()
    metric, best = PRIMARY_METRIC[run.task], report["best"] or {}
    run.log(f"{run.cfg.method}: best eval {metric} {best.get(metric, float('nan')):.4f}"
            + (f", test {report['test'][metric]:.4f}" if "test" in report else "")
            + f" ({report['seconds']:.0f}s); saved to {run.cfg.out}"
            + (f"; {retried_requests()} object-store requests retried" if remote else ""))
    return report


def set_up(cfg: DistillConfig, log=None) -> DistillRun:
    """Check the cache and the student against each other, load the student, map its layers and build its
    loss; nothing trains yet."""
    procs = processes().with_fsdp() if cfg.fsdp else processes()
    log = (log or note) if procs.main else (lambda *_: None)
    if cfg.fsdp and procs.size == 1:
        log("--fsdp in one process: nothing to shard over, the student trains as usual")
    check_choices(cfg)
    requested, as_given = asdict(cfg), cfg
    cfg = effective_weights(cfg)
    checkpoint = _checkpoint(cfg, requested, procs.size)
    if checkpoint.anything_saved():
        log(f"resuming the interrupted run saved in {checkpoint.folder}")
    elif cfg.resume:
        log(f"--resume: {checkpoint.folder} holds no checkpoint yet, so the run starts from the beginning")
    started = time.perf_counter()
    cache = Cache(cfg.cache)
    meta = cache.metadata
    if cfg.verify:
        problems = verify(cfg.cache)
        if problems:
            raise TedcacheError(f"cache {cfg.cache} failed verification ({len(problems)} problems, first: "
                                f"{problems[0]}); run tedcache verify {cfg.cache} --repair, then the extract command")
    tokenizer = load_tokenizer(cfg.student, "student", cfg.trust_remote_code)
    if vocab_hash(tokenizer) != meta.tokenizer_vocab_sha256:
        raise TedcacheError(f"the student's tokenizer vocabulary differs from the cache's ({meta.tokenizer}); "
                            "use a student with the teacher's tokenizer, or extract a cache with a matching teacher")
    device = procs.device(cfg.device)
    autocast = cfg.train_precision == "bf16-mixed" or (cfg.train_precision == "auto" and device.type == "cuda")
    torch.manual_seed(cfg.seed)  # a fresh head and the student's filters start from this seed
    student = load_for_task(cfg.student, "student", meta.task, meta.label_names,
                            trust_remote_code=cfg.trust_remote_code).to(device)
    cfg = replace(cfg, temperature=kd_temperature(cfg, meta))
    bank, teacher_layers, rule = _student_filters(cfg, cache, student, log)
    if cfg.layer_map == "auto":  # resolved: the report names the rule the run used
        cfg = replace(cfg, layer_map=rule)
    loss = stage2_loss(cfg, cache, student, bank, teacher_layers).to(device)
    return DistillRun(cfg, as_given, requested, procs, log, cache, tokenizer, student, loss, teacher_layers, device,
                      autocast, checkpoint, started, {"set_up": time.perf_counter() - started, "validation": 0.0})


def _student_filters(cfg: DistillConfig, cache: Cache, student, log) -> tuple[FilterBank | None, list[int], str]:
    """ted, lwd: the student's filters on the mapped student layers, the teacher layers they pair with, and
    the map's rule (--layer-map auto resolved)."""
    meta = cache.metadata
    if cfg.method not in ("ted", "lwd"):
        return None, [], cfg.layer_map
    needed = "filtered" if cfg.method == "ted" else "raw"
    if meta.states != needed:
        raise TedcacheError(f"--method {cfg.method} needs a cache of {needed} teacher states, {cfg.cache} holds "
                            f"{meta.states} ones; extract one with --states {needed}")
    total, origin = num_layers(student), copied_from(student)
    requested = parse_layers(cfg.student_layers, total)
    rule = map_rule(cfg.layer_map, requested, cache.layers, origin, meta.teacher_num_layers)
    student_layers, teacher_layers = map_layers(requested, cache.layers, rule if cfg.layer_map == "auto" else cfg.layer_map,
                                                total, origin, meta.teacher_num_layers)
    bank = FilterBank(FilterSpec(student_layers, hidden_size(student), meta.filter_dim, meta.filter_kind or "linear"))
    log(describe_map(cfg.layer_map, rule, requested, dict(zip(student_layers, teacher_layers)), origin))
    return bank.to(next(student.parameters()).device), teacher_layers, rule


def before_stage2(run: DistillRun) -> dict:
    """What trains before Stage II: --finetune-first's plain fine-tuning, and TED's Stage I of the
    student's filters (the student frozen). Returns each phase's fit result."""
    cfg, student, phases = run.cfg, run.student, {}
    labels_only = CacheSource(run.cache.split("train"))
    pad_id = run.meta.pad_token_id
    if cfg.method == "ted" and cfg.finetune_first > 0:
        ft_cfg = replace(cfg.optim, epochs=cfg.finetune_first)
        task_only = Stage2Loss(run.task, "finetune").to(run.device)
        phases["finetune_first"] = fit(
            Phase([student], lambda e: iterate_batches(labels_only, ft_cfg.batch_size, pad_id, True, cfg.seed, e),
                  num_batches(labels_only, ft_cfg.batch_size), lambda b: stage2_step(student, task_only, b),
                  ft_cfg, "fine-tune student first"),
            Runtime(device=run.device, autocast=run.autocast))
    if cfg.method == "ted":
        phases["stage1"] = _student_stage1(run, labels_only)
        run.log(describe_filters(phases["stage1"]["filters"]))
        student.requires_grad_(True)
    return phases


def _student_stage1(run: DistillRun, labels_only: CacheSource) -> dict:
    """TED's Stage I of the student's filters, the student frozen; with reuse_stage1, the filters an earlier
    run with the same key trained (the student's and filters' initial weights, the cache, the Stage I
    settings, the seed and the processes decide them), loaded instead of trained again."""
    cfg, student, bank, pad_id = run.cfg, run.student, run.loss.filters, run.meta.pad_token_id
    started = time.perf_counter()
    # the student's configuration too: two students with one set of weights may differ in dropout, which Stage I's
    # heads take from it
    key = hashlib.sha256(json.dumps({
        "student": weights_hash(student), "config": student.config.to_dict(), "filters": weights_hash(bank),
        "student_layers": bank.spec.layers, "teacher_layers": run.teacher_layers, "cache": run.meta.content_key,
        "stage1": asdict(cfg.stage1), "states": cfg.stage1_states, "seed": cfg.seed, "processes": run.procs.size,
        "tedcache": version("tedcache"), "adamw": ADAMW_KERNEL}, sort_keys=True, default=str).encode()).hexdigest()[:24]
    kept = stored_filters(STAGE1_STORE, key, bank) if cfg.reuse_stage1 else None
    if kept is not None:
        run.log(f"stage I (student filters): the filters an earlier run trained with the same key ({key}), reused")
        student.train()  # where Stage I leaves it
        return {**kept, "seconds": time.perf_counter() - started, "trained_seconds": kept["seconds"], "reused": key}
    eval_split = run.cache.split("eval")
    source, evaluation = labels_only, CacheSource(eval_split) if eval_split is not None else None
    if cfg.stage1_states == "stored":
        source, evaluation = (s if s is None else stored_source(student, s, bank.spec.layers, run.task,
                                                               in_order(s, cfg.stage1.batch_size, pad_id))
                              for s in (source, evaluation))
    training = FilterTraining(run.task, run.meta.num_outputs, cfg.stage1, pad_id, cfg.seed, run.meta.lm_head or "tied",
                              "stage I (student filters)")
    result = train_filters(student, bank, source, training, evaluation, checkpoint=run.checkpoint.part("stage1"))
    if cfg.reuse_stage1 and run.procs.main:
        keep_filters(STAGE1_STORE, key, bank, result)
    return result


def train(run: DistillRun, on_eval=None) -> dict:
    """Stage II: the student (and its filters) against the cache's targets, or online mode's live ones,
    validated on the cache's eval split; returns fit's result."""
    cfg, procs, student, task = run.cfg, run.procs, run.student, run.task
    live = LiveTargets(cfg.teacher, run.cache, run.teacher_layers, run.device, cfg.seed) if cfg.teacher else None
    # online mode: the same reader, windows and order, with the targets' reads replaced by `live`
    loader = train_loader(run, cfg.optim.batch_size, cfg.workers, read_targets=live is None)

    def epoch_batches(epoch: int):
        loader.set_epoch(epoch)
        return loader

    eval_split = run.cache.split("eval")

    def validate() -> dict:
        started = time.perf_counter()
        result = evaluate(student, iterate_batches(CacheSource(eval_split), 64, run.meta.pad_token_id), task, procs,
                          run.meta.label_names, eval_split.questions)
        run.seconds["validation"] += time.perf_counter() - started
        if on_eval is not None:
            on_eval(result)
        return result

    modules = [student] + ([run.loss.filters] if run.loss.filters is not None else [])
    # the ratio of one step's gradients: not of a micro-batch's (accumulation), nor inside DDP (untried)
    probe_every = cfg.log_every * PROBE_EVERY if procs.size == 1 and cfg.optim.grad_accum == 1 else 0

    def loss_fn(batch):
        probe = bool(probe_every) and batch["step"] % probe_every == 0
        return stage2_step(student, run.loss, live(batch) if live else batch, probe)

    procs.seed(cfg.seed)  # Stage II's dropout does not depend on what ran before it
    reset_peak_memory(run.device)
    per_epoch = num_batches(CacheSource(run.cache.split("train")), cfg.optim.batch_size, procs.size, cfg.shard_reads,
                            cfg.workers)
    return fit(Phase(modules, epoch_batches, per_epoch, loss_fn, cfg.optim,
                     f"stage II ({cfg.method}{', online' if live else ''})"),
               Runtime(task_validation(validate, task, cfg.eval_every) if eval_split is not None else None,
                       cfg.max_steps, cfg.log_every, run.device, run.autocast, procs, run.checkpoint))


class EpochLoader(DataLoader):
    """A DataLoader over CacheBatches that passes the epoch on (each epoch its own order)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def train_loader(run: DistillRun, batch_size: int, workers: int = 0, read_targets: bool = True) -> EpochLoader:
    """Stage II's training batches: the cache's windows in the run's seeded order, this process's part."""
    cfg = run.cfg
    batches = CacheBatches(cfg.cache, "train", run.teacher_layers, batch_size, shuffle=True, seed=cfg.seed,
                           with_logits=TASK[run.task].causal and cfg.kl_alpha > 0,
                           process=(run.procs.rank, run.procs.size), shard_reads=cfg.shard_reads,
                           read_ahead=_read_ahead(cfg), read_targets=read_targets)
    # its own generator: iterating a DataLoader draws a seed, which must not come from the global RNG
    return EpochLoader(batches, batch_size=None, num_workers=workers, generator=torch.Generator().manual_seed(cfg.seed))


def _checkpoint(cfg: DistillConfig, requested: dict, num_processes: int) -> Checkpoint:
    """Where this run saves its state (<out>.checkpoint); refuses to start over an unfinished run's state
    unless told to resume it."""
    folder = Path(f"{cfg.out.rstrip('/')}.checkpoint")
    fingerprint = {**what_it_computes(requested), "processes": num_processes}
    checkpoint = Checkpoint(folder, fingerprint, cfg.checkpoint_every)
    if checkpoint.anything_saved() and not cfg.resume:
        raise TedcacheError(f"{folder} holds the checkpoint of an interrupted run; add --resume to continue it, "
                            "or delete that folder to start over")
    return checkpoint


