"""Looking after caches: list them, inspect one, remove one, collect the unfinished ones."""

from __future__ import annotations

import numpy as np
import torch

from .errors import TedcacheError
from .store import FORMAT_VERSION, Cache, CacheLock, CompactStates, Location, decode_values, read_metadata


def list_caches(cache_dir: str) -> list[dict]:
    """One summary per cache folder under `cache_dir` (folders without tedcache metadata are skipped)."""
    root = Location(cache_dir)
    rows = []
    for name in root.listdir():
        location = root.child(name)
        try:
            meta = read_metadata(location)
        except TedcacheError:
            continue
        writing = CacheLock(location).holder()
        rows.append({"path": location.url, "teacher": meta.get("teacher"),
                     "data": ",".join(meta.get("data", {}).get("train") or []), "layers": meta.get("layers"),
                     "states": meta.get("states", "filtered"), "precision": meta.get("precision"),
                     "bytes_on_disk": location.size(), "complete": bool(meta.get("complete")),
                     "writing": f"pid {writing['pid']} on {writing['host']}" if writing else None})
    return rows


def inspect_cache(url: str, sample_units: int = 1) -> dict:
    """Metadata plus sizes, counts, bytes per cached value and per-layer statistics of the stored states
    (decoded, over the real tokens of the first `sample_units` units)."""
    location = Location(url)
    meta = read_metadata(location)
    info = {**meta, "path": location.url, "bytes_on_disk": location.size()}
    info.pop("checksums", None)
    train_tokens = (meta.get("tokens") or {}).get("train", 0)
    values = train_tokens * len(meta.get("layers", [])) * meta.get("filter_dim", 0)
    state_bytes = sum(location.fs.du(location.path(f"train/{part}")) for part in
                      ("states", "token_scales", "channel_scales") if location.exists(f"train/{part}"))
    info.update({"examples": (meta.get("splits") or {}).get("train", 0), "tokens": train_tokens,
                 "values_stored": values, "state_bytes": int(state_bytes),
                 "bytes_per_value": state_bytes / values if values else None,
                 "compression_vs_fp32": 4 * values / state_bytes if state_bytes else None})
    if location.exists("train/logits"):
        logit_bytes = location.fs.du(location.path("train/logits"))
        info.update({"logit_bytes": int(logit_bytes),
                     "logit_bytes_per_token": logit_bytes / train_tokens if train_tokens else None})
    if meta.get("complete") and meta.get("format_version") == FORMAT_VERSION:
        cache = Cache(url)
        info["layer_stats"] = _layer_stats(cache, sample_units)
        if meta.get("logits"):
            ids = cache.split("train").group["logits/ids"][:min(train_tokens, meta["shard_tokens"])]
            used = (ids >= 0).sum(-1)
            info["mean_ids_per_token"] = float(used[used > 0].mean())  # over the first unit's real tokens
    return info


def _layer_stats(cache: Cache, sample_units: int) -> dict:
    split = cache.split("train")
    bounds = split.group["unit_bounds"][...]
    last = int(bounds[min(sample_units, len(bounds) - 1)])
    if last == 0:
        return {}
    stop = int(split.starts[last - 1] + split.lengths[last - 1])
    real = np.zeros(stop, dtype=bool)
    for start, length in zip(split.starts[:last], split.lengths[:last]):
        real[start:start + length] = True
    stats = {}
    for layer in cache.layers:
        values, scales = split.states(layer, 0, stop)
        states = CompactStates(decode_values(values[real], cache.precision),
                               None if scales is None else torch.from_numpy(scales[real]),
                               split.channel_scale(layer)).widen()
        stats[str(layer)] = {"mean": float(states.mean()), "std": float(states.std()),
                             "rms": float(states.pow(2).mean().sqrt()), "absmax": float(states.abs().max()),
                             "tokens_sampled": int(real.sum())}
    return stats


def remove_cache(url: str) -> None:
    location = Location(url)
    read_metadata(location)  # refuse to delete something that is not a cache
    holder = CacheLock(location).holder()
    if holder:
        raise TedcacheError(f"{url} is being written by pid {holder['pid']} on {holder['host']}; stop that "
                            "extraction first")
    location.remove()


def collect_garbage(cache_dir: str) -> list[str]:
    """Remove every incomplete cache that no live extraction is writing; returns their paths."""
    removed = []
    for row in list_caches(cache_dir):
        if not row["complete"] and not row["writing"]:
            Location(row["path"]).remove()
            removed.append(row["path"])
    return removed
