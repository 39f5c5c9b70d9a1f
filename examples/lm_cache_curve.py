"""Cache size against student quality on the causal-LM demo (SmolLM2-135M teaches its 15-layer copy).

Each row is one cache (the demo's data, teacher layers, Stage I and seed; what the row names changes)
and one student trained from it with the demo's Stage-II settings (KD at T = 1 for every --logits
option, the demo's temperature): bytes per training token (states +
per-token logit targets; the output layer a `hidden` cache stores once is shown apart), the student's
test perplexity, and the median Stage-II step time. KD rows compare the `--logits` options with the
states unused; TED rows trace the curve over state precision, filter width, tapped layers and logits,
against the exact reference (fp32 states, `hidden` logits). Resumable: finished caches and students are
reused, so a killed run continues where it stopped.

    python examples/lm_cache_curve.py [--workdir ~/.cache/tedcache/demo] [--only kd|ted]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tedcache import distill, extract
from tedcache.cache import inspect_cache
from tedcache.config import DataConfig, DistillConfig, ExtractConfig, FilterConfig, OptimConfig, StudentConfig
from tedcache.demos.demo_lm import (
    KL_ALPHA,
    MSE_ALPHA,
    QUICK_LM_DEMO,
    STUDENT_FILTER_LAYERS,
    STUDENT_LAYERS,
    STUDENT_LR,
    TEACHER_FILTER_LAYERS,
    smollm2,
    snippet_texts,
)
from tedcache.students import init_student

SEED = 42
# (method, precision, teacher layers, filter width (None: 576), --logits, student layers)
ROWS = [
    ("kd", "int8", TEACHER_FILTER_LAYERS, None, "sample:50", STUDENT_FILTER_LAYERS),
    ("kd", "int8", TEACHER_FILTER_LAYERS, None, "topk:50", STUDENT_FILTER_LAYERS),
    ("kd", "int8", TEACHER_FILTER_LAYERS, None, "hidden", STUDENT_FILTER_LAYERS),
    ("ted", "fp32", TEACHER_FILTER_LAYERS, None, "hidden", STUDENT_FILTER_LAYERS),  # the exact reference
    ("ted", "int8", TEACHER_FILTER_LAYERS, None, "hidden", STUDENT_FILTER_LAYERS),
    ("ted", "int8", TEACHER_FILTER_LAYERS, None, "sample:50", STUDENT_FILTER_LAYERS),  # the demo's cache
    ("ted", "int8", TEACHER_FILTER_LAYERS, 128, "hidden", STUDENT_FILTER_LAYERS),
    ("ted", "int8", TEACHER_FILTER_LAYERS, 64, "sample:50", STUDENT_FILTER_LAYERS),
    ("ted", "int8", "29", None, "sample:50", "14"),  # one tapped layer: the last
]


def run_row(root: Path, teacher: str, student: str, data: DataConfig, row: tuple) -> dict:
    method, precision, layers, width, logits, student_layers = row
    name = f"{method}-{precision}-L{layers.replace(':', '')}-d{width or 576}-{logits.replace(':', '')}"
    cache = extract(ExtractConfig(
        teacher=teacher, data=data, filters=FilterConfig(layers=layers, dim=width), precision=precision,
        logits=logits, stage1=OptimConfig(epochs=QUICK_LM_DEMO.stage1_epochs, lr=1e-3, batch_size=8), batch_size=16,
        cache_dir=str(root / "caches"), seed=SEED))
    out = root / "students" / name
    if not (out / "metrics.json").exists():
        distill(DistillConfig(
            cache=cache, student=student, out=str(out), method=method, kl_alpha=KL_ALPHA, mse_alpha=MSE_ALPHA,
            temperature=1.0, student_layers=student_layers, seed=SEED,
            optim=OptimConfig(epochs=QUICK_LM_DEMO.student_epochs, lr=STUDENT_LR, batch_size=8, warmup_ratio=0.1),
            stage1=OptimConfig(epochs=QUICK_LM_DEMO.stage1_epochs, lr=1e-3, batch_size=8)), keep_model=False)
    metrics = json.loads((out / "metrics.json").read_text())
    sizes = inspect_cache(cache)
    tokens = sizes["tokens"]
    return {"name": name, "method": method, "precision": precision, "layers": layers, "width": width or 576,
            "logits": logits, "state_bytes_per_token": sizes["state_bytes"] / tokens,
            "logit_bytes_per_token": sizes.get("logit_bytes", 0) / tokens, "head_bytes": sizes.get("head_bytes", 0),
            "test_perplexity": metrics["test"]["perplexity"],
            "median_step_s": metrics["stage2_median_step_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "tedcache" / "demo"))
    parser.add_argument("--only", choices=["kd", "ted"], default=None)
    args = parser.parse_args()
    root = Path(args.workdir)
    teacher = smollm2(root / "smollm2-135m-instruct")
    work = root / "cache-curve"
    files = snippet_texts(work / "data", QUICK_LM_DEMO)
    student = work / "student-init"
    if not (student / "config.json").exists():
        init_student(StudentConfig(source=teacher, layers=STUDENT_LAYERS, out=str(student)))
    data = DataConfig(train=[files["train"]], eval=[files["validation"]], test=[files["test"]], task="causal-lm",
                      block_size=QUICK_LM_DEMO.block_size, limit=QUICK_LM_DEMO.train_blocks)
    results = []
    print("| method | states | teacher layers | filter width | --logits | state B/token | logit B/token | "
          "total B/token | test perplexity | Stage-II step (s, median) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in ROWS:
        if args.only and row[0] != args.only:
            continue
        r = run_row(work, teacher, str(student), data, row)
        results.append(r)
        (work / "results.json").write_text(json.dumps(results, indent=1))
        states = "-" if r["method"] == "kd" else r["precision"]
        state_bytes = 0.0 if r["method"] == "kd" else r["state_bytes_per_token"]
        head = f" (+ {r['head_bytes'] / 2**20:.0f} MiB head once)" if r["head_bytes"] else ""
        print(f"| {r['method']} | {states} | {r['layers']} | {r['width'] if r['method'] == 'ted' else '-'} | "
              f"{r['logits']} | {state_bytes:.0f} | {r['logit_bytes_per_token']:.0f}{head} | "
              f"{state_bytes + r['logit_bytes_per_token']:.0f} | {r['test_perplexity']:.2f} | "
              f"{r['median_step_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
