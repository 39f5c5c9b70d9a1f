"""Extraction throughput against the teacher's bare forward over the same batches, for `tedcache bench`'s
pairs at several data sizes (docs/performance.md, "Extraction on a GPU"). Appends one JSON line per run.

    python examples/extraction_vs_forward.py WORKDIR OUT.jsonl minilm,bert 1024:1,4096:2 [process,thread,thread+compile]

The fourth argument lists examples:repeats; the optional fifth the variants run in turn within each
repeat: a --writer kind, with "+compile" for extract --compile (default: process). The reference is
always the eager teacher's bare forward. Set TEDCACHE_BENCH_MINILM to a folder with MiniLM's config and
tokenizer on machines without the model package (timing depends on shapes only)."""

import json
import sys
from dataclasses import replace
from pathlib import Path

from tedcache import extract
from tedcache.cache import Cache
from tedcache.demos import bench


def main(work: Path, out: Path, pairs: list[str], sizes: list[tuple[int, int]], variants: list[str]) -> None:
    for pair in pairs:
        teacher, _ = bench._pair_dirs(work, pair)
        for examples, repeats in sizes:
            cfg = bench._extract_config(work, pair, teacher, bench._data(work, examples))
            for repeat, variant in ((r, v) for r in range(repeats) for v in variants):
                writer, *flags = variant.split("+")
                # rebuilt, so its teacher pass is timed here; Stage I live (and short), so that the pass runs the
                # teacher rather than reading Stage I's stored states
                cache = extract(replace(cfg, force=True, writer=writer, compile="compile" in flags, stage1_states="live",
                                        stage1=replace(cfg.stage1, epochs=0.1)))
                timings = Cache(cache).metadata.timings
                forward = bench.bare_forward_seconds(cfg, cache)
                row = dict(pair=pair, examples=examples, repeat=repeat, variant=variant, units=Cache(cache).metadata.units,
                           pass_s=timings["teacher_pass_s"], forward_s=forward,
                           extract_over_forward=forward / timings["teacher_pass_s"])
                print(json.dumps(row), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    work_dir, out_file, pair_list, size_list = sys.argv[1:5]
    main(Path(work_dir), Path(out_file), pair_list.split(","),
         [tuple(int(x) for x in size.split(":")) for size in size_list.split(",")],
         sys.argv[5].split(",") if len(sys.argv) > 5 else ["process"])
