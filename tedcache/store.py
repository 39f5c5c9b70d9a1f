"""The cache format: the only module that knows the zarr layout.

Layout (FORMAT_VERSION 1), one zarr v3 group per cache:

    attrs["tedcache"]            metadata (identity, task, layers, filters, precision, complete flag)
    <split>/offsets      (E+1,)  int64   example i owns tokens offsets[i]:offsets[i+1]   split: train, eval, test
    <split>/input_ids    (T,)    int32   flat tokens, no padding
    <split>/token_type_ids (T,)  int8    when the tokenizer makes them
    <split>/labels       (E,)    int64 class ids | float32 targets
    <split>/example_ids  (E,)    int64   row of the example in the source data (rows are stored shuffled)
    <split>/teacher_logits (E,C) float32
    train/states/<layer> (T, d_f) fp32 | fp16 | bf16-bits-in-uint16   filtered teacher state, one array a layer
    teacher_filters.safetensors / .json   the teacher's Stage-I filters

Per-token arrays share one chunking (inner chunks for reads, shards as the unit of writing).
A cache counts only once attrs["tedcache"]["complete"] is true, written last.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from .errors import TedcacheError

FORMAT_VERSION = 1
SPLITS = ("train", "eval", "test")
STATE_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}
CHUNK_TOKENS = 256


def cache_key(identity: dict) -> str:
    """Hash of everything that determines a cache's content (plus the format version)."""
    payload = json.dumps({"format_version": FORMAT_VERSION, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def encode_states(states: torch.Tensor, precision: str) -> np.ndarray:
    """(n, d) float tensor -> the stored numpy dtype."""
    if precision == "bf16":
        return states.to(torch.bfloat16).view(torch.uint16).cpu().numpy()
    return states.to(torch.float32 if precision == "fp32" else torch.float16).cpu().numpy()


def decode_states(values: np.ndarray, precision: str) -> torch.Tensor:
    """Stored numpy -> compact torch tensor (fp16/bf16/fp32); widen to fp32 late, where it is used."""
    tensor = torch.from_numpy(values)
    return tensor.view(torch.bfloat16) if precision == "bf16" else tensor


class CacheWriter:
    """Creates a cache and writes it split by split; per-token states go out in whole shards."""

    def __init__(self, path: str, metadata: dict, shard_tokens: int):
        self.path = Path(path)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.root = zarr.open_group(str(self.path), mode="w", zarr_format=3)
        self.metadata = {**metadata, "format_version": FORMAT_VERSION, "complete": False}
        self.root.attrs["tedcache"] = self.metadata
        self.shard_tokens = max(CHUNK_TOKENS, shard_tokens // CHUNK_TOKENS * CHUNK_TOKENS)
        self._buffers: dict[str, _ShardBuffer] = {}

    def _array(self, name: str, data: np.ndarray | None = None, shape=None, dtype=None, per_token=False,
               compress=True):
        shape = data.shape if data is not None else shape
        dtype = data.dtype if data is not None else dtype
        if per_token:
            chunks = (CHUNK_TOKENS, *shape[1:])
            shards = (self.shard_tokens, *shape[1:])
        else:
            chunks = (max(1, min(shape[0], 65536)), *shape[1:])
            shards = None
        arr = zarr.create_array(self.root.store, name=name, shape=shape, dtype=dtype, chunks=chunks,
                                shards=shards, compressors=[ZstdCodec(level=1)] if compress else None,
                                config={"write_empty_chunks": True}, zarr_format=3, overwrite=True)
        if data is not None and data.size:
            arr[...] = data
        return arr

    def write_examples(self, split: str, examples, example_ids: np.ndarray, teacher_logits: np.ndarray) -> None:
        """Token ids, offsets, labels, source rows and teacher logits of one split."""
        self._array(f"{split}/offsets", examples.offsets.astype(np.int64))
        self._array(f"{split}/input_ids", examples.input_ids, per_token=True)
        if examples.token_type_ids is not None:
            self._array(f"{split}/token_type_ids", examples.token_type_ids, per_token=True)
        self._array(f"{split}/labels", examples.labels)
        self._array(f"{split}/example_ids", example_ids.astype(np.int64))
        self._array(f"{split}/teacher_logits", teacher_logits.astype(np.float32))

    def start_states(self, split: str, layers: list[int], num_tokens: int, dim: int, precision: str) -> None:
        for layer in layers:
            name = f"{split}/states/{layer}"
            arr = self._array(name, shape=(num_tokens, dim), dtype=STATE_DTYPES[precision], per_token=True,
                              compress=False)  # dense activations barely compress and reads slow down
            self._buffers[name] = _ShardBuffer(arr, self.shard_tokens)

    def append_states(self, split: str, layers: list[int], states: list[np.ndarray]) -> None:
        """Append the next tokens' states (in token order) for each layer."""
        for layer, values in zip(layers, states):
            self._buffers[f"{split}/states/{layer}"].append(values)

    def save_filters(self, bank) -> None:
        bank.save(self.path, "teacher_filters")

    def complete(self) -> None:
        for buffer in self._buffers.values():
            buffer.flush()
        self.metadata["complete"] = True
        self.root.attrs["tedcache"] = self.metadata


class _ShardBuffer:
    """Collects rows in order and writes each shard once, whole (a partial shard write is a read-modify-write)."""

    def __init__(self, array, shard_tokens: int):
        self.array, self.shard_tokens = array, shard_tokens
        self.start, self.pending, self.count = 0, [], 0

    def append(self, rows: np.ndarray) -> None:
        self.pending.append(rows)
        self.count += len(rows)
        if self.count >= self.shard_tokens:
            rows = np.concatenate(self.pending)
            whole = len(rows) // self.shard_tokens * self.shard_tokens
            self.array[self.start:self.start + whole] = rows[:whole]
            self.start += whole
            self.pending, self.count = [rows[whole:]], len(rows) - whole

    def flush(self) -> None:
        if self.count:
            self.array[self.start:self.start + self.count] = np.concatenate(self.pending)
            self.start += self.count
            self.pending, self.count = [], 0
        if self.start != self.array.shape[0]:
            raise RuntimeError(f"wrote {self.start} of {self.array.shape[0]} rows to {self.array.name}")


@dataclass
class Split:
    """Read access to one split of a cache."""

    group: zarr.Group
    name: str

    def __post_init__(self):
        self.offsets = self.group["offsets"][...]
        self.labels = self.group["labels"][...]
        self.teacher_logits = self.group["teacher_logits"][...]
        self.example_ids = self.group["example_ids"][...]
        self.has_token_types = "token_type_ids" in self.group

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def tokens(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.group[name][start:stop]

    def states(self, layer: int, start: int, stop: int) -> np.ndarray:
        return self.group[f"states/{layer}"][start:stop]


class Cache:
    """An opened, complete cache of the current format."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.metadata = read_metadata(path)
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise TedcacheError(f"{path} is cache format {self.metadata.get('format_version')}, this tedcache "
                                f"reads format {FORMAT_VERSION}; rebuild it with tedcache extract --force")
        if not self.metadata.get("complete"):
            raise TedcacheError(f"{path} is incomplete (its extraction did not finish); re-run the tedcache "
                                "extract command that made it to finish it")
        self.root = zarr.open_group(str(self.path), mode="r", zarr_format=3)

    @property
    def layers(self) -> list[int]:
        return list(self.metadata["layers"])

    def split(self, name: str) -> Split | None:
        return Split(self.root[name], name) if name in self.root else None

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def read_metadata(path: str) -> dict:
    """The cache's metadata, or a one-line error when the path is no tedcache cache."""
    if not Path(path).is_dir():
        raise TedcacheError(f"cache {path} does not exist; run tedcache extract first and pass the path it prints")
    try:
        root = zarr.open_group(str(path), mode="r", zarr_format=3)
        return dict(root.attrs["tedcache"])
    except Exception as exc:
        raise TedcacheError(f"{path} is not a tedcache cache (no readable metadata); pass the folder that "
                            "tedcache extract printed") from exc
