"""Bytes per token of each `--logits` option on the causal-LM demo's data (SmolLM2-135M teacher).

Builds one small cache per option through the real `extract` path (raw states of the last layer only,
so no Stage I runs) and reads the sizes back with `inspect_cache`. Run after `make demo-lm` (which
converts the teacher and writes the data files):

    python examples/logit_storage.py [--workdir ~/.cache/tedcache/demo] [--blocks 64]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tedcache import extract
from tedcache.cache import inspect_cache
from tedcache.config import DataConfig, ExtractConfig, FilterConfig
from tedcache.demos.demo_lm import QUICK_LM_DEMO, smollm2, snippet_texts

OPTIONS = [("sample:50", 2.0), ("sample:50", 1.0), ("sample:20", 2.0), ("topk:25", 2.0), ("topk:50", 2.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "tedcache" / "demo"))
    parser.add_argument("--blocks", type=int, default=64)
    args = parser.parse_args()
    root = Path(args.workdir)
    teacher = smollm2(root / "smollm2-135m-instruct")
    files = snippet_texts(root / "logit-storage" / "data", QUICK_LM_DEMO)
    data = DataConfig(train=[files["train"]], task="causal-lm", block_size=QUICK_LM_DEMO.block_size, limit=args.blocks)
    print("| --logits | sampling T | ids per token (mean) | logit bytes / token |")
    print("|---|---|---|---|")
    for option, temperature in OPTIONS:
        cache = extract(ExtractConfig(teacher=teacher, data=data, filters=FilterConfig(layers="29"), states="raw",
                                      logits=option, logits_temperature=temperature, batch_size=16,
                                      cache_dir=str(root / "logit-storage" / "caches")))
        info = inspect_cache(cache)
        shown_t = f"{temperature:g}" if option.startswith("sample") else "-"
        print(f"| {option} | {shown_t} | {info['mean_ids_per_token']:.1f} | {info['logit_bytes_per_token']:.1f} |")
    vocab = info["vocab_size"]
    print(f"| full (refused above 8,192 ids) | - | {vocab} | {vocab * 2:,} as fp16 values alone |")


if __name__ == "__main__":
    main()
