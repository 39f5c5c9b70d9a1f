"""A bf16 teacher's cache against an fp32 teacher's (extract --dtype, issue 36), on the demo pair (MiniLM-L6
fine-tuned on Rotten Tomatoes -> its 2-layer copy):

- the stored states' and logits' relative error (raw states of the cached layers, stored in fp32, so only
  the teacher's precision differs);
- the KD and TED students' test accuracy from each teacher's default cache (filtered, int8), on paired
  seeds, with both 95% intervals (over seeds, and a paired bootstrap over test examples);
- the extraction's wall time.

Resumable: finished runs are read back. Run: python examples/teacher_dtype.py WORKDIR [SEEDS]
Writes WORKDIR/teacher_dtype.json and prints the tables (copied into docs/performance.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tedcache import distill, extract
from tedcache.cache import Cache
from tedcache.demos.demo import QUICK_DEMO, STUDY_SETTING, prepare
from tedcache.demos.evidence import tuned_params
from tedcache.experiments.stats import example_interval, seed_interval, verdict
from tedcache.experiments.tune import apply
from tedcache.run_folder import METRICS_FILE, find_runs

DTYPES = ("fp32", "bf16")
METHODS = ("kd", "ted")


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def main(workdir: str, seeds: list[int]) -> None:
    setup = prepare(str(Path(workdir) / "demo"), QUICK_DEMO, 42)
    out = setup.work / "teacher-dtype"
    raw = {d: Cache(extract(setup.extract_config(42, dtype=d, states="raw", precision="fp32"))) for d in DTYPES}
    errors = {f"layer {layer}": relative_error(*(raw[d].split("train").states(layer, 0, 1 << 30)[0] for d in ("bf16", "fp32")))
              for layer in raw["fp32"].metadata.layers}
    errors["logits"] = relative_error(*(raw[d].split("train").teacher_logits for d in ("bf16", "fp32")))
    caches = {d: Cache(extract(setup.extract_config(42, dtype=d))) for d in DTYPES}
    results = {"relative_error": errors, "extract_s": {d: c.metadata.timings["total_s"] for d, c in caches.items()}}
    for method in METHODS:
        runs = {d: [] for d in DTYPES}
        for seed in seeds:
            for d in DTYPES:
                folder = out / method / d / f"seed{seed}"
                if not (folder / METRICS_FILE).exists():
                    cfg = setup.distill_config(caches[d].location.url, method, str(folder), QUICK_DEMO, seed)
                    distill(apply(cfg, tuned_params(STUDY_SETTING, method)))
                runs[d].extend(find_runs([str(folder)]))
        accuracy = {d: [r.test() for r in runs[d]] for d in DTYPES}
        by_seed = seed_interval([a - b for a, b in zip(accuracy["bf16"], accuracy["fp32"])])
        by_example = example_interval([r.test_outputs() for r in runs["bf16"]], [r.test_outputs() for r in runs["fp32"]],
                                      "classification")
        results[method] = {"accuracy": accuracy, "by_seed": by_seed, "by_example": by_example,
                           "verdict": verdict("bf16", "fp32", by_seed, by_example, "accuracy")}
        (Path(workdir) / "teacher_dtype.json").write_text(json.dumps(results, indent=2, default=str))
    print("| relative error of the bf16 teacher's cache | " + " | ".join(errors) + " |")
    print("|---|" + "---|" * len(errors))
    print("| against the fp32 teacher's | " + " | ".join(f"{v:.4f}" for v in errors.values()) + " |")
    print("\n| student | seeds | fp32 teacher's cache: test accuracy | bf16 teacher's cache | bf16 − fp32 [95% over seeds] "
          "| [95% over test examples] | verdict |")
    print("|---|---|---|---|---|---|---|")
    for method in METHODS:
        r = results[method]
        acc = {d: np.asarray(r["accuracy"][d]) for d in DTYPES}
        s, e = r["by_seed"], r["by_example"]
        print(f"| {method} | {len(acc['fp32'])} | " + " | ".join(f"{acc[d].mean():.4f} ± {acc[d].std(ddof=1):.4f}"
                                                             for d in DTYPES) +
              f" | {s['mean']:+.4f} [{s['low']:+.4f}, {s['high']:+.4f}] | {e['mean']:+.4f} [{e['low']:+.4f}, "
              f"{e['high']:+.4f}] | {r['verdict']} |")
    print("\nwhole extraction s: " + ", ".join(f"{d} {s:.0f}" for d, s in results["extract_s"].items()))


if __name__ == "__main__":
    main(sys.argv[1], [int(s) for s in sys.argv[2].split(",")] if len(sys.argv) > 2 else list(range(1, 5)))
