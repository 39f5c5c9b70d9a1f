"""Cache read throughput against what a distill step consumes, on the embedded default.

Reads one epoch of the demo cache through the real reader (in-process, and with DataLoader workers)
and times TED steps of the 2-layer student on batches already in memory; prints examples/s and MB/s
(compact bytes delivered), medians of --repeats runs.
  python examples/reader_throughput.py [--workdir DIR] [--repeats 3]

With --s3, the same cache (or --cache, any local cache) is copied to an S3-compatible server that this
script starts on loopback (moto, from the test extra), and the reader is timed from there against the
local disk, reading 0 (one window at a time), 1 and 8 windows ahead:
  python examples/reader_throughput.py --s3 [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tedcache.cache import Cache
from tedcache.demos.bench import read_throughput
from tedcache.demos.demo import QUICK_DEMO, prepare
from tedcache.filters import FilterBank, FilterSpec
from tedcache.layer_maps import map_layers
from tedcache.loop import adamw
from tedcache.losses import Stage2Loss
from tedcache.models import load_classifier
from tedcache.reader import CacheBatches
from tedcache.stage2 import stage2_step
from tedcache.taps import hidden_size


def step_rate(setup, cache: str, layers: list[int], batch_size: int, steps: int = 12) -> float:
    """Examples per second a TED step consumes (batches pre-read, so no I/O is timed)."""
    meta = Cache(cache).metadata
    student = load_classifier(setup.student, "student", meta.task, meta.label_names)
    s_layers, _ = map_layers([0, 1], Cache(cache).layers, "interval", 2)
    bank = FilterBank(FilterSpec(s_layers, hidden_size(student), meta.filter_dim))
    params = list(student.parameters()) + list(bank.parameters())
    optimizer = adamw(params, 1e-5)
    loss_of = Stage2Loss(meta.task, "ted", filters=bank)
    batches = []
    for batch in CacheBatches(cache, "train", layers, batch_size, shuffle=True, seed=1):
        batches.append(batch)
        if len(batches) == steps:
            break
    times = []
    student.train()
    for batch in batches:
        started = time.perf_counter()
        loss, _ = stage2_step(student, loss_of, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return batch_size / statistics.median(times[2:])


def from_s3(cache: str, layers: list[int], batch_size: int, repeats: int) -> list[str]:
    """Table rows: the reader from the local disk and from a moto S3 server on loopback, by read-ahead."""
    import fsspec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        store = fsspec.filesystem("s3")
        store.mkdir("bench")
        store.put(cache.rstrip("/") + "/", "bench/cache/", recursive=True)
        rows = []
        for where, url in (("local disk", cache), ("S3 (moto, loopback)", "s3://bench/cache")):
            for ahead in (0, 1, 8):
                runs = [read_throughput(url, layers, batch_size, read_ahead=ahead) for _ in range(repeats)]
                rows.append(f"| {where}, {ahead} windows ahead | {statistics.median(r[0] for r in runs):,.0f} | "
                            f"{statistics.median(r[1] for r in runs):,.1f} |")
        return rows
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "tedcache" / "demo"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--s3", action="store_true", help="time the reader from a loopback S3 server too")
    parser.add_argument("--cache", help="with --s3: a local cache to copy there (default: the demo's)")
    args = parser.parse_args()
    from tedcache import extract

    lines = ["| reader | examples/s | MB/s (compact) |", "|---|---|---|"]
    if args.s3:
        cache = args.cache or extract(prepare(args.workdir, QUICK_DEMO, seed=42).extract_config(42))
        layers = Cache(cache).layers
        print(f"cache: {cache} ({Cache(cache).precision}, layers {layers})")
        print("\n".join(lines + from_s3(cache, layers, args.batch_size, args.repeats)))
        return
    setup = prepare(args.workdir, QUICK_DEMO, seed=42)
    cache = extract(setup.extract_config(42))
    layers = Cache(cache).layers
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
