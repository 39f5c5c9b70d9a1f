"""`tedcache distill`: TED's Stage II (and the KD / LWD / fine-tuning baselines) against a cache.

The teacher is not loaded: targets come from the cache, or, in online mode, from tedcache.teacher's
LiveTargets, which computes them with the function the extraction used."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .cache import Cache, CacheMetadata, Location, layout, verify
from .config import DistillConfig, what_it_computes
from .data import IGNORED
from .distributed import processes
from .errors import TedcacheError, note
from .evaluate import PRIMARY_METRIC, evaluate, metrics, perplexity_from_nll, predictions, score, token_metrics
from .filters import FilterBank, FilterSpec
from .loop import COUNT_KINDS, Checkpoint, fit
from .losses import (
    filtered_mse,
    hidden_kd_loss,
    kd_loss,
    kd_targets,
    lm_loss,
    span_kd_loss,
    sparse_kd_loss,
    task_loss,
)
from .models import copied_from, load_for_task, load_tokenizer, vocab_hash
from .qa import answer_questions, best_span, squad_metrics
from .reader import CacheBatches, CacheSource, iterate_batches, num_batches
from .run_folder import save_run
from .schema import check_choices
from .stage1 import describe_filters, train_filters
from .taps import forward_with_taps, hidden_size, model_parts, num_layers, parse_layers
from .teacher import LiveTargets

LAYER_MAP_RULES = ("interval", "copy")
REMOTE_READ_AHEAD = 4  # windows in flight from an object store (see DistillConfig.read_ahead)


def map_layers(student_layers: list[int], cache_layers: list[int], layer_map: str, student_total: int,
               copied_from: list[int] | None = None, teacher_total: int | None = None) -> tuple[list[int], list[int]]:
    """Pair student layers with cached teacher layers; returns (student_layers, teacher_layers).

    "interval" (TED's rule applied to the cache): with m student layers and K cached layers, K a multiple
    of m, student layer j is paired with cached layer (j+1)*K/m - 1 (every (K/m)-th, ending at the last).
    "copy", for a student made by init-student (`copied_from[j]`: the teacher layer student layer j
    copies): student layer j is paired with the teacher layer whose output the next copied layer was
    trained to read (copied_from[j+1] - 1), the last student layer with the teacher's last layer.
    Anything else is an explicit map "s:t,s:t" of 0-based student and teacher layers."""
    if layer_map == "copy":
        if not copied_from or teacher_total is None:
            raise TedcacheError("--layer-map copy needs a student made by tedcache init-student (its config records "
                                "which teacher layer each layer copies); use --layer-map interval or explicit pairs")
        wanted = [copied_from[j + 1] - 1 if j + 1 < len(copied_from) else teacher_total - 1 for j in student_layers]
        missing = sorted(set(wanted) - set(cache_layers))
        if missing:
            raise TedcacheError(f"--layer-map copy pairs student layers {student_layers} with teacher layers {wanted}; "
                                f"the cache holds {cache_layers}: extract one with --layers "
                                f"{','.join(map(str, sorted(set(wanted) | set(cache_layers))))}")
        return student_layers, wanted
    if layer_map != "interval":
        try:
            pairs = [tuple(int(x) for x in item.split(":")) for item in layer_map.split(",") if item.strip()]
        except ValueError:
            pairs = []
        if not pairs or any(len(p) != 2 for p in pairs) or len({s for s, _ in pairs}) != len(pairs):
            raise TedcacheError(f"--layer-map '{layer_map}' is not interval, copy or a list like 0:2,1:5 "
                                "(distinct student layer:teacher layer pairs)")
        bad = [f"{s}:{t}" for s, t in pairs if not 0 <= s < student_total or t not in cache_layers]
        if bad:
            raise TedcacheError(f"--layer-map pairs {bad} do not fit: student layers are 0..{student_total - 1}, "
                                f"cached teacher layers are {cache_layers}")
        return [s for s, _ in pairs], [t for _, t in pairs]
    m, k = len(student_layers), len(cache_layers)
    if m > k or k % m:
        raise TedcacheError(f"cannot map {m} student layers {student_layers} onto the cache's {k} layers "
                            f"{cache_layers}; choose --student-layers so their count divides {k}, "
                            "or give --layer-map copy or s:t,...")
    step = k // m
    return student_layers, [cache_layers[(j + 1) * step - 1] for j in range(m)]


PROBE_EVERY = 5  # logged steps between gradient-ratio probes


def stage2_loss(student, bank: FilterBank | None, batch: dict, cfg: DistillConfig, task: str, kd_form: str = "logits",
                state_variance: torch.Tensor | None = None, probe: bool = False, vocab: int | None = None,
                head: dict | None = None):
    """L = task + kl_alpha * T^2 * KL(teacher || student) + mse_alpha * mean-over-layers filtered MSE.
    batch carries the targets: teacher_logits (B, C) or, causal-lm, teacher_rows (sparse per-token
    distributions, used in `kd_form`) or teacher_hidden (kd_form "hidden": the full distribution rebuilt
    with the teacher's output layer `head`), and teacher_states, one CompactStates (B, L, d_f) per mapped
    layer (cached or live). For LWD `bank` holds the student's projections and the states are raw.
    causal-lm: the task term is the next-token loss and KL and MSE cover every real position.
    With `state_variance` (one per mapped layer) each layer's MSE is divided by it. With `probe`, the
    terms also carry grad_ratio: |grad of mse_alpha * MSE| / |grad of kl_alpha * KL| on the student's
    backbone (its weights less the task head). causal-lm KD compares over the first `vocab` ids only
    (the tokenizer's: padded output rows are left out)."""
    layers = bank.spec.layers if bank is not None else []
    logits, hidden = forward_with_taps(student, batch, layers)
    mask = batch["attention_mask"]
    lm = task == "causal-lm"
    share = batch.get("share") or {}  # see loop.batch_shares: 1 for a single process without accumulation
    per_example, per_token, per_pair = (share.get(k, 1.0) for k in COUNT_KINDS)
    terms = {"task": lm_loss(logits, batch["input_ids"], mask) * per_pair if lm
             else task_loss(logits, batch["labels"], task) * per_example}
    loss = terms["task"]
    if cfg.kl_alpha > 0:
        if lm and kd_form == "hidden":
            terms["kl"] = hidden_kd_loss(logits[..., :vocab], batch["teacher_hidden"].widen(), head, cfg.temperature,
                                         mask) * per_token
        elif lm:
            rows = batch["teacher_rows"]
            targets = kd_targets(rows, kd_form, cfg.temperature)
            terms["kl"] = sparse_kd_loss(logits[..., :vocab], rows["ids"].long(), targets, cfg.temperature,
                                         mask) * per_token
        elif task == "token-classification":  # per word (its first sub-token), tagged or not
            words = batch["labels"] != IGNORED
            terms["kl"] = kd_loss(logits[words], batch["teacher_logits"][words], cfg.temperature) * per_example
        elif task == "question-answering":  # over the window's tokens, start and end averaged
            terms["kl"] = span_kd_loss(logits, batch["teacher_logits"], mask, cfg.temperature) * per_example
        else:
            terms["kl"] = kd_loss(logits, batch["teacher_logits"], cfg.temperature) * per_example
        loss = loss + cfg.kl_alpha * terms["kl"]
    if bank is not None and cfg.mse_alpha > 0:
        targets = [s.widen() for s in batch["teacher_states"]]  # compact on the wire, fp32 only here
        per_layer = filtered_mse(bank(hidden), targets, mask) * per_token
        if state_variance is not None:
            per_layer = per_layer / state_variance.to(per_layer.device)
        terms["mse"] = per_layer.mean()
        terms.update({f"mse/{layer}": value for layer, value in zip(layers, per_layer)})  # for the report's curves
        loss = loss + cfg.mse_alpha * terms["mse"]
    if probe and "mse" in terms and "kl" in terms:
        terms["grad_ratio"] = _gradient_ratio(student, cfg.mse_alpha * terms["mse"], cfg.kl_alpha * terms["kl"])
    return loss, {k: v.detach() for k, v in terms.items()}


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
    """The baselines run the same loop with terms switched off (KD: no state term; fine-tuning: neither)."""
    if cfg.method == "kd":
        return replace(cfg, mse_alpha=0.0)
    if cfg.method == "finetune":
        return replace(cfg, mse_alpha=0.0, kl_alpha=0.0)
    return cfg


def _read_ahead(cfg: DistillConfig) -> int:
    if cfg.read_ahead is not None:
        return cfg.read_ahead
    return 0 if Location(cfg.cache).local else REMOTE_READ_AHEAD


def distill(cfg: DistillConfig, log=None, on_eval=None, score_test: bool = True, keep_model: bool = True) -> dict:
    """Train `cfg.student` against `cfg.cache` with `cfg.method`; save the best epoch to `cfg.out`.
    `on_eval(metrics)` is called after every validation (tune reports to Optuna there, and may raise to
    stop the run); with score_test=False the test split is not read at all, and with keep_model=False
    only metrics.json and config.yaml are saved."""
    procs = processes()
    log = (log or note) if procs.main else (lambda *_: None)
    check_choices(cfg)
    requested = asdict(cfg)
    as_given = cfg  # saved as the run's config.yaml: what re-runs this command
    cfg = effective_weights(cfg)
    checkpoint = _checkpoint(cfg, requested, procs.size)
    if checkpoint.exists():
        log(f"resuming the interrupted run saved in {checkpoint.folder}")
    started = time.perf_counter()
    cache = Cache(cfg.cache)
    meta = cache.metadata
    if cfg.verify:
        problems = verify(cfg.cache)
        if problems:
            raise TedcacheError(f"cache {cfg.cache} failed verification ({len(problems)} problems, first: "
                                f"{problems[0]}); run tedcache verify {cfg.cache} --repair, then the extract command")
    task = meta.task
    tokenizer = load_tokenizer(cfg.student, "student", cfg.trust_remote_code)
    if vocab_hash(tokenizer) != meta.tokenizer_vocab_sha256:
        raise TedcacheError(f"the student's tokenizer vocabulary differs from the cache's ({meta.tokenizer}); "
                            "use a student with the teacher's tokenizer, or extract a cache with a matching teacher")
    device = procs.device(cfg.device)
    autocast = device.type == "cuda" if cfg.autocast is None else cfg.autocast
    torch.manual_seed(cfg.seed)  # a fresh head and the student's filters start from this seed
    student = load_for_task(cfg.student, "student", task, meta.label_names,
                            trust_remote_code=cfg.trust_remote_code).to(device)
    form = kd_form(cfg, meta) if task == "causal-lm" else None
    vocab = _student_width(student, meta) if task == "causal-lm" else None
    head = {k: v.to(device, torch.float32) for k, v in cache.teacher_head().items()} if form == "hidden" else None
    cfg = replace(cfg, temperature=kd_temperature(cfg, meta))
    bank, teacher_layers = None, []
    if cfg.method in ("ted", "lwd"):
        needed = "filtered" if cfg.method == "ted" else "raw"
        if meta.states != needed:
            raise TedcacheError(f"--method {cfg.method} needs a cache of {needed} teacher states, {cfg.cache} holds "
                                f"{meta.states} ones; extract one with --states {needed}")
        total = num_layers(student)
        student_layers, teacher_layers = map_layers(parse_layers(cfg.student_layers, total), cache.layers,
                                                    cfg.layer_map, total, copied_from(student),
                                                    meta.teacher_num_layers)
        bank = FilterBank(FilterSpec(student_layers, hidden_size(student), meta.filter_dim,
                                     meta.filter_kind or "linear")).to(device)
        log(f"layer map (student -> teacher): {dict(zip(student_layers, teacher_layers))}")
    train_split, eval_split = cache.split("train"), cache.split("eval")
    test_split = cache.split("test") if score_test else None
    pad_id = meta.pad_token_id
    phases = {}

    labels_only = CacheSource(train_split)
    if cfg.method == "ted" and cfg.finetune_first > 0:
        ft_cfg = replace(cfg.optim, epochs=cfg.finetune_first)
        phases["finetune_first"] = fit(
            list(student.parameters()), [student],
            lambda e: iterate_batches(labels_only, ft_cfg.batch_size, pad_id, True, cfg.seed, e),
            num_batches(labels_only, ft_cfg.batch_size),
            lambda b: stage2_loss(student, None, b, replace(cfg, kl_alpha=0.0), task),
            ft_cfg, "fine-tune student first", device=device, autocast=autocast)
    if cfg.method == "ted":
        phases["stage1"] = train_filters(student, bank, labels_only, task, meta.num_outputs, cfg.stage1, pad_id,
                                         cfg.seed, desc="stage I (student filters)", lm_head=meta.lm_head or "tied",
                                         eval_source=CacheSource(eval_split) if eval_split is not None else None)
        log(describe_filters(phases["stage1"]["filters"]))
        student.requires_grad_(True)

    live = LiveTargets(cfg.teacher, cache, teacher_layers, device, cfg.seed) if cfg.teacher else None
    # online mode: the same reader, windows and order, with the targets' reads replaced by `live`
    batches = CacheBatches(cfg.cache, "train", teacher_layers, cfg.optim.batch_size, shuffle=True,
                           seed=cfg.seed, with_logits=task == "causal-lm" and cfg.kl_alpha > 0,
                           process=(procs.rank, procs.size), shard_reads=cfg.shard_reads,
                           read_ahead=_read_ahead(cfg), read_targets=live is None)
    # its own generator: iterating a DataLoader draws a seed, which must not come from the global RNG
    loader = DataLoader(batches, batch_size=None, num_workers=cfg.workers,
                        generator=torch.Generator().manual_seed(cfg.seed))

    def epoch_batches(epoch: int):
        batches.set_epoch(epoch)
        return loader

    def evaluate_split(split) -> dict:
        return evaluate(student, iterate_batches(CacheSource(split), 64, pad_id), task, procs, meta.label_names,
                        split.questions)

    def validate() -> dict:
        result = evaluate_split(eval_split)
        if on_eval is not None:
            on_eval(result)
        return result

    modules = [student] + ([bank] if bank is not None else [])
    params = [p for m in modules for p in m.parameters()]
    variance = _state_variance(cfg, meta, teacher_layers) if bank is not None else None
    # the ratio of one step's gradients: not of a micro-batch's (accumulation), nor inside DDP (untried)
    probe_every = cfg.log_every * PROBE_EVERY if procs.size == 1 and cfg.optim.grad_accum == 1 else 0

    def loss_fn(batch):
        probe = bool(probe_every) and batch["step"] % probe_every == 0
        return stage2_loss(student, bank, live(batch) if live else batch, cfg, task, form, variance, probe, vocab, head)

    procs.seed(cfg.seed)  # Stage II's dropout does not depend on what ran before it
    result = fit(params, modules,
                 epoch_batches, num_batches(labels_only, cfg.optim.batch_size, procs.size, cfg.shard_reads, cfg.workers),
                 loss_fn, cfg.optim, f"stage II ({cfg.method}{', online' if live else ''})",
                 evaluate=validate if eval_split is not None else None,
                 select=PRIMARY_METRIC[task], eval_every=cfg.eval_every, max_steps=cfg.max_steps,
                 log_every=cfg.log_every, device=device, autocast=autocast, processes=procs, checkpoint=checkpoint)
    report = {
        "method": cfg.method, "config": asdict(cfg), "requested": requested, "cache": str(cache.path),
        "cache_bytes": cache.bytes_on_disk(), "task": task, "label_names": meta.label_names, "kd_targets": form,
        "layer_map": dict(zip(bank.spec.layers, teacher_layers)) if bank is not None else None,
        "layer_map_rule": (cfg.layer_map if cfg.layer_map in LAYER_MAP_RULES else "explicit") if bank is not None else None,
        "history": result["history"], "eval": result["evals"], "best": result["best"],
        "phases": {k: {"history": v["history"], "seconds": v["seconds"],
                       **({"filters": v["filters"]} if "filters" in v else {})} for k, v in phases.items()},
        "teacher": {name: teacher_metrics(split, task, meta.label_names)
                    for name, split in (("eval", eval_split), ("test", test_split)) if split is not None},
        "stage2_seconds": result["seconds"], "stage2_median_step_s": result["median_step_s"],
    }
    test_outputs = None
    if test_split is not None:
        test_outputs = predictions(student, iterate_batches(CacheSource(test_split), 64, pad_id), task, procs,
                                   test_split.questions)
        report["test"] = score(test_outputs, task, meta.label_names)
    report["seconds"] = time.perf_counter() - started
    report["processes"] = procs.size
    if procs.main:  # the student is saved once
        save_run(student if keep_model else None, tokenizer, cfg.out, report, as_given, test_outputs)
        checkpoint.remove()
    procs.barrier()
    best = report["best"] or {}
    log(f"{cfg.method}: best eval {PRIMARY_METRIC[task]} {best.get(PRIMARY_METRIC[task], float('nan')):.4f}"
        + (f", test {report['test'][PRIMARY_METRIC[task]]:.4f}" if "test" in report else "")
        + f" ({report['seconds']:.0f}s); saved to {cfg.out}")
    return report


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
    if checkpoint.exists() and not cfg.resume:
        raise TedcacheError(f"{folder} holds the checkpoint of an interrupted run; add --resume to continue it, "
                            "or delete that folder to start over")
    return checkpoint


def teacher_metrics(split, task: str, label_names: list[str] | None = None) -> dict:
    """The teacher's metrics on a cached split, from what the extraction stored (no teacher needed)."""
    if task == "causal-lm":
        return perplexity_from_nll(split.teacher_nll)
    if task in ("token-classification", "question-answering"):
        tokens = np.concatenate([np.arange(a, a + n) for a, n in zip(split.starts, split.lengths)])
        logits = split.tokens(layout.TOKEN_LOGITS, 0, int(tokens[-1]) + 1)[tokens]
        if task == "question-answering":
            cuts = np.cumsum(split.lengths)[:-1]
            spans = split.tokens(layout.CONTEXT_SPANS, 0, int(tokens[-1]) + 1)[tokens]
            windows = [best_span(x, y) for x, y in zip(np.split(logits, cuts), np.split(spans, cuts))]
            return squad_metrics(answer_questions(np.asarray(windows), split.question_index, split.questions))
        example = np.repeat(np.arange(len(split)), split.lengths)
        tags = split.tokens(layout.TOKEN_LABELS, 0, int(tokens[-1]) + 1)[tokens]
        tagged = tags >= 0
        return token_metrics(logits.argmax(-1)[tagged], tags[tagged].astype(np.int64), example[tagged], label_names)
    return metrics(split.teacher_logits, split.labels, task)
