"""Stage I on stored states against the live Stage I of the reference (issue 34), measured on the demo pair
(MiniLM-L6 fine-tuned on Rotten Tomatoes -> its 2-layer copy) and the LM demo (SmolLM2-135M):

- each teacher filter's validation metrics, and the wall time of the whole extraction against the
  teacher's bare forward over the same examples (bench.bare_forward_seconds);
- demo pair: the TED student's test accuracy over paired seeds, its Stage I in the same mode as its
  cache's, with both 95% intervals (over seeds, and a paired bootstrap over test examples);
- LM demo: stored-state Stage I on samples of the training blocks (--stage1-examples).

Resumable: finished runs are read back. Run: python examples/stage1_states.py WORKDIR [SEEDS]
Writes WORKDIR/stage1_states.json and prints the tables (copied into docs/performance.md)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from tedcache import distill, extract
from tedcache.cache import Cache
from tedcache.config import DataConfig, ExtractConfig, FilterConfig, OptimConfig
from tedcache.demos.bench import bare_forward_seconds
from tedcache.demos.demo import QUICK_DEMO, STUDY_SETTING, prepare
from tedcache.demos.demo_lm import QUICK_LM_DEMO, TEACHER_FILTER_LAYERS, smollm2, snippet_texts
from tedcache.demos.evidence import tuned_params
from tedcache.experiments.stats import example_interval, seed_interval, verdict
from tedcache.experiments.tune import apply
from tedcache.run_folder import METRICS_FILE, find_runs

MODES = ("live", "stored")


def timed_extract(cfg: ExtractConfig, record: Path) -> dict:
    """Extract (or read back what an earlier run measured): the cache, its filter metrics and times."""
    if record.exists():
        return json.loads(record.read_text())
    started = time.perf_counter()
    cache = extract(replace(cfg, force=True))
    meta = Cache(cache).metadata
    result = {"cache": cache, "seconds": time.perf_counter() - started, "timings": meta.timings,
              "filters": meta.stage1_filters, "forward_s": bare_forward_seconds(cfg, cache)}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result, indent=2))
    return result


def demo_pair(workdir: Path, seeds: list[int]) -> dict:
    setup = prepare(str(workdir / "demo"), QUICK_DEMO, 42)
    out = setup.work / "stage1-states"
    caches = {mode: timed_extract(setup.extract_config(42, stage1_states=mode), out / f"extract-{mode}.json")
              for mode in MODES}
    runs = {mode: [] for mode in MODES}
    for seed in seeds:
        for mode in MODES:
            folder = out / mode / f"seed{seed}"
            if not (folder / METRICS_FILE).exists():
                cfg = setup.distill_config(caches[mode]["cache"], "ted", str(folder), QUICK_DEMO, seed,
                                           stage1_states=mode)
                distill(apply(cfg, tuned_params(STUDY_SETTING, "ted")))
            runs[mode].extend(find_runs([str(folder)]))
    accuracy = {mode: [r.test() for r in runs[mode]] for mode in MODES}
    by_seed = seed_interval([a - b for a, b in zip(accuracy["stored"], accuracy["live"])])
    by_example = example_interval([r.test_outputs() for r in runs["stored"]], [r.test_outputs() for r in runs["live"]],
                                  "classification")
    return {"extract": caches, "accuracy": accuracy, "by_seed": by_seed, "by_example": by_example,
            "verdict": verdict("stored", "live", by_seed, by_example, "accuracy"),
            "distill_s": {mode: [r.metrics["seconds"] for r in runs[mode]] for mode in MODES},
            "student_stage1_s": {mode: [r.metrics["phases"]["stage1"]["seconds"] for r in runs[mode]] for mode in MODES}}


def lm_demo(workdir: Path, samples: list[int]) -> dict:
    size = QUICK_LM_DEMO
    teacher = smollm2(workdir / "lm" / "smollm2-135m-instruct")
    work = workdir / "lm" / f"blocks{size.train_blocks}x{size.block_size}-seed42"
    files = snippet_texts(work / "data", size)
    data = DataConfig(train=[files["train"]], eval=[files["validation"]], test=[files["test"]], task="causal-lm",
                      block_size=size.block_size, limit=size.train_blocks)
    cfg = ExtractConfig(teacher=teacher, data=data, filters=FilterConfig(layers=TEACHER_FILTER_LAYERS),
                        stage1=OptimConfig(epochs=size.stage1_epochs, lr=1e-3, batch_size=8), batch_size=16,
                        cache_dir=str(work / "caches"), seed=42)
    out = work / "stage1-states"
    result = {mode: timed_extract(replace(cfg, stage1_states=mode), out / f"extract-{mode}.json") for mode in MODES}
    for n in samples:  # the same number of Stage-I steps as the whole split's quarter epoch
        epochs = size.stage1_epochs * size.train_blocks / n
        result[f"stored, {n} blocks"] = timed_extract(
            replace(cfg, stage1_examples=n, stage1=replace(cfg.stage1, epochs=epochs)), out / f"extract-sample{n}.json")
    return result


def filter_rows(results: dict) -> list[str]:
    """One table row per extraction: each filter's validation loss (and accuracy or logit-lens loss)."""
    lines = []
    for name, r in results.items():
        metrics = r["filters"]["metrics"]
        layers = sorted({k.split("/")[0] for k in metrics if "/" in k}, key=int)
        cells = "; ".join(f"{layer}: " + ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in metrics.items()
                                                  if k.startswith(f"{layer}/")) for layer in layers)
        t = r["timings"]
        lines.append(f"| {name} | {cells} | {r['filters']['steps']} | {t['stage1_s']:.0f} | {t['teacher_pass_s']:.0f} | "
                     f"{t['total_s']:.0f} | {r['forward_s']:.0f} | {t['total_s'] / r['forward_s']:.2f} |")
    return lines


def main(workdir: str, seeds: list[int]) -> None:
    work = Path(workdir)
    results = {"demo": demo_pair(work, seeds)}
    (work / "stage1_states.json").write_text(json.dumps(results, indent=2, default=str))
    results["lm"] = lm_demo(work, [96, 192])
    (work / "stage1_states.json").write_text(json.dumps(results, indent=2, default=str))
    header = ["| extraction | filter validation metrics per layer | Stage I steps | Stage I s | cache pass s | "
              "whole extract s | bare forward s | whole / forward |", "|" + "---|" * 8]
    print("\n".join(["### Demo pair", *header, *filter_rows(results["demo"]["extract"]),
                     "", "### LM demo", *header, *filter_rows(results["lm"])]))
    d = results["demo"]
    print("\n| student Stage I | seeds | TED test accuracy (mean ± std) | Stage I s (median) | distill s (median) |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        acc = np.asarray(d["accuracy"][mode])
        print(f"| {mode} | {len(acc)} | {acc.mean():.4f} ± {acc.std(ddof=1):.4f} | "
              f"{np.median(d['student_stage1_s'][mode]):.0f} | {np.median(d['distill_s'][mode]):.0f} |")
    s, e = d["by_seed"], d["by_example"]
    print(f"\nstored - live: {s['mean']:+.4f} [{s['low']:+.4f}, {s['high']:+.4f}] over {s['n']} seeds; "
          f"{e['mean']:+.4f} [{e['low']:+.4f}, {e['high']:+.4f}] over test examples; {d['verdict']}")


if __name__ == "__main__":
    main(sys.argv[1], [int(s) for s in sys.argv[2].split(",")] if len(sys.argv) > 2 else list(range(1, 9)))
