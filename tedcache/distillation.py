"""`tedcache distill`: TED's Stage II (and the KD / LWD / fine-tuning baselines) against a cache.

The teacher is not loaded: targets come from the cache, or, in online mode, from tedcache.teacher's
LiveTargets, which computes them with the function the extraction used."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from .cache import Cache, CacheMetadata, Location, layout, verify
from .cache.object_store import count_retries, retried_requests, store_errors
from .config import DEFAULT_CACHE_DIR, DistillConfig, what_it_computes
from .distributed import Processes, peak_memory_mb, processes, reset_peak_memory
from .errors import TedcacheError, note
from .evaluate import evaluate, predictions, score, task_validation
from .filters import FilterBank, FilterSpec
from .layer_maps import LAYER_MAP_RULES, map_layers
from .loop import Checkpoint, Phase, Runtime, fit
from .losses import Stage2Loss, method_weights
from .models import load_for_task, load_tokenizer, vocab_hash, weights_hash
from .qa import answer_questions, best_span
from .reader import CacheBatches, CacheSource, iterate_batches, num_batches
from .run_folder import save_run
from .schema import check_choices
from .stage1 import FilterTraining, describe_filters, keep_filters, stored_filters, train_filters
from .state_store import in_order, stored_source
from .students import copied_from
from .taps import forward_with_taps, hidden_size, model_parts, num_layers, parse_layers
from .tasks import PRIMARY_METRIC, TASK
from .teacher import LiveTargets

REMOTE_READ_AHEAD = 4  # windows in flight from an object store (see DistillConfig.read_ahead)
# students' Stage I filters kept for reuse (DistillConfig.reuse_stage1)
STAGE1_STORE = Path(os.environ.get("TEDCACHE_STAGE1_STORE", DEFAULT_CACHE_DIR / "stage1"))


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


def _read_ahead(cfg: DistillConfig) -> int:
    if cfg.read_ahead is not None:
        return cfg.read_ahead
    return 0 if Location(cfg.cache).local else REMOTE_READ_AHEAD


@dataclass
class DistillRun:
    """What `distill` sets up before training: the resolved settings, the cache, the student and its loss."""

    cfg: DistillConfig  # with the method's weights and the KD temperature resolved
    as_given: DistillConfig  # saved as the run's config.yaml: what re-runs this command
    requested: dict
    procs: Processes
    log: Callable
    cache: Cache
    tokenizer: object
    student: torch.nn.Module
    loss: Stage2Loss
    teacher_layers: list[int]
    device: torch.device
    autocast: bool
    checkpoint: Checkpoint
    started: float
    seconds: dict = field(default_factory=dict)  # where the run's time went: set_up, validation, test

    @property
    def meta(self) -> CacheMetadata:
        return self.cache.metadata

    @property
    def task(self) -> str:
        return self.cache.metadata.task


def distill(cfg: DistillConfig, log=None, on_eval=None, score_test: bool = True, keep_model: bool = True) -> dict:
    """Train `cfg.student` against `cfg.cache` with `cfg.method`; save the best epoch to `cfg.out`.
    `on_eval(metrics)` is called after every validation (tune reports to Optuna there, and may raise to
    stop the run); with score_test=False the test split is not read at all, and with keep_model=False
    only metrics.json and config.yaml are saved."""
    remote = not Location(cfg.cache).local
    if remote:
        count_retries()
    with store_errors(cfg.cache):
        run = set_up(cfg, log)
        phases = before_stage2(run)
        result = train(run, on_eval)
        report, test_outputs = _report(run, result, phases, score_test)
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
    bank, teacher_layers = _student_filters(cfg, cache, student, log)
    loss = _stage2_loss(cfg, cache, student, bank, teacher_layers).to(device)
    return DistillRun(cfg, as_given, requested, procs, log, cache, tokenizer, student, loss, teacher_layers, device,
                      autocast, checkpoint, started, {"set_up": time.perf_counter() - started, "validation": 0.0})


def _student_filters(cfg: DistillConfig, cache: Cache, student, log) -> tuple[FilterBank | None, list[int]]:
    """ted, lwd: the student's filters on the mapped student layers, and the teacher layers they pair with."""
    meta = cache.metadata
    if cfg.method not in ("ted", "lwd"):
        return None, []
    needed = "filtered" if cfg.method == "ted" else "raw"
    if meta.states != needed:
        raise TedcacheError(f"--method {cfg.method} needs a cache of {needed} teacher states, {cfg.cache} holds "
                            f"{meta.states} ones; extract one with --states {needed}")
    total = num_layers(student)
    student_layers, teacher_layers = map_layers(parse_layers(cfg.student_layers, total), cache.layers, cfg.layer_map,
                                                total, copied_from(student), meta.teacher_num_layers)
    bank = FilterBank(FilterSpec(student_layers, hidden_size(student), meta.filter_dim, meta.filter_kind or "linear"))
    log(f"layer map (student -> teacher): {dict(zip(student_layers, teacher_layers))}")
    return bank.to(next(student.parameters()).device), teacher_layers


