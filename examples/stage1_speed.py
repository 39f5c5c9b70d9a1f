"""The whole extraction against the teacher's bare forward, at extract's default settings with a fine-tuned
teacher, Stage I as it was and as shipped, in turns in one run (docs/performance.md, "Stage I at the speed of its
arithmetic"):

    python examples/stage1_speed.py demo|lm-demo WORKDIR [REPEATS] [VARIANT,...]

WORKDIR is the folder `tedcache demo` (demo) or `tedcache demo --task causal-lm` (lm-demo) worked in
(~/.cache/tedcache/demo): its fine-tuned teacher and data are measured. The demo pair runs extract's defaults; the
LM demo its own filtered layers (every:10) with Stage I at extract's defaults (to convergence, not the demo's
quarter epoch). The variants (all by default): "before", Stage I filtering every token, AdamW run tensor by tensor,
a causal LM's logit lens measured at every validation (and once more after training, which the old code did not);
"positions", filtering only the positions a head reads (a sequence task only); "shipped", that with the fused AdamW
and the logit lens measured once.
Prints one markdown table of medians over the repeats: whole extraction, Stage I (seconds, steps, the median
step in milliseconds) and the bare forward over the same batches, and the whole extraction in forwards."""

import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from tedcache import DataConfig, ExtractConfig, FilterConfig, extract, loop, stage1, teacher_filters
from tedcache.cache import Cache
from tedcache.demos import bench
from tedcache.tasks import TASK


def every_token(model, hidden, batch, task):
    return hidden, batch


def adamw_tensor_by_tensor(params, lr, weight_decay=0.01):
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def with_logit_lens(model, bank, heads, source, task, pad_id, batch_size):
    metrics = filter_metrics(model, bank, heads, source, task, pad_id, batch_size)
    if TASK[task].causal:
        metrics.update(stage1.logit_lens_losses(model, bank.spec.layers, source, pad_id, batch_size))
    return metrics


filter_metrics = stage1.filter_metrics
VARIANTS = {"before": (every_token, adamw_tensor_by_tensor, with_logit_lens),
            "positions": (stage1.at_head_positions, adamw_tensor_by_tensor, filter_metrics),
            "shipped": (stage1.at_head_positions, loop.adamw, filter_metrics)}


def config(pair: str, workdir: Path) -> ExtractConfig:
    cache_dir = tempfile.mkdtemp(prefix="stage1-speed-")
    if pair == "demo":
        work = workdir / "train2000-len64-seed42"
        data = DataConfig(train=[str(work / "data/train.parquet")], eval=[str(work / "data/validation.parquet")])
        return ExtractConfig(teacher=str(work / "teacher"), data=data, cache_dir=cache_dir)
    from tedcache.demos.demo_lm import QUICK_LM_DEMO, TEACHER_FILTER_LAYERS
    work = workdir / f"blocks{QUICK_LM_DEMO.train_blocks}x{QUICK_LM_DEMO.block_size}-seed42"
    data = DataConfig(train=[str(work / "data/train.parquet")], eval=[str(work / "data/validation.parquet")],
                      task="causal-lm", block_size=QUICK_LM_DEMO.block_size, limit=QUICK_LM_DEMO.train_blocks)
    return ExtractConfig(teacher=str(workdir / "smollm2-135m-instruct"), data=data, batch_size=16,
                         filters=FilterConfig(layers=TEACHER_FILTER_LAYERS), cache_dir=cache_dir, seed=42)


def measure(cfg: ExtractConfig, variant: str) -> dict:
    stage1.at_head_positions, loop.adamw, stage1.filter_metrics = VARIANTS[variant]
    trained = {}
    train_filters = teacher_filters.train_filters

    def recording(*args, **kwargs):
        trained.update(train_filters(*args, **kwargs))
        return trained

    teacher_filters.train_filters = recording
    try:
        cache = extract(replace(cfg, force=True))
    finally:
        teacher_filters.train_filters = train_filters
    timings = Cache(cache).metadata.timings
    return {"whole_s": timings["total_s"], "stage1_s": timings["stage1_s"], "steps": trained["steps"],
            "step_ms": 1000 * trained["median_step_s"], "forward_s": bench.bare_forward_seconds(cfg, cache)}


def main(pair: str, workdir: str, repeats: int, variants: list[str]) -> None:
    cfg = config(pair, Path(workdir).expanduser())
    if TASK[cfg.data.task].causal:  # every token is a head position
        variants = [v for v in variants if v != "positions"]
    runs = {variant: [] for variant in variants}
    for _ in range(repeats):
        for variant in variants:
            runs[variant].append(measure(cfg, variant))
    print("| Stage I | whole extraction (s) | Stage I (s) | Stage I steps | median step (ms) | bare forward (s) "
          "| whole extraction in forwards |")
    print("|---|---|---|---|---|---|---|")
    for variant, rows in runs.items():
        median = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
        print(f"| {variant} | {median['whole_s']:.1f} | {median['stage1_s']:.1f} | {median['steps']:.0f} | "
              f"{median['step_ms']:.1f} | {median['forward_s']:.1f} | {median['whole_s'] / median['forward_s']:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 3,
         sys.argv[4].split(",") if len(sys.argv) > 4 else list(VARIANTS))
