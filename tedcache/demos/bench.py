"""`tedcache bench`: distill step time and memory side by side — student alone, offline TED (targets
from the cache through the real reader) and online TED (teacher in memory) — on the same batches, plus
extraction throughput against the teacher's forward-only throughput and cache read throughput.

Each (pair, mode) runs in its own process so that its peak memory is its own (RSS on CPU, allocated
GPU memory on a GPU). Pairs:
  minilm: all-MiniLM-L6-v2 (6x384, random 2-label head) -> its 2-layer copy (layers 0, 5)
  bert:   random BERT 12x768 -> random BERT 4x384 (the teacher's cost dominates, as in real use)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoTokenizer, BertConfig, BertForSequenceClassification

from ..cache import Cache
from ..config import DataConfig, ExtractConfig, FilterConfig, StudentConfig
from ..data.splits import load_splits
from ..distributed import peak_memory_mb, pick_device
from ..errors import note
from ..extraction import extract
from ..filters import FilterBank, FilterSpec
from ..layer_maps import map_layers
from ..loop import adamw
from ..losses import Stage2Loss, task_loss
from ..models import load_classifier, load_for_task, load_tokenizer
from ..reader import CacheBatches, ExamplesSource, iterate_batches
from ..stage2 import stage2_step
from ..students import init_student
from ..taps import forward_with_taps, hidden_size, model_inputs, num_layers
from ..teacher import LiveTargets
from ..teacher_pass import stored_units
from ..transfer import prefetch, to_device
from .demo import DemoSize, minilm_path, rotten_tomatoes

PAIRS = ("minilm", "bert")
MODES = ("student", "offline", "online")


def _pair_dirs(workdir: Path, pair: str) -> tuple[str, str]:
    """Teacher and student folders of a pair (made once)."""
    teacher, student = workdir / pair / "teacher", workdir / pair / "student"
    if (student / "config.json").exists():
        return str(teacher), str(student)
    torch.manual_seed(0)
    # TEDCACHE_BENCH_MINILM: a folder with MiniLM's config and tokenizer only (no weights), for machines
    # without the 84 MB package; timing does not depend on the weights' values, only their shapes.
    source = os.environ.get("TEDCACHE_BENCH_MINILM") or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    if pair == "minilm":
        if any(Path(source).glob("*.safetensors")):
            load_classifier(source, "teacher", "classification", ["0", "1"]).save_pretrained(teacher)
        else:
            BertForSequenceClassification(AutoConfig.from_pretrained(source, num_labels=2)).save_pretrained(teacher)
        tokenizer.save_pretrained(teacher)
        init_student(StudentConfig(source=str(teacher), layers=[0, 5], out=str(student)))
        return str(teacher), str(student)
    for folder, (layers, hidden, heads) in ((teacher, (12, 768, 12)), (student, (4, 384, 12))):
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=4 * hidden, num_labels=2)
        BertForSequenceClassification(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(teacher), str(student)


def _data(workdir: Path, examples: int) -> DataConfig:

    files = rotten_tomatoes(workdir / f"data-{examples}", DemoSize(examples, 200, 64, 1, 1), seed=0)
    return DataConfig(train=[files["train"]], eval=[files["validation"]], max_length=64)


def _extract_config(workdir: Path, pair: str, teacher: str, data: DataConfig, **overrides) -> ExtractConfig:
    """extract's defaults (Stage I included, stopped by the validation split), on the pair's cached layers."""
    layers = "every:3"  # minilm: 2 of 6 layers for a 2-layer student; bert: 4 of 12 for a 4-layer one
    settings = dict(teacher=teacher, data=data, filters=FilterConfig(layers=layers), cache_dir=str(workdir / pair / "caches"))
    return ExtractConfig(**{**settings, **overrides})


@torch.inference_mode()
def bare_forward_seconds(cfg: ExtractConfig, cache: str) -> float:
    """Seconds of the teacher's bare forward (inference mode; no taps, filters, encoding or writing) over
    the cache's examples, batched exactly as its extraction batched them: unit by unit, in storage order.
    This is the physical limit of a teacher pass."""
    meta = Cache(cache).metadata
    device = pick_device()
    tokenizer = load_tokenizer(cfg.teacher)
    model = load_for_task(cfg.teacher, "teacher", meta.task, resize=False, dtype=meta.teacher_dtype).to(device).eval()
    splits, _ = load_splits(cfg.data, tokenizer, model.config)
    bounds = {split: Cache(cache).split(split).unit_bounds for split in splits}
    units = [(split, unit) for split in splits for unit in range(len(bounds[split]) - 1)]
    _sync(device)
    started = time.perf_counter()
    for _, _, _, part in stored_units(splits, bounds, meta.seed, units):
        for batch in iterate_batches(ExamplesSource(part), cfg.batch_size, meta.pad_token_id):
            model(**model_inputs(to_device(batch, device)))
    _sync(device)
    return time.perf_counter() - started


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_steps(pair: str, mode: str, workdir: str, steps: int, batch_size: int) -> dict:
    """Per-step wall time (data wait included) and peak memory of one mode; run in its own process."""
    work = Path(workdir)
    info = json.loads((work / pair / "cache.json").read_text())
    cache = Cache(info["cache"])
    meta = cache.metadata
    device = pick_device()
    autocast = device.type == "cuda"
    torch.manual_seed(0)
    student = load_classifier(info["student"], "student", "classification", meta.label_names).to(device).train()
    total = num_layers(student)
    s_layers, t_layers = map_layers(list(range(total)), cache.layers, "interval", total)
    bank = FilterBank(FilterSpec(s_layers, hidden_size(student), meta.filter_dim)).to(device)
    params = list(student.parameters()) + (list(bank.parameters()) if mode != "student" else [])
    optimizer = adamw(params, 1e-5)
    loss_of = Stage2Loss("classification", "ted", kl_alpha=1.0, mse_alpha=1.0, temperature=2.0, filters=bank).to(device)
    live = LiveTargets(info["teacher"], cache, t_layers, device) if mode == "online" else None
    # every mode the same batches in the same order (distill's reader); only offline reads the targets
    loader = DataLoader(CacheBatches(info["cache"], "train", t_layers, batch_size, seed=0,
                                     read_targets=mode == "offline"), batch_size=None,
                        generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    while len(times) < steps:
        started = time.perf_counter()
        for batch in prefetch(loader, device):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                if mode == "student":
                    logits, _ = forward_with_taps(student, batch, [])
                    loss = task_loss(logits, batch["labels"], "classification")
                else:
                    loss, _ = stage2_step(student, loss_of, live(batch) if live else batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _sync(device)
            now = time.perf_counter()
            times.append(now - started)
            started = now
            if len(times) == steps:
                break
    peak = peak_memory_mb(device)
    return {"step_s": statistics.median(times[3:]), "peak_mb": peak, "device": str(device)}


def read_throughput(cache: str, layers: list[int], batch_size: int, workers: int = 0,
                    read_ahead: int = 0) -> tuple[float, float]:
    """(examples/s, compact MB/s) of one shuffled epoch through the reader (with DataLoader workers, and
    `read_ahead` windows read concurrently)."""
    started, nbytes, count = time.perf_counter(), 0, 0
    for batch in DataLoader(CacheBatches(cache, "train", layers, batch_size, seed=0, read_ahead=read_ahead),
                            batch_size=None, num_workers=workers):
        count += len(batch["labels"])
        nbytes += sum(s.values.nbytes + (0 if s.token_scale is None else s.token_scale.nbytes)
                      for s in batch["teacher_states"])
    seconds = time.perf_counter() - started
    return count / seconds, nbytes / 1e6 / seconds


def run_bench(workdir: str, pairs: tuple[str, ...] = PAIRS, steps: int = 20, batch_size: int = 32,
              examples: int = 1024) -> list[dict]:
    """Everything for each pair; returns one result object per pair."""

    work = Path(workdir)
    data = _data(work, examples)
    results = []
    for pair in pairs:
        note(f"== {pair}: preparing models and the cache")
        teacher, student = _pair_dirs(work, pair)
        cfg = _extract_config(work, pair, teacher, data)
        cache = extract(replace(cfg, force=True))  # rebuilt, so its teacher pass is timed in this run
        meta = Cache(cache).metadata
        examples = sum(meta.splits.values())
        forward_s = bare_forward_seconds(cfg, cache)
        forward = examples / forward_s
        extraction = examples / meta.timings["teacher_pass_s"]
        (work / pair / "cache.json").write_text(json.dumps({"cache": cache, "teacher": teacher, "student": student}))
        read_examples, read_mb = read_throughput(cache, Cache(cache).layers, batch_size)
        row = {"pair": pair, "batch_size": batch_size, "forward_examples_per_s": forward,
               "extract_examples_per_s": extraction, "extract_over_forward": extraction / forward,
               "stage1_s": meta.timings["stage1_s"], "whole_extract_in_forwards": meta.timings["total_s"] / forward_s,
               "read_examples_per_s": read_examples, "read_mb_per_s": read_mb}
        for mode in MODES:
            note(f"== {pair}: {mode} steps")
            timed = _measure_in_subprocess(pair, mode, work, steps, batch_size, {})
            # memory in a second process: glibc's allocator keeps freed memory (arenas, fragmentation
            # from varying batch shapes), so RSS would show allocator slack, not live data; with one
            # arena and large blocks mmap-ed it follows live data (and steps run slower: not timed)
            sized = _measure_in_subprocess(pair, mode, work, min(steps, 10), batch_size,
                                           {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
            row[f"{'student_only' if mode == 'student' else mode}_step_s"] = timed["step_s"]
            row[f"peak_mem_{mode}_mb"] = sized["peak_mb"] if timed["device"] == "cpu" else timed["peak_mb"]
            row["device"] = timed["device"]
        row["offline_over_student"] = row["offline_step_s"] / row["student_only_step_s"]
        row["online_over_offline"] = row["online_step_s"] / row["offline_step_s"]
        row["consumed_examples_per_s"] = batch_size / row["offline_step_s"]
        results.append(row)
    return results


def _measure_in_subprocess(pair: str, mode: str, work: Path, steps: int, batch_size: int, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "tedcache.demos.bench", pair, mode, str(work), str(steps), str(batch_size)],
                         capture_output=True, text=True, check=True, env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_table(results: list[dict]) -> str:
    lines = ["| pair | device | student-only step s | offline TED step s | online TED step s | offline / student | "
             "online / offline | peak MB student / offline / online | extract / forward | whole extract in "
             "forwards | read ex/s (MB/s) | TED consumes ex/s |", "|" + "---|" * 12]
    for r in results:
        lines.append(
            f"| {r['pair']} | {r['device']} | {r['student_only_step_s']:.3f} | {r['offline_step_s']:.3f} | "
            f"{r['online_step_s']:.3f} | {r['offline_over_student']:.2f} | {r['online_over_offline']:.2f} | "
            f"{r['peak_mem_student_mb']:.0f} / {r['peak_mem_offline_mb']:.0f} / {r['peak_mem_online_mb']:.0f} | "
            f"{r['extract_over_forward']:.2f} | {r['whole_extract_in_forwards']:.2f} | "
            f"{r['read_examples_per_s']:,.0f} ({r['read_mb_per_s']:.0f}) | "
            f"{r['consumed_examples_per_s']:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # one measurement process: PAIR MODE WORKDIR STEPS BATCH
    pair_, mode_, workdir_, steps_, batch_ = sys.argv[1:6]
    print(json.dumps(measure_steps(pair_, mode_, workdir_, int(steps_), int(batch_))))
