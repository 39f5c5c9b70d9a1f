"""Cache precision and filter width against cache size, reconstruction error and TED accuracy.

Runs on the embedded default (fine-tuned MiniLM teacher, Rotten Tomatoes, 2-layer student): one cache
per setting, TED students over several seeds from each, everything else fixed. About 30 minutes on
2 CPU cores.  python examples/precision_study.py [--workdir DIR] [--seeds 1,2,3]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from tedcache import distill, extract
from tedcache.cache import Cache, CompactStates, decode_values, inspect_cache
from tedcache.config import FilterConfig
from tedcache.demos.demo import QUICK_DEMO, prepare


def decoded_states(path: str) -> dict[int, torch.Tensor]:
    """Every real token's stored state, decoded to fp32, per layer."""
    cache = Cache(path)
    split = cache.split("train")
    index = np.concatenate([np.arange(s, s + n) for s, n in zip(split.starts, split.lengths)])
    out = {}
    for layer in cache.layers:
        values, scales = split.states(layer, 0, int(split.starts[-1] + split.lengths[-1]))
        out[layer] = CompactStates(decode_values(values[index], cache.precision),
                                   None if scales is None else torch.from_numpy(scales[index]),
                                   split.channel_scale(layer)).widen()
    return out


def ted_runs(setup, cache: str, name: str, seeds: list[int]) -> list[float]:
    accuracies = []
    for seed in seeds:
        out = setup.work / "study" / f"{name}-seed{seed}"
        if (out / "metrics.json").exists():
            report = json.loads((out / "metrics.json").read_text())
        else:
            report = distill(setup.distill_config(cache, "ted", str(out), QUICK_DEMO, seed))
        accuracies.append(report["test"]["accuracy"])
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "tedcache" / "demo"))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--filter-dims", default="384,96,24")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    setup = prepare(args.workdir, QUICK_DEMO, seed=42)
    rows = []
    reference = None
    for precision in ("fp32", "fp16", "bf16", "int8"):
        cache = extract(setup.extract_config(42, precision=precision))
        states = decoded_states(cache)
        reference = reference or states
        error = max(float((states[k] - reference[k]).pow(2).mean().sqrt() / reference[k].pow(2).mean().sqrt())
                    for k in states)
        info = inspect_cache(cache)
        rows.append({"setting": f"{precision}, d_f=384", "precision": precision, "filter_dim": 384,
                     "bytes_per_value": info["bytes_per_value"], "state_mib": info["state_bytes"] / 2**20,
                     "cache_mib": info["bytes_on_disk"] / 2**20, "relative_rms_error": error,
                     "accuracy": ted_runs(setup, cache, f"{precision}-d384", seeds)})
    for dim in (int(d) for d in args.filter_dims.split(",")):
        if dim == 384:
            continue
        cache = extract(setup.extract_config(42, filters=FilterConfig(layers="every:3", dim=dim)))
        info = inspect_cache(cache)
        rows.append({"setting": f"{info['precision']}, d_f={dim}", "precision": info["precision"], "filter_dim": dim,
                     "bytes_per_value": info["bytes_per_value"], "state_mib": info["state_bytes"] / 2**20,
                     "cache_mib": info["bytes_on_disk"] / 2**20, "relative_rms_error": None,
                     "accuracy": ted_runs(setup, cache, f"{info['precision']}-d{dim}", seeds)})
    lines = ["| cache | bytes / value | states MiB | cache MiB | rel. RMS error vs fp32 | TED test accuracy "
             f"(mean ± std, {len(seeds)} seeds) |", "|---|---|---|---|---|---|"]
    for row in rows:
        acc = row["accuracy"]
        error = "—" if row["relative_rms_error"] is None else f"{row['relative_rms_error']:.2e}"
        lines.append(f"| {row['setting']} | {row['bytes_per_value']:.3f} | {row['state_mib']:.1f} | "
                     f"{row['cache_mib']:.1f} | {error} | {statistics.mean(acc):.4f} ± {statistics.stdev(acc):.4f} |")
    text = "\n".join(lines)
    (setup.work / "study" / "precision_study.json").write_text(json.dumps(rows, indent=2))
    (setup.work / "study" / "precision_study.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
