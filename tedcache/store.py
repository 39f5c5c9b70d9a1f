"""The cache format: the only module that knows the zarr layout.

Layout (FORMAT_VERSION 3), one zarr v3 group per cache, on local disk or behind an fsspec URL:

    attrs["tedcache"]              metadata: identity, task, layers, filters, precision, checksums, complete
    <split>/starts     (E,)        int64   first token of example i            split: train, eval, test
    <split>/lengths    (E,)        int32   its token count (no padding on disk)
    <split>/unit_bounds (U+1,)     int64   unit u owns examples unit_bounds[u]:unit_bounds[u+1]
    <split>/input_ids  (N,)        int32   tokens; examples never straddle a shard of S tokens; N <= U*S
    <split>/token_type_ids (N,)    int8    when the tokenizer makes them
    <split>/labels     (E,)        int64 class ids | float32 targets (not for causal-lm)
    <split>/example_ids (E,)       int64   source row of each example (training rows are stored shuffled)
    <split>/teacher_logits (E, C)  float32 classification/regression (written when every unit is done)
    <split>/teacher_nll (E,)       float32 causal-lm: the teacher's mean next-token loss on each block
    train/states/<layer> (N, d)    fp32 | fp16 | bf16 bits in uint16 | int8
    train/token_scales/<layer> (N,)    fp16     int8 only: per-token scale
    train/channel_scales/<layer> (d,)  float32  int8 only: per-channel scale, calibrated per layer
    train/logits/ids (N, S)        int8|16|32 causal-lm: sparse teacher distribution per token (-1 = unused)
    train/logits/logprobs (N, S)   fp16     the teacher's log-probabilities at those ids
    train/logits/counts (N, S)     uint8    sample:N only: draws of each id
    teacher_filters.safetensors / .json   the teacher's Stage-I filters (saved before the teacher pass)
    units/<split>/<u>.json         done-marker of unit u: its per-example teacher outputs and the sha256
                                   of every shard object it wrote (written last, atomically)
    .lock                          who is writing (host, pid), while an extraction runs

Per-token arrays share one chunking: inner chunks for random reads, shards of S tokens as the unit of
writing. A unit is one shard of tokens, written whole by one writer, so a crash loses at most the
units in flight and concurrent writers never share a shard. The cache counts only once
attrs["tedcache"]["complete"] is true, written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import socket
import time
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import ZstdCodec

from .errors import TedcacheError

FORMAT_VERSION = 3
SPLITS = ("train", "eval", "test")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
STATE_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16, "int8": np.int8}
CHUNK_TOKENS = 256


def cache_key(identity: dict) -> str:
    """Hash of everything that determines a cache's content (plus the format version)."""
    payload = json.dumps({"format_version": FORMAT_VERSION, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- where a cache lives


class Location:
    """A cache folder: a local path or an fsspec URL (s3://bucket/prefix; endpoint and credentials come
    from the usual AWS_* variables or FSSPEC_S3_* settings)."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def child(self, name: str) -> "Location":
        return Location(f"{self.url}/{name}")

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel) if rel else self.root)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic: a local file is renamed into place; an object store publishes whole objects."""
        target = self.path(rel)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if self.local:
            staging = f"{target}.tmp-{os.getpid()}"
            with open(staging, "wb") as f:
                f.write(data)
            os.replace(staging, target)
        else:
            self.fs.pipe_file(target, data)

    def remove(self, rel: str = "") -> None:
        target = self.path(rel) if rel else self.root
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def listdir(self, rel: str = "") -> list[str]:
        target = self.path(rel) if rel else self.root
        if not self.fs.exists(target):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(target, detail=False))

    def size(self) -> int:
        return int(self.fs.du(self.root)) if self.exists() else 0

    def zarr_store(self, read_only: bool):
        if self.local:
            return zarr.storage.LocalStore(self.root, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url, read_only=read_only)

    def __str__(self) -> str:
        return self.url


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- packing examples into shards


def pack(lengths: np.ndarray, shard_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Place examples in order so that none straddles a shard. Returns (starts (E,), unit_bounds (U+1,))."""
    starts = np.empty(len(lengths), dtype=np.int64)
    bounds = [0]
    position, shard_end = 0, shard_tokens
    for i, length in enumerate(lengths.tolist()):
        if position + length > shard_end:
            bounds.append(i)
            position, shard_end = shard_end, shard_end + shard_tokens
        starts[i] = position
        position += length
    bounds.append(len(lengths))
    return starts, np.asarray(bounds if len(lengths) else [0, 0], dtype=np.int64)


# ---------------------------------------------------------------- state precision


def calibrate_channel_scales(states: torch.Tensor) -> torch.Tensor:
    """Per-channel RMS over calibration tokens (n, d): dividing by it puts every channel on one scale."""
    return states.float().pow(2).mean(0).sqrt().clamp_min(1e-6)


def encode_states(states: torch.Tensor, precision: str, channel_scale: torch.Tensor | None = None):
    """(n, d) float -> (stored values, per-token scales or None). int8: x / channel_scale, then a per-token
    absmax scale (stored in fp16; quantisation uses the rounded scale so decoding is exact to it)."""
    if precision == "int8":
        normalised = states.float() / channel_scale
        token_scale = (normalised.abs().amax(-1) / 127).clamp_min(2 ** -14).half()
        q = torch.round(normalised / token_scale.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        return q.numpy(), token_scale.numpy()
    if precision == "bf16":
        return states.to(torch.bfloat16).view(torch.uint16).numpy(), None
    return states.to(torch.float32 if precision == "fp32" else torch.float16).numpy(), None


@dataclass
class CompactStates:
    """Cached states as stored, (B, L, d), plus what decoding needs; `widen` dequantises where it is
    called (after the move to the training device, so the transfer stays compact)."""

    values: torch.Tensor
    token_scale: torch.Tensor | None = None  # (B, L) fp16, int8 only
    channel_scale: torch.Tensor | None = None  # (d,) fp32, int8 only

    def to(self, device, non_blocking: bool = False) -> "CompactStates":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return CompactStates(move(self.values), move(self.token_scale), move(self.channel_scale))

    def widen(self, dtype=torch.float32) -> torch.Tensor:
        if self.values.dtype == torch.int8:
            return (self.values.to(dtype) * self.token_scale.to(dtype).unsqueeze(-1)) * self.channel_scale.to(dtype)
        return self.values.to(dtype)


def decode_values(values: np.ndarray, precision: str) -> torch.Tensor:
    tensor = torch.from_numpy(values)
    return tensor.view(torch.bfloat16) if precision == "bf16" else tensor


# ---------------------------------------------------------------- writing


class CacheWriter:
    """Creates a cache (or reopens an unfinished one), then writes it unit by unit.

    Order: metadata (complete=false) -> token arrays -> filters -> [int8 channel scales, from the first
    unit's states] -> units (each ending with its record) -> teacher logits gathered from the records ->
    complete=true."""

    def __init__(self, location: Location, metadata: dict | None = None):
        self.location = location
        self.root = zarr.open_group(store=location.zarr_store(read_only=False), mode="a", zarr_format=3)
        self.metadata = metadata if metadata is not None else dict(self.root.attrs["tedcache"])

    @classmethod
    def create(cls, location: Location, metadata: dict, shard_tokens: int) -> "CacheWriter":
        for name in location.listdir():
            if name != ".lock":  # the caller holds it
                location.remove(name)
        metadata = {**metadata, "format_version": FORMAT_VERSION, "complete": False, "inputs_written": False,
                    "shard_tokens": shard_tokens,  # inner chunks must tile a shard
                    "chunk_tokens": CHUNK_TOKENS if shard_tokens % CHUNK_TOKENS == 0 else shard_tokens,
                    "checksums": {}}
        writer = cls(location, metadata)
        writer._save_metadata()
        return writer

    def _save_metadata(self) -> None:
        self.root.attrs["tedcache"] = self.metadata

    def _create(self, name: str, shape, dtype, per_token: bool, compress: bool = True):
        if per_token:
            inner = self.metadata["chunk_tokens"]
            chunks, shards = (inner, *shape[1:]), (self.metadata["shard_tokens"], *shape[1:])
        else:
            chunks, shards = (max(1, min(shape[0], 1 << 16)), *shape[1:]), None
        return zarr.create_array(self.root.store, name=name, shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                                 compressors=[ZstdCodec(level=1)] if compress else None,
                                 config={"write_empty_chunks": True}, zarr_format=3, overwrite=True)

    def _write_whole(self, name: str, data: np.ndarray, per_token: bool = False) -> None:
        """Write an array in one go and record the checksum of every object it made."""
        arr = self._create(name, data.shape, data.dtype, per_token)
        if data.size:
            arr[...] = data
        self.metadata["checksums"].update(self._object_checksums(arr))

    def _object_checksums(self, arr, coords: list[tuple] | None = None) -> dict[str, str]:
        if coords is None:
            grid = [-(-s // c) for s, c in zip(arr.shape, arr.shards or arr.chunks)]
            coords = [tuple(c) for c in np.ndindex(*grid)]
        result = {}
        for coord in coords:
            key = posixpath.join(arr.path, arr.metadata.encode_chunk_key(coord))
            if self.location.exists(key):
                result[key] = sha256(self.location.read_bytes(key))
        return result

    def write_inputs(self, split: str, examples, example_ids: np.ndarray) -> None:
        """Tokens (packed into shards), lengths, labels and source rows of one split."""
        lengths = np.diff(examples.offsets)
        shard = self.metadata["shard_tokens"]
        if len(lengths) and lengths.max() > shard:
            raise TedcacheError(f"an example has {lengths.max()} tokens, more than a shard ({shard}); "
                                "raise --shard-tokens or lower --max-length")
        starts, bounds = pack(lengths, shard)
        units = len(bounds) - 1
        slots = int(starts[-1] + lengths[-1]) if len(lengths) else 0  # the last shard ends at its last token
        placed = np.zeros(slots, dtype=np.int64)  # token index of each slot (gaps stay 0)
        used = np.zeros(slots, dtype=bool)
        for begin, start, length in zip(examples.offsets[:-1], starts, lengths):
            placed[start:start + length] = np.arange(begin, begin + length)
            used[start:start + length] = True
        input_ids = np.where(used, examples.input_ids[placed] if len(examples.input_ids) else 0, 0).astype(np.int32)
        self._write_whole(f"{split}/input_ids", input_ids, per_token=True)
        if examples.token_type_ids is not None:
            token_types = np.where(used, examples.token_type_ids[placed], 0).astype(np.int8)
            self._write_whole(f"{split}/token_type_ids", token_types, per_token=True)
        self._write_whole(f"{split}/starts", starts)
        self._write_whole(f"{split}/lengths", lengths.astype(np.int32))
        self._write_whole(f"{split}/unit_bounds", bounds)
        if examples.labels is not None:
            self._write_whole(f"{split}/labels", examples.labels)
        self._write_whole(f"{split}/example_ids", example_ids.astype(np.int64))
        self.metadata.setdefault("units", {})[split] = units
        self.metadata.setdefault("slots", {})[split] = slots

    def finish_inputs(self) -> None:
        self.metadata["inputs_written"] = True
        self._save_metadata()

    def save_filters(self, bank) -> None:
        for suffix, data in bank.to_bytes().items():
            self.location.write_bytes(f"teacher_filters{suffix}", data)

    def save_channel_scales(self, layers: list[int], scales: list[torch.Tensor]) -> None:
        for layer, scale in zip(layers, scales):
            self._write_whole(f"train/channel_scales/{layer}", scale.numpy().astype(np.float32))
        self._save_metadata()

    def create_logit_arrays(self, width: int, dtypes: dict[str, np.dtype]) -> None:
        """Per-token sparse teacher distributions (causal-lm), `width` slots a token; compressed, since
        sampled rows are mostly unused slots."""
        tokens = self.metadata["slots"]["train"]
        for name, dtype in dtypes.items():
            self._create(f"train/logits/{name}", (tokens, width), dtype, per_token=True)

    def create_state_arrays(self, layers: list[int], dim: int) -> None:
        precision = self.metadata["precision"]
        tokens = self.metadata["slots"]["train"]
        for layer in layers:
            self._create(f"train/states/{layer}", (tokens, dim), STATE_DTYPES[precision], per_token=True,
                         compress=False)  # dense activations barely compress and reads slow down
            if precision == "int8":
                self._create(f"train/token_scales/{layer}", (tokens,), np.float16, per_token=True, compress=False)

    def write_unit(self, split: str, unit: int, outputs: dict[str, list],
                   token_arrays: dict[str, np.ndarray | None] | None = None) -> None:
        """Write one unit's token-array shards (whole; `token_arrays` maps an array name under the split to
        the unit's rows), then its record holding the per-example `outputs`: the unit's done-marker."""
        shard = self.metadata["shard_tokens"]
        checksums = {}
        for name, data in (token_arrays or {}).items():
            if data is None:
                continue
            arr = self.root[f"{split}/{name}"]
            stop = min((unit + 1) * shard, arr.shape[0])  # the last shard may be short
            arr[unit * shard:stop] = data[:stop - unit * shard]
            checksums.update(self._object_checksums(arr, [(unit,) + (0,) * (data.ndim - 1)]))
        record = {"split": split, "unit": unit, "outputs": outputs, "checksums": checksums}
        self.location.write_bytes(unit_record(split, unit), json.dumps(record).encode())

    def done_units(self, split: str) -> set[int]:
        return {int(name.split(".")[0]) for name in self.location.listdir(f"units/{split}") if name.endswith(".json")}

    def complete(self) -> None:
        """Gather the per-example teacher outputs from the unit records, then mark the cache complete."""
        for split, units in self.metadata["units"].items():
            records = [json.loads(self.location.read_bytes(unit_record(split, u))) for u in range(units)]
            for key in records[0]["outputs"] if records else []:
                rows = np.asarray([row for r in records for row in r["outputs"][key]], dtype=np.float32)
                self._write_whole(f"{split}/teacher_{key}", rows)
        self.metadata["complete"] = True
        self._save_metadata()


def read_filters(location: Location) -> dict[str, bytes]:
    """The teacher's Stage-I filters as stored ({suffix: bytes}, for FilterBank.from_bytes)."""
    return {suffix: location.read_bytes(f"teacher_filters{suffix}") for suffix in (".safetensors", ".json")}


def unit_record(split: str, unit: int) -> str:
    return f"units/{split}/{unit:06d}.json"


# ---------------------------------------------------------------- the lock


class CacheLock:
    """Keeps two extractions from writing one cache. The lock names its holder; a lock left by a dead
    process on this host is recognised as stale and taken over."""

    def __init__(self, location: Location):
        self.location = location
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def holder(self) -> dict | None:
        """The live holder, or None (no lock, or a stale one)."""
        if not self.location.exists(".lock"):
            return None
        try:
            held = json.loads(self.location.read_bytes(".lock"))
        except (FileNotFoundError, ValueError):
            return None
        if held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", -1))):
            return None
        return held

    def __enter__(self):
        held = self.holder()
        if held is not None and held.get("pid") != os.getpid():
            raise TedcacheError(f"cache {self.location} is being written by pid {held['pid']} on {held['host']} "
                                f"since {held['since']}; wait for it to finish (or, if that process is gone, "
                                f"delete {self.location}/.lock)")
        self.location.fs.makedirs(self.location.root, exist_ok=True)
        payload = json.dumps(self.me).encode()
        if self.location.local:
            path = self.location.path(".lock")
            if os.path.exists(path):
                os.remove(path)  # stale (checked above)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                raise TedcacheError(f"cache {self.location} was locked by another extraction a moment ago; "
                                    "wait for it to finish") from None
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
        else:
            self.location.write_bytes(".lock", payload)  # object stores: last writer wins (documented)
        return self

    def __exit__(self, *exc) -> None:
        if self.location.exists(".lock"):
            self.location.remove(".lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


# ---------------------------------------------------------------- reading


class Split:
    """Read access to one split: small per-example arrays in memory, token arrays read by slices."""

    def __init__(self, group: zarr.Group, name: str, precision: str):
        self.group, self.name, self.precision = group, name, precision
        self.starts = group["starts"][...]
        self.lengths = group["lengths"][...].astype(np.int64)
        self.labels = group["labels"][...] if "labels" in group else None
        self.teacher_logits = group["teacher_logits"][...] if "teacher_logits" in group else None
        self.teacher_nll = group["teacher_nll"][...] if "teacher_nll" in group else None
        self.logit_rows = sorted(group["logits"].array_keys()) if "logits" in group else []
        self.example_ids = group["example_ids"][...]
        self.has_token_types = "token_type_ids" in group
        self._channel_scales: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.starts)

    def tokens(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.group[name][start:stop]

    def states(self, layer: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored values (and int8 per-token scales) of tokens start:stop of one layer."""
        values = self.group[f"states/{layer}"][start:stop]
        scales = self.group[f"token_scales/{layer}"][start:stop] if self.precision == "int8" else None
        return values, scales

    def logits(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The sparse teacher rows (ids, logprobs[, counts]) of tokens start:stop (causal-lm)."""
        return {name: self.group[f"logits/{name}"][start:stop] for name in self.logit_rows}

    def logit_bytes_per_token(self) -> int:
        return sum(self.group[f"logits/{n}"].dtype.itemsize * self.group[f"logits/{n}"].shape[1] for n in self.logit_rows)

    def state_bytes_per_token(self, layer: int) -> int:
        values = self.group[f"states/{layer}"]
        return values.dtype.itemsize * values.shape[1] + (2 if self.precision == "int8" else 0)

    def channel_scale(self, layer: int) -> torch.Tensor | None:
        if self.precision != "int8":
            return None
        if layer not in self._channel_scales:
            self._channel_scales[layer] = torch.from_numpy(self.group[f"channel_scales/{layer}"][...])
        return self._channel_scales[layer]


class Cache:
    """An opened, complete cache of the current format."""

    def __init__(self, url: str):
        self.location = Location(url)
        self.path = self.location.url
        self.metadata = read_metadata(self.location)
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise TedcacheError(f"{url} is cache format {self.metadata.get('format_version')}, this tedcache "
                                f"reads format {FORMAT_VERSION}; rebuild it with tedcache extract --force")
        if not self.metadata.get("complete"):
            raise TedcacheError(f"{url} is incomplete (its extraction did not finish); re-run the tedcache "
                                "extract command that made it: it resumes where it stopped")
        self.root = zarr.open_group(store=self.location.zarr_store(read_only=True), mode="r", zarr_format=3)

    @property
    def layers(self) -> list[int]:
        return list(self.metadata["layers"])

    @property
    def precision(self) -> str:
        return self.metadata["precision"]

    def split(self, name: str) -> Split | None:
        return Split(self.root[name], name, self.precision) if name in self.root else None

    def bytes_on_disk(self) -> int:
        return self.location.size()


def read_metadata(location: Location | str) -> dict:
    """The cache's metadata, or a one-line error when the location holds no tedcache cache."""
    location = location if isinstance(location, Location) else Location(location)
    if not location.exists("zarr.json"):
        if location.exists():
            raise TedcacheError(f"{location} is not a tedcache cache (no zarr.json); pass the folder that "
                                "tedcache extract printed")
        raise TedcacheError(f"cache {location} does not exist; run tedcache extract first and pass the path it prints")
    try:
        attrs = json.loads(location.read_bytes("zarr.json")).get("attributes", {})
        return dict(attrs["tedcache"])
    except (KeyError, ValueError) as exc:
        raise TedcacheError(f"{location} is not a tedcache cache (no readable metadata); pass the folder that "
                            "tedcache extract printed") from exc


# ---------------------------------------------------------------- verifying


@dataclass
class Problem:
    """A missing or corrupt part of a cache; `unit` is (split, unit) when recomputing that unit fixes it."""

    message: str
    unit: tuple[str, int] | None = None

    def __str__(self) -> str:
        return self.message


def verify(url: str) -> list[Problem]:
    """Read every checksummed object of a cache; return one Problem per missing or corrupt one."""
    location = Location(url)
    meta = read_metadata(location)
    problems = []
    if not meta.get("complete"):
        problems.append(Problem("incomplete: the extraction did not finish (re-run it to resume)"))
    expected = {key: (digest, None) for key, digest in meta.get("checksums", {}).items()}
    for split, units in meta.get("units", {}).items():
        for unit in range(units):
            rel = unit_record(split, unit)
            if not location.exists(rel):
                problems.append(Problem(f"missing: unit {split}/{unit} (no record {rel})", (split, unit)))
                continue
            try:
                record = json.loads(location.read_bytes(rel))
                expected.update({key: (digest, (split, unit)) for key, digest in record["checksums"].items()})
            except (ValueError, KeyError):
                problems.append(Problem(f"corrupt: {rel} (unreadable unit record)", (split, unit)))
    for key, (digest, unit) in sorted(expected.items()):
        where = f" (unit {unit[0]}/{unit[1]})" if unit else ""
        if not location.exists(key):
            problems.append(Problem(f"missing: {key}{where}", unit))
        elif sha256(location.read_bytes(key)) != digest:
            problems.append(Problem(f"corrupt: {key}{where} (checksum mismatch)", unit))
    return problems


def repair(url: str, problems: list[Problem]) -> int:
    """Forget the units that failed verification, so that re-running the extract command recomputes just
    those; returns how many. Damage outside the units needs a rebuild (extract --force)."""
    fatal = [p for p in problems if p.unit is None and not p.message.startswith("incomplete")]
    if fatal:
        raise TedcacheError(f"{fatal[0]} is outside the teacher-pass units and cannot be repaired; rebuild "
                            "the cache with the extract command plus --force")
    location = Location(url)
    units = {p.unit for p in problems if p.unit is not None}
    for split, unit in units:
        location.remove(unit_record(split, unit))
    root = zarr.open_group(store=location.zarr_store(read_only=False), mode="r+", zarr_format=3)
    root.attrs["tedcache"] = {**root.attrs["tedcache"], "complete": False}
    return len(units)
