"""Cache read throughput against what a stage-two step consumes, on the embedded default.

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
from torch.utils.data import DataLoader

from tedcache.demo import QUICK, prepare
from tedcache.distillation import map_layers, stage2_loss
from tedcache.filters import FilterBank, FilterSpec
from tedcache.models import load_classifier
from tedcache.reader import CacheBatches
from tedcache.store import Cache
from tedcache.taps import hidden_size


def read_epoch(cache: str, layers: list[int], batch_size: int, workers: int) -> tuple[float, float, int]:
    """(seconds, compact MB delivered, examples) for one shuffled epoch."""
    dataset = CacheBatches(cache, "train", layers, batch_size, shuffle=True, seed=0)
    started, nbytes, examples = time.perf_counter(), 0, 0
    for batch in DataLoader(dataset, batch_size=None, num_workers=workers):
        examples += len(batch["labels"])
        for s in batch["teacher_states"]:
            nbytes += s.values.nbytes + (s.token_scale.nbytes if s.token_scale is not None else 0)
        nbytes += batch["input_ids"].nbytes
    return time.perf_counter() - started, nbytes / 1e6, examples


def step_rate(setup, cache: str, layers: list[int], batch_size: int, steps: int = 12) -> float:
    """Examples per second a TED step consumes (batches pre-read, so no I/O is timed)."""
    meta = Cache(cache).metadata
    student = load_classifier(setup.student, "student", meta["task"], meta["label_names"])
    s_layers, _ = map_layers([0, 1], Cache(cache).layers, None, 2)
    bank = FilterBank(FilterSpec(s_layers, hidden_size(student), meta["filter_dim"]))
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
        loss, _ = stage2_loss(student, bank, batch, cfg, meta["task"])
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
    lines = ["| reader | examples/s | MB/s (compact) | epoch s |", "|---|---|---|---|"]
    for workers in (0, 2):
        runs = [read_epoch(cache, layers, args.batch_size, workers) for _ in range(args.repeats)]
        seconds = statistics.median(r[0] for r in runs)
        mb, examples = runs[0][1], runs[0][2]
        lines.append(f"| {'in-process' if workers == 0 else f'{workers} DataLoader workers'} | "
                     f"{examples / seconds:,.0f} | {mb / seconds:,.1f} | {seconds:.2f} |")
    rate = statistics.median(step_rate(setup, cache, layers, args.batch_size) for _ in range(args.repeats))
    lines.append(f"| TED step consumes (2-layer student, batch {args.batch_size}) | {rate:,.0f} | "
                 f"{rate * mb / examples:,.1f} | — |")
    print(f"cache: {cache} ({Cache(cache).precision}, layers {layers})")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
