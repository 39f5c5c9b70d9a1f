"""Content hashes of data tables and arrays: a data set's part of a cache's identity."""

from __future__ import annotations

import hashlib
import json

import numpy as np

HASHED_ROWS = 10_000  # rows per update of a data fingerprint (part of its value: changing it changes cache keys)


def table_digest(columns: list[str | None]):
    """A running content hash of `columns` of a table, fed chunk by chunk with `hash_rows`."""
    digest = hashlib.sha256()
    for col in columns:
        if col is not None:
            digest.update(col.encode())
    return digest


def hash_rows(digest, rows: dict, columns: list[str | None]) -> None:
    for col in columns:
        if col is not None:
            digest.update(json.dumps(rows[col], default=str).encode())


def hash_array(values: np.ndarray, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    for start in range(0, len(values), chunk):  # (a memory-mapped array is read a chunk at a time)
        digest.update(np.ascontiguousarray(values[start:start + chunk]).tobytes())
    return digest.hexdigest()[:16]
