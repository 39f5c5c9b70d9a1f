"""What a distill run records (metrics.json): its settings, the cache it read, its training history,
validation, the test split scored once, the teacher's own scores from the cache, and its timings."""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from .cache import layout
from .distill_run import DistillRun
from .distributed import peak_memory_mb
from .evaluate import predictions, score
from .layer_maps import LAYER_MAP_RULES
from .qa import answer_questions, best_span
from .reader import CacheSource, iterate_batches
from .tasks import TASK


def run_report(run: DistillRun, result: dict, phases: dict, score_test: bool) -> tuple[dict, dict | None]:
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
                           else "explicit") if bank is not None else None,  # ("auto" is resolved in set_up)
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