def _stage2_loss(cfg: DistillConfig, cache: Cache, student, bank: FilterBank | None,
                 teacher_layers: list[int]) -> Stage2Loss:
    meta = cache.metadata
    form = kd_form(cfg, meta) if TASK[meta.task].causal else "logits"
    return Stage2Loss(meta.task, cfg.method, cfg.kl_alpha, cfg.mse_alpha, cfg.temperature, bank,
                      _state_variance(cfg, meta, teacher_layers) if bank is not None else None, form,
                      _student_width(student, meta) if TASK[meta.task].causal else None,
                      cache.teacher_head() if form == "hidden" else None, from_head=not cfg.whole_logits)


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
    key = hashlib.sha256(json.dumps({
        "student": weights_hash(student), "filters": weights_hash(bank), "cache": run.meta.content_key,
        "stage1": asdict(cfg.stage1), "states": cfg.stage1_states, "seed": cfg.seed, "processes": run.procs.size,
        "teacher_layers": run.teacher_layers}, sort_keys=True).encode()).hexdigest()[:24]
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


def _report(run: DistillRun, result: dict, phases: dict, score_test: bool) -> tuple[dict, dict | None]:
    """metrics.json's content (the settings, the training history, validation, and the test split scored
    once) and the test outputs (saved beside it; None without a test split)."""
    cfg, task, meta, bank = run.cfg, run.task, run.meta, run.loss.filters
    eval_split = run.cache.split("eval")
    test_split = run.cache.split("test") if score_test else None
    report = {
        "method": cfg.method, "config": asdict(cfg), "requested": run.requested, "cache": str(run.cache.path),
        # which cache exactly (its content key), what it was made from (its recipe key), and by which teacher bits
        "cache_identity": meta.content_key, "cache_recipe": meta.recipe_key, "teacher_weights": meta.teacher_weights_sha256,
        "cache_bytes": run.cache.bytes_on_disk(), "task": task, "label_names": meta.label_names,
        "kd_targets": run.loss.kd_form if TASK[task].causal else None,
        "layer_map": dict(zip(bank.spec.layers, run.teacher_layers)) if bank is not None else None,
        "layer_map_rule": (cfg.layer_map if cfg.layer_map in LAYER_MAP_RULES or cfg.layer_map.startswith("last:")
                           else "explicit") if bank is not None else None,
        "history": result["history"], "eval": result["evals"], "best": result["best"],
        "phases": {k: {"history": v["history"], "seconds": v["seconds"],
                       **{part: v[part] for part in ("filters", "reused", "trained_seconds") if part in v}}
                   for k, v in phases.items()},
        "teacher": {name: score(teacher_outputs(split, task), task, meta.label_names)
                    for name, split in (("eval", eval_split), ("test", test_split)) if split is not None},
        "stage2_seconds": result["seconds"], "stage2_median_step_s": result["median_step_s"],
        "stage2_data_wait_share": result["data_wait_share"],
        # a GPU's peak allocation in Stage II; on a CPU the process's peak resident memory
        "stage2_peak_memory_mb": peak_memory_mb(run.device),
        "stage2_peak_memory_mb_per_process": run.procs.gather(peak_memory_mb(run.device)),
    }
    test_outputs = None
    if test_split is not None:
        started = time.perf_counter()
        test_outputs = predictions(run.student, iterate_batches(CacheSource(test_split), 64, meta.pad_token_id), task,
                                   run.procs, test_split.questions)
        report["test"] = score(test_outputs, task, meta.label_names)
        run.seconds["test"] = time.perf_counter() - started
    report["seconds"] = time.perf_counter() - run.started
    report["seconds_by_part"] = {**run.seconds, **{k: v["seconds"] for k, v in phases.items()},
                                 "stage2_without_validation": result["seconds"] - run.seconds["validation"]}
    report["processes"] = run.procs.size
    return report, test_outputs


def _state_variance(cfg: DistillConfig, meta: CacheMetadata, teacher_layers: list[int]) -> torch.Tensor | None:
    """--mse-norm variance: the cached variance of each mapped teacher layer's states."""
    if cfg.mse_norm == "none":
        return None
    if not meta.state_variance:
        raise TedcacheError(f"--mse-norm variance needs the teacher-state variances that caches record; {cfg.cache} "
                            "was written before they were: rebuild it with tedcache extract --force, or use "
                            "--mse-norm none")
    return torch.tensor([meta.state_variance[str(layer)] for layer in teacher_layers], dtype=torch.float32)


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


def teacher_outputs(split, task: str) -> dict[str, np.ndarray]:
    """The teacher's outputs on a cached split, from what the extraction stored (no teacher needed), in the
    form `evaluate.predictions` gives a student's: `evaluate.score` scores both."""
    if TASK[task].causal:
        return {"values": split.teacher_nll}
    if TASK[task].per_token:
        tokens = np.concatenate([np.arange(a, a + n) for a, n in zip(split.starts, split.lengths)])
        logits = split.tokens(layout.TOKEN_LOGITS, 0, int(tokens[-1]) + 1)[tokens]
        if task == "question-answering":
            cuts = np.cumsum(split.lengths)[:-1]
            spans = split.tokens(layout.CONTEXT_SPANS, 0, int(tokens[-1]) + 1)[tokens]
            windows = [best_span(x, y) for x, y in zip(np.split(logits, cuts), np.split(spans, cuts))]
            return answer_questions(np.asarray(windows), split.question_index, split.questions)
        example = np.repeat(np.arange(len(split)), split.lengths)
        tags = split.tokens(layout.TOKEN_LABELS, 0, int(tokens[-1]) + 1)[tokens]
        tagged = tags >= 0
        return {"values": logits.argmax(-1)[tagged], "labels": tags[tagged].astype(np.int64), "example": example[tagged]}
    return {"values": split.teacher_logits, "labels": split.labels}
