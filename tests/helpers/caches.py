"""Caches the tests build from the tiny models, and comparisons of two caches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zarr

from tedcache import DataConfig, ExtractConfig, OptimConfig, extract
from tedcache.config import FilterConfig


def extract_classifier(assets, tmp_path, **kw) -> tuple[ExtractConfig, str]:
    """The tiny classifier teacher's cache (train, eval and test rows; 24 tokens; 256-token shards)."""
    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], test=[str(assets["test"])],
                      max_length=24)
    cfg = ExtractConfig(teacher=str(assets["teacher"]), data=data, cache_dir=str(tmp_path / "caches"),
                        stage1=OptimConfig(epochs=1, lr=1e-3, batch_size=16), batch_size=16, shard_tokens=256, **kw)
    return cfg, extract(cfg)


def extract_lm(lm_assets, tmp_path, family="llama", **kw) -> tuple[ExtractConfig, str]:
    """A tiny causal LM's cache (16-token blocks, filters on layers 1 and 3, fp32, top-8 logits)."""
    data = DataConfig(train=[str(lm_assets["train"])], eval=[str(lm_assets["eval"])], test=[str(lm_assets["test"])],
                      task="causal-lm", block_size=16)
    defaults = dict(filters=FilterConfig(layers="1,3", dim=24), precision="fp32", logits="topk:8")
    cfg = ExtractConfig(teacher=str(lm_assets[family]), data=data, cache_dir=str(tmp_path / "caches"),
                        stage1=OptimConfig(epochs=1, lr=1e-2, batch_size=8), batch_size=8, shard_tokens=128,
                        **{**defaults, **kw})
    return cfg, extract(cfg)


def cache_contents(path: str) -> tuple[dict, dict[str, np.ndarray], dict[str, dict]]:
    """Metadata (less timings and the folder it was written to), every array, and every unit record of a cache."""
    root = zarr.open_group(path, mode="r")
    meta = {k: v for k, v in root.attrs["tedcache"].items() if k != "timings"}
    # where each run wrote, and how it placed its teacher
    meta["config"] = {k: v for k, v in meta["config"].items() if k not in ("cache_dir", "device_map", "offload_dir")}
    arrays = {name: arr[...] for name, arr in root.members(max_depth=None) if isinstance(arr, zarr.Array)}
    records = {str(p.relative_to(path)): json.loads(p.read_text()) for p in Path(path).glob("units/*/*.json")}
    return meta, arrays, records


def assert_same_cache(a: str, b: str) -> None:
    """Two caches hold the same metadata, arrays and unit records."""
    meta_a, arrays_a, records_a = cache_contents(a)
    meta_b, arrays_b, records_b = cache_contents(b)
    assert meta_a == meta_b and meta_a["complete"]
    assert sorted(arrays_a) == sorted(arrays_b) and any(k.startswith("train/states/") for k in arrays_a)
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)
    assert records_a == records_b and len(records_a) > 10


def stored_files(path: str) -> dict[str, bytes]:
    """Every object of a cache but its metadata (which records the config, writer included, and timings)."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(Path(path).rglob("*"))
            if f.is_file() and f.name != "zarr.json"}
