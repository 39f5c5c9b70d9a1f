"""Cache read throughput against what a distill step consumes, on the embedded default.

Reads one epoch of the demo cache through the real reader (in-process, and with DataLoader workers)
and times TED steps of the 2-layer student on batches already in memory; prints examples/s and MB/s
(compact bytes delivered), medians of --repeats runs.
  python examples/reader_throughput.py [--workdir DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from tedcache.bench import read_throughput
from tedcache.cache import Cache
from tedcache.demo import QUICK, prepare
from tedcache.distillation import map_layers, stage2_loss
from tedcache.filters import FilterBank, FilterSpec
from tedcache.models import load_classifier
from tedcache.reader import CacheBatches
from tedcache.taps import hidden_size


def step_rate(setup, cache: str, layers: list[int], batch_size: int, steps: int = 12) -> float:
    """Examples per second a TED step consumes (batches pre-read, so no I/O is timed)."""
    meta = Cache(cache).metadata
    student = load_classifier(setup.student, "student", meta.task, meta.label_names)
    s_layers, _ = map_layers([0, 1], Cache(cache).layers, None, 2)
    bank = FilterBank(FilterSpec(s_layers, hidden_size(student), meta.filter_dim))
    params = list(student.parameters()) + list(bank.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    cfg = setup.distill_config(cache, "ted", "", QUICK, 0)
    batches = []
    for batch in CacheBatches(cache, "train", layers, batch_size, shuffle=True, seed=1):
        batches.append(batch)
        if len(batches) == steps:
            break
    times = []
    student.train()
    for batch in batches:
        started = time.perf_counter()
        loss, _ = stage2_loss(student, bank, batch, cfg, meta.task)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return batch_size / statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "tedcache" / "demo"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from tedcache import extract

    setup = prepare(args.workdir, QUICK, seed=42)
    cache = extract(setup.extract_config(42))
    layers = Cache(cache).layers
    lines = ["| reader | examples/s | MB/s (compact) |", "|---|---|---|"]
    for workers in (0, 2):
        runs = [read_throughput(cache, layers, args.batch_size, workers) for _ in range(args.repeats)]
        rate, mb_rate = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        lines.append(f"| {'in-process' if workers == 0 else f'{workers} DataLoader workers'} | "
                     f"{rate:,.0f} | {mb_rate:,.1f} |")
    mb_per_example = mb_rate / rate
    rate = statistics.median(step_rate(setup, cache, layers, args.batch_size) for _ in range(args.repeats))
    lines.append(f"| TED step consumes (2-layer student, batch {args.batch_size}) | {rate:,.0f} | "
                 f"{rate * mb_per_example:,.1f} |")
    print(f"cache: {cache} ({Cache(cache).precision}, layers {layers})")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
