"""Looking after a folder of caches: list them, inspect one, remove one, collect the unfinished ones."""

from __future__ import annotations

from ..errors import TedcacheError
from .claims import CacheLock, describe, readers
from .location import Location
from .metadata import load_metadata
from .read import Cache, storage_sizes


def list_caches(cache_dir: str) -> list[dict]:
    """One summary per cache folder under `cache_dir` (folders without readable tedcache metadata are skipped)."""
    root = Location(cache_dir)
    rows = []
    for name in root.listdir():
        location = root.child(name)
        try:
            meta = load_metadata(location)
        except TedcacheError:
            continue
        writing = CacheLock(location).holder()
        rows.append({"path": location.url, "teacher": meta.teacher, "data": ",".join(meta.data.get("train") or []),
                     "layers": meta.layers, "states": meta.states, "precision": meta.precision,
                     "bytes_on_disk": location.size(), "complete": meta.complete,
                     "writing": describe(writing) if writing else None,
                     "reading": [describe(reader) for reader in readers(location)]})
    return rows


def inspect_cache(url: str, sample_units: int = 1) -> dict:
    """Metadata plus sizes, counts, bytes per cached value and per-layer statistics of the stored states
    (decoded, over the real tokens of the first `sample_units` units)."""
    location = Location(url)
    meta = load_metadata(location)
    info = {**meta.to_dict(), "path": location.url}
    info.pop("checksums")
    info.update(storage_sizes(location, meta))
    if meta.complete:
        cache = Cache(url)
        info["layer_stats"] = cache.layer_stats(sample_units)
        if meta.logits:
            info["mean_ids_per_token"] = cache.mean_ids_per_token()
    return info


def remove_cache(url: str, force: bool = False) -> None:
    """Delete a cache; refused while an extraction writes it or a run reads it, unless `force`."""
    location = Location(url)
    load_metadata(location)  # refuse to delete something that is not a cache
    holder = CacheLock(location).holder()
    if holder and not force:
        raise TedcacheError(f"{url} is being written by {describe(holder)}; stop that extraction first, or pass "
                            "--force to remove it anyway")
    reading = readers(location)
    if reading and not force:
        raise TedcacheError(f"{url} is being read by {'; '.join(map(describe, reading))}; wait for "
                            f"{'them' if len(reading) > 1 else 'it'} to finish, or pass --force to remove it anyway "
                            "(a reader then stops with an error, its checkpoint kept)")
    location.remove()


def collect_garbage(cache_dir: str) -> list[str]:
    """Remove every incomplete cache that no live extraction writes and no run reads; returns their paths."""
    removed = []
    for row in list_caches(cache_dir):
        if not row["complete"] and not row["writing"] and not row["reading"]:
            Location(row["path"]).remove()
            removed.append(row["path"])
    return removed
