"""Writing a cache: create (or reopen) it, write the token arrays, then the teacher pass's units as they
are computed, then mark it complete. Callers hand over tensors; encoding, padding, chunking and
checksums happen here."""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import replace

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from ..errors import TedcacheError
from . import layout
from .claims import LOCK, READERS
from .codecs import PAD_TOKEN_SCALE, STATE_DTYPES, EncodedStates, as_stored, calibrate_channel_scales
from .location import Location
from .metadata import CacheMetadata, UnitRecord


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CacheWriter:
    """Creates a cache (or reopens an unfinished one), then writes it unit by unit.

    Order: metadata (complete=false) -> token arrays -> filters -> state/logit arrays -> [int8 channel
    scales, from the first train unit's states] -> units (each ending with its record) -> teacher
    outputs gathered from the records -> complete=true."""

    def __init__(self, location: Location, metadata: CacheMetadata | None = None):
        self.location = location
        self.root = zarr.open_group(store=location.zarr_store(read_only=False), mode="a", zarr_format=3)
        if metadata is None:
            metadata = CacheMetadata.from_dict(dict(self.root.attrs["tedcache"]))
        self.metadata = metadata
        self.channel_scales: dict[int | str, torch.Tensor] = {}
        if metadata.precision == "int8":
            for layer in self.state_keys:
                name = f"train/{layout.channel_scales_array(layer)}"
                if name in self.root:
                    self.channel_scales[layer] = torch.from_numpy(self.root[name][...])

    @classmethod
    def create(cls, location: Location, metadata: CacheMetadata) -> "CacheWriter":
        """A new, empty cache at `location` (anything there but the lock and the leases is removed)."""
        for name in location.listdir():
            if name not in (LOCK, f"{LOCK}.guard", READERS):  # the caller holds the lock
                location.remove(name)
        shard = metadata.shard_tokens
        metadata = replace(metadata, format_version=layout.FORMAT_VERSION, complete=False, inputs_written=False,
                           chunk_tokens=layout.CHUNK_TOKENS if shard % layout.CHUNK_TOKENS == 0 else shard,
                           checksums={})  # inner chunks must tile a shard
        writer = cls(location, metadata)
        writer._save_metadata()
        return writer

    def _update(self, **changes) -> None:
        self.metadata = replace(self.metadata, **changes)

    def _save_metadata(self) -> None:
        self.root.attrs["tedcache"] = self.metadata.to_dict()

    def _create(self, name: str, shape, dtype, per_token: bool, compress: bool = True):
        if per_token:
            inner = self.metadata.chunk_tokens
            chunks, shards = (inner, *shape[1:]), (self.metadata.shard_tokens, *shape[1:])
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
        self._update(checksums={**self.metadata.checksums, **self._object_checksums(arr)})

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

    def write_inputs(self, split: str, examples) -> None:
        """Tokens (in storage order, packed into shards), lengths, labels and source rows of one split.
        `examples`: tedcache.data.Examples in source order (its token arrays may be memory-mapped: they
        are gathered one shard at a time, so memory does not grow with the split)."""
        order = layout.storage_order(split, len(examples), self.metadata.seed)
        lengths = np.diff(examples.offsets)[order]
        shard = self.metadata.shard_tokens
        if len(lengths) and lengths.max() > shard:
            raise TedcacheError(f"an example has {lengths.max()} tokens, more than a shard ({shard}); "
                                "raise --shard-tokens or lower --max-length")
        starts, bounds = layout.pack(lengths, shard)
        slots = int(starts[-1] + lengths[-1]) if len(lengths) else 0  # the last shard ends at its last token
        per_token = {name: (attr, dtype, fill) for name, attr, dtype, fill in (
            (layout.INPUT_IDS, "input_ids", np.int32, 0), (layout.TOKEN_TYPES, "token_type_ids", np.int8, 0),
            (layout.TOKEN_LABELS, "token_labels", np.int16, 0), (layout.CONTEXT_SPANS, "context_spans", np.int32, -1))
            if getattr(examples, attr) is not None}
        arrays = {name: self._create(f"{split}/{name}", (slots, *getattr(examples, attr).shape[1:]), dtype,
                                     per_token=True) for name, (attr, dtype, _) in per_token.items()}
        checksums = {}
        for unit in range(len(bounds) - 1):
            part = examples.reorder(order[bounds[unit]:bounds[unit + 1]])  # packed from the shard's first slot
            first, stop = unit * shard, min((unit + 1) * shard, slots)
            for name, (attr, dtype, fill) in per_token.items():
                values = getattr(part, attr)
                block = np.full((stop - first, *values.shape[1:]), fill, dtype=dtype)
                block[:len(values)] = values
                arrays[name][first:stop] = block
                checksums.update(self._object_checksums(arrays[name], [(unit,) + (0,) * (block.ndim - 1)]))
        self._update(checksums={**self.metadata.checksums, **checksums})
        self._write_whole(f"{split}/starts", starts)
        self._write_whole(f"{split}/lengths", lengths.astype(np.int32))
        self._write_whole(f"{split}/unit_bounds", bounds)
        if examples.question_index is not None:
            self._write_whole(f"{split}/{layout.QUESTION_INDEX}", examples.question_index[order])
            self._write_whole(f"{split}/{layout.QUESTIONS}",
                              np.frombuffer(json.dumps(examples.questions).encode(), dtype=np.uint8))
        if examples.labels is not None:
            self._write_whole(f"{split}/labels", examples.labels[order])
        self._write_whole(f"{split}/example_ids", order.astype(np.int64))
        self._update(units={**self.metadata.units, split: len(bounds) - 1},
                     slots={**self.metadata.slots, split: slots})

    def in_storage_order(self, split: str, examples):
        """`examples` (source order) in the order this cache stores them (training rows shuffled)."""
        return examples.reorder(layout.storage_order(split, len(examples), self.metadata.seed))

    def save_filters(self, files: dict[str, bytes]) -> None:
        """The teacher's Stage-I filters ({".safetensors": ..., ".json": ...}, see FilterBank.to_bytes)."""
        for name in layout.FILTER_FILES:
            self.location.write_bytes(name, files[name[name.index("."):]])

    @property
    def state_keys(self) -> list[int | str]:
        """The layers whose states the cache holds, and layout.FINAL for a --logits hidden cache."""
        hidden = (self.metadata.logits or {}).get("kind") == "hidden"
        return list(self.metadata.layers) + ([layout.FINAL] if hidden else [])

    def save_head(self, data: bytes) -> None:
        """--logits hidden: the teacher's output layer (safetensors bytes), its checksum recorded for verify."""
        self.location.write_bytes(layout.HEAD_FILE, data)
        self._update(checksums={**self.metadata.checksums, layout.HEAD_FILE: sha256(data)})

    def create_state_arrays(self, dim: int) -> None:
        precision = self.metadata.precision
        tokens = self.metadata.slots["train"]
        for layer in self.state_keys:
            width = self.metadata.teacher_hidden_size if layer == layout.FINAL else dim
            self._create(f"train/{layout.states_array(layer)}", (tokens, width), STATE_DTYPES[precision],
                         per_token=True, compress=False)  # dense activations barely compress and reads slow down
            if precision == "int8":
                self._create(f"train/{layout.token_scales_array(layer)}", (tokens,), np.float16, per_token=True,
                             compress=False)

    def create_logit_arrays(self, width: int, dtypes: dict[str, np.dtype]) -> None:
        """Per-token sparse teacher distributions (causal-lm), `width` slots a token; compressed, since
        sampled rows are mostly unused slots."""
        tokens = self.metadata.slots["train"]
        for name, dtype in dtypes.items():
            self._create(f"train/{layout.logit_array(name)}", (tokens, width), dtype, per_token=True)

    def create_token_logit_arrays(self, classes: int) -> None:
        """Token classification and question answering: the teacher's logits per token (classes, or start
        and end), in every split (the test metric and the KD targets are per token)."""
        for split, tokens in self.metadata.slots.items():
            self._create(f"{split}/{layout.TOKEN_LOGITS}", (tokens, classes), np.float32, per_token=True)

    def finish_inputs(self) -> None:
        self._update(inputs_written=True)
        self._save_metadata()

    def unit_bounds(self, split: str) -> np.ndarray:
        """Unit u of `split` holds stored examples unit_bounds[u]:unit_bounds[u+1]."""
        return self.root[f"{split}/unit_bounds"][...]

    def needs_channel_scales(self) -> bool:
        return self.metadata.precision == "int8" and bool(self.state_keys) and not self.channel_scales

    def calibrate(self, states: dict[int | str, torch.Tensor]) -> None:
        """int8: per-channel scales from the first train unit's float states, stored before any unit is
        written, so a resumed run (whose first unit is then done) encodes with the same scales."""
        for layer, values in states.items():
            self.channel_scales[layer] = calibrate_channel_scales(values)
            self._write_whole(f"train/{layout.channel_scales_array(layer)}",
                              self.channel_scales[layer].numpy().astype(np.float32))
        self._save_metadata()

    def write_unit(self, split: str, unit: int, outputs: dict[str, list],
                   states: dict[int | str, EncodedStates] | None = None,
                   logit_rows: dict[str, torch.Tensor] | None = None,
                   token_logits: torch.Tensor | None = None) -> None:
        """Write one unit: its per-token rows in storage order (`states`: layer (or layout.FINAL) -> the
        unit's encoded states (codecs.UnitStates); `logit_rows`: name -> (tokens, S); `token_logits`:
        (tokens, C)), padded to a whole shard; then its record holding the per-example `outputs` and the
        states' moments, the unit's done-marker."""
        shard = self.metadata.shard_tokens
        arrays = {}
        for layer, encoded in (states or {}).items():
            arrays[layout.states_array(layer)] = as_stored(_pad(encoded.values, shard, 0))
            if encoded.token_scale is not None:
                arrays[layout.token_scales_array(layer)] = _pad(encoded.token_scale, shard, PAD_TOKEN_SCALE).numpy()
        for name, values in (logit_rows or {}).items():
            arrays[layout.logit_array(name)] = _pad(values, shard, -1 if name == "ids" else 0).numpy()
        if token_logits is not None:
            arrays[layout.TOKEN_LOGITS] = _pad(token_logits.float(), shard, 0).numpy()
        checksums = {}
        for name, data in arrays.items():
            arr = self.root[f"{split}/{name}"]
            stop = min((unit + 1) * shard, arr.shape[0])  # the last shard may be short
            arr[unit * shard:stop] = data[:stop - unit * shard]
            checksums.update(self._object_checksums(arr, [(unit,) + (0,) * (data.ndim - 1)]))
        moments = {str(layer): [int(count), sums.tolist(), float(squares)]
                   for layer, (_, _, (count, sums, squares)) in (states or {}).items()} or None
        record = UnitRecord(split, unit, outputs, checksums, moments)
        self.location.write_bytes(layout.unit_record(split, unit), record.to_bytes())

    def done_units(self, split: str) -> set[int]:
        return {int(name.split(".")[0]) for name in self.location.listdir(layout.unit_folder(split))
                if name.endswith(".json")}

    def missing_units(self) -> dict[str, list[int]]:
        return {split: sorted(set(range(n)) - self.done_units(split)) for split, n in self.metadata.units.items()}

    def complete(self, timings: dict | None = None) -> None:
        """Gather the per-example teacher outputs and the state variances from the unit records, then
        mark the cache complete."""
        variance = None
        for split, units in self.metadata.units.items():
            records = [UnitRecord.from_bytes(self.location.read_bytes(layout.unit_record(split, u)))
                       for u in range(units)]
            for key in records[0].outputs if records else []:
                rows = np.asarray([row for r in records for row in r.outputs[key]], dtype=np.float32)
                self._write_whole(f"{split}/{layout.teacher_output_array(key)}", rows)
            if split == "train" and records and records[0].state_moments:
                variance = {layer: _variance([r.state_moments[layer] for r in records])
                            for layer in records[0].state_moments}
        self._update(complete=True, timings=timings, state_variance=variance)
        self._save_metadata()


def _pad(values: torch.Tensor, rows: int, fill) -> torch.Tensor:
    padded = torch.full((rows, *values.shape[1:]), fill, dtype=values.dtype)
    padded[:len(values)] = values
    return padded


def _variance(moments: list[list]) -> float:
    """Mean over channels of each channel's variance, from the units' moments."""
    count = sum(m[0] for m in moments)
    sums = np.sum([m[1] for m in moments], axis=0)
    squares = sum(m[2] for m in moments)
    return float((squares - (sums ** 2).sum() / count) / (count * len(sums)))
