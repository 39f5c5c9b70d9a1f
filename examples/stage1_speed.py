"""The whole extraction against the teacher's bare forward, at extract's default settings, with Stage I filtering
every token ("before") and only the positions its heads read ("after", as shipped), in turns in one run
(docs/performance.md, "Stage I at the speed of its arithmetic"):

    python examples/stage1_speed.py TEACHER TRAIN EVAL [REPEATS]

TEACHER is a fine-tuned model folder (the demo's: ~/.cache/tedcache/demo/<run>/teacher), TRAIN and EVAL its
data files. Prints one markdown table of medians over the repeats: whole extraction, Stage I (seconds, steps,
milliseconds a step) and the bare forward over the same batches, and the whole extraction in forwards."""

import statistics
import sys
import tempfile
from dataclasses import replace

from tedcache import DataConfig, ExtractConfig, extract, stage1
from tedcache.cache import Cache
from tedcache.demos import bench

VARIANTS = {"before": lambda model, hidden, batch, task: (hidden, batch), "after": stage1.at_head_positions}


def measure(cfg: ExtractConfig, variant: str) -> dict:
    stage1.at_head_positions = VARIANTS[variant]
    cache = extract(replace(cfg, force=True))
    meta = Cache(cache).metadata
    steps = meta.stage1_filters["steps"]
    return {"whole_s": meta.timings["total_s"], "stage1_s": meta.timings["stage1_s"], "steps": steps,
            "ms_per_step": 1000 * meta.timings["stage1_s"] / max(steps, 1),
            "forward_s": bench.bare_forward_seconds(cfg, cache)}


def main(teacher: str, train: str, evaluation: str, repeats: int) -> None:
    cfg = ExtractConfig(teacher=teacher, data=DataConfig(train=[train], eval=[evaluation]),
                        cache_dir=tempfile.mkdtemp(prefix="stage1-speed-"))
    runs = {variant: [] for variant in VARIANTS}
    for _ in range(repeats):
        for variant in VARIANTS:
            runs[variant].append(measure(cfg, variant))
    print("| Stage I | whole extraction (s) | Stage I (s) | Stage I steps | ms a step | bare forward (s) "
          "| whole extraction in forwards |")
    print("|---|---|---|---|---|---|---|")
    for variant, rows in runs.items():
        median = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
        print(f"| {variant} | {median['whole_s']:.1f} | {median['stage1_s']:.1f} | {median['steps']:.0f} | "
              f"{median['ms_per_step']:.1f} | {median['forward_s']:.1f} | {median['whole_s'] / median['forward_s']:.2f} |")


if __name__ == "__main__":
    main(*sys.argv[1:4], int(sys.argv[4]) if len(sys.argv) > 4 else 3)
