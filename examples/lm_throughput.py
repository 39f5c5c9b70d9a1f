"""LM extraction, then a TED and a KD distill, timed, for comparing machines (docs/performance.md, "The
language-model scenario on a GPU"). The teacher has SmolLM2-135M's shapes with random weights (timing
depends on shapes only), so a machine needs only the model's config and tokenizer files.

    python examples/lm_throughput.py WORK CONFIG_DIR TRAIN.parquet EVAL.parquet BLOCKS STEPS OUT.jsonl

BLOCKS: training blocks of 128 tokens (0: all); STEPS: optimiser steps per distill run. One JSON line
per stage is appended to OUT.jsonl."""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tedcache import DataConfig, DistillConfig, ExtractConfig, FilterConfig, OptimConfig, distill, extract
from tedcache.cache import Cache
from tedcache.config import StudentConfig
from tedcache.demos import bench
from tedcache.demos.demo_lm import STUDENT_LAYERS
from tedcache.students import init_student


def record(out: Path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


def main(work: Path, source: str, train: str, evaluation: str, blocks: int, steps: int, out: Path) -> None:
    teacher, student = work / "teacher", work / "student"
    if not (teacher / "config.json").exists():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(teacher)
        AutoTokenizer.from_pretrained(source).save_pretrained(teacher)
    if not (student / "config.json").exists():
        init_student(StudentConfig(source=str(teacher), layers=STUDENT_LAYERS, out=str(student)))
    data = DataConfig(train=[train], eval=[evaluation], task="causal-lm", block_size=128, limit=blocks or None)
    cfg = ExtractConfig(teacher=str(teacher), data=data, filters=FilterConfig(layers="every:10"),
                        stage1=OptimConfig(epochs=0.25, lr=1e-3, batch_size=8), batch_size=64,
                        cache_dir=str(work / "caches"), seed=42, force=True)
    cache = Cache(extract(cfg))
    timings = cache.metadata.timings
    tokens = int(cache.split("train").lengths.sum())
    forward = bench.bare_forward_seconds(cfg, cache.location.url)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    record(out, dict(step="extract", device=device, train_tokens=tokens, total_s=timings["total_s"],
                     teacher_pass_s=timings["teacher_pass_s"], forward_s=forward,
                     pass_tokens_per_s=tokens / timings["teacher_pass_s"],
                     extract_over_forward=forward / timings["teacher_pass_s"], mib=cache.location.size() / 2**20))
    for method in ("ted", "kd"):
        distill(DistillConfig(cache=cache.location.url, student=str(student), out=str(work / method), method=method,
                              student_layers="every:5", seed=1, max_steps=steps,
                              optim=OptimConfig(epochs=1, lr=2e-4, batch_size=16, warmup_ratio=0.1),
                              stage1=OptimConfig(epochs=0.05, lr=1e-3, batch_size=8)))
        metrics = json.loads((work / method / "metrics.json").read_text())
        record(out, dict(step=f"distill {method}", median_step_s=metrics["stage2_median_step_s"],
                         tokens_per_step=16 * 128, steps=steps))


if __name__ == "__main__":
    work_dir, config_dir, train_file, eval_file, n_blocks, n_steps, out_file = sys.argv[1:8]
    main(Path(work_dir), config_dir, train_file, eval_file, int(n_blocks), int(n_steps), Path(out_file))
