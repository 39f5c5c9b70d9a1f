"""Reading a complete cache: `Cache` (metadata, splits, filters, sizes, per-layer statistics) and
`Split` (small per-example arrays in memory, token arrays read by slices)."""

from __future__ import annotations

import json

import numpy as np
import torch
import zarr
from safetensors.torch import load

from ..errors import TedcacheError
from . import layout
from .codecs import CompactStates, decode_values
from .location import Location
from .metadata import CacheMetadata, load_metadata


class Split:
    """Read access to one split: small per-example arrays in memory, token arrays read by slices."""

    def __init__(self, group: zarr.Group, name: str, precision: str):
        self.group, self.name, self.precision = group, name, precision
        self.starts = group["starts"][...]
        self.lengths = group["lengths"][...].astype(np.int64)
        self.labels = group["labels"][...] if "labels" in group else None
        self.teacher_logits = self._optional(layout.teacher_output_array("logits"))
        self.teacher_nll = self._optional(layout.teacher_output_array("nll"))
        self.logit_rows = sorted(group[layout.LOGIT_ROWS].array_keys()) if layout.LOGIT_ROWS in group else []
        self.example_ids = group["example_ids"][...]
        self.has_token_types = layout.TOKEN_TYPES in group
        self.has_final = layout.states_array(layout.FINAL) in group  # --logits hidden (train split)
        self.token_arrays = [n for n in (layout.TOKEN_LABELS, layout.TOKEN_LOGITS, layout.CONTEXT_SPANS) if n in group]
        self.question_index = self._optional(layout.QUESTION_INDEX)
        self._channel_scales: dict[int | str, torch.Tensor] = {}

    @property
    def questions(self) -> list[dict] | None:
        """question-answering: per question its id, context and gold answer texts."""
        return json.loads(self.group[layout.QUESTIONS][...].tobytes()) if layout.QUESTIONS in self.group else None

    def _optional(self, name: str):
        return self.group[name][...] if name in self.group else None

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def unit_bounds(self) -> np.ndarray:
        return self.group["unit_bounds"][...]

    def tokens(self, name: str, start: int, stop: int) -> np.ndarray:
        """A per-token array (input_ids, token_type_ids, token_labels, token_logits) of tokens start:stop."""
        return self.group[name][start:stop]

    def states(self, layer: int | str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored values (and int8 per-token scales) of tokens start:stop of one layer (or layout.FINAL)."""
        values = self.group[layout.states_array(layer)][start:stop]
        scales = self.group[layout.token_scales_array(layer)][start:stop] if self.precision == "int8" else None
        return values, scales

    def logits(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The sparse teacher rows (ids, logprobs[, counts]) of tokens start:stop (causal-lm)."""
        return {name: self.group[layout.logit_array(name)][start:stop] for name in self.logit_rows}

    def logit_bytes_per_token(self) -> int:
        arrays = [self.group[layout.logit_array(n)] for n in self.logit_rows]
        return sum(a.dtype.itemsize * a.shape[1] for a in arrays)

    def state_bytes_per_token(self, layer: int | str) -> int:
        values = self.group[layout.states_array(layer)]
        return values.dtype.itemsize * values.shape[1] + (2 if self.precision == "int8" else 0)

    def channel_scale(self, layer: int | str) -> torch.Tensor | None:
        if self.precision != "int8":
            return None
        if layer not in self._channel_scales:
            self._channel_scales[layer] = torch.from_numpy(self.group[layout.channel_scales_array(layer)][...])
        return self._channel_scales[layer]

    def decoded_states(self, layer: int, start: int, stop: int, real: np.ndarray) -> torch.Tensor:
        """fp32 states of the tokens start:stop where `real` (a mask over them) is set."""
        values, scales = self.states(layer, start, stop)
        return CompactStates(decode_values(values[real], self.precision),
                             None if scales is None else torch.from_numpy(scales[real]),
                             self.channel_scale(layer)).widen()


class Cache:
    """An opened, complete cache of the current format."""

    def __init__(self, url: str):
        self.location = Location(url)
        self.path = self.location.url
        self.metadata: CacheMetadata = load_metadata(self.location)
        if not self.metadata.complete:
            raise TedcacheError(f"{url} is incomplete (its extraction did not finish); re-run the tedcache "
                                "extract command that made it: it resumes where it stopped")
        self.root = zarr.open_group(store=self.location.zarr_store(read_only=True), mode="r", zarr_format=3)

    @property
    def layers(self) -> list[int]:
        return list(self.metadata.layers)

    @property
    def precision(self) -> str:
        return self.metadata.precision

    def split(self, name: str) -> Split | None:
        return Split(self.root[name], name, self.precision) if name in self.root else None

    def filter_files(self) -> dict[str, bytes]:
        """The teacher's Stage-I filters as stored ({suffix: bytes}, for FilterBank.from_bytes)."""
        return read_filter_files(self.location)

    def teacher_head(self) -> dict[str, torch.Tensor]:
        """--logits hidden: the teacher's output layer ({"weight"[, "bias"]}, see logits.head_tensors)."""
        return load(self.location.read_bytes(layout.HEAD_FILE))

    def bytes_on_disk(self) -> int:
        return self.location.size()

    def layer_stats(self, sample_units: int = 1) -> dict:
        """Per layer: mean, std, rms and absmax of the decoded states over the real tokens of the first
        `sample_units` training units."""
        split = self.split("train")
        bounds = split.unit_bounds
        last = int(bounds[min(sample_units, len(bounds) - 1)])
        if last == 0:
            return {}
        stop = int(split.starts[last - 1] + split.lengths[last - 1])
        real = np.zeros(stop, dtype=bool)
        for start, length in zip(split.starts[:last], split.lengths[:last]):
            real[start:start + length] = True
        stats = {}
        for layer in self.layers:
            states = split.decoded_states(layer, 0, stop, real)
            stats[str(layer)] = {"mean": float(states.mean()), "std": float(states.std()),
                                 "rms": float(states.pow(2).mean().sqrt()), "absmax": float(states.abs().max()),
                                 "tokens_sampled": int(real.sum())}
        return stats

    def mean_ids_per_token(self) -> float | None:
        """causal-lm: stored ids per real token over the first unit (None without logit rows)."""
        split = self.split("train")
        if not split.logit_rows:
            return None
        ids = split.logits(0, min(self.metadata.tokens.get("train", 0), self.metadata.shard_tokens))["ids"]
        used = (ids >= 0).sum(-1)
        return float(used[used > 0].mean())


def read_filter_files(location: Location) -> dict[str, bytes]:
    return {name[name.index("."):]: location.read_bytes(name) for name in layout.FILTER_FILES}


def storage_sizes(location: Location, metadata: CacheMetadata) -> dict:
    """Bytes on disk, and bytes per cached state value and per token of logit rows (--logits hidden: of
    final hidden states, the output layer counted apart as head_bytes), complete or not."""
    train_tokens = metadata.tokens.get("train", 0)
    values = train_tokens * len(metadata.layers) * metadata.filter_dim
    parts = ("states", "token_scales", "channel_scales")
    final_bytes = sum(location.size(f"train/{part}/{layout.FINAL}") for part in parts)  # (0 when absent)
    state_bytes = sum(location.size(f"train/{part}") for part in parts) - final_bytes
    sizes = {"bytes_on_disk": location.size(), "examples": metadata.splits.get("train", 0), "tokens": train_tokens,
             "values_stored": values, "state_bytes": int(state_bytes),
             "bytes_per_value": state_bytes / values if values else None,
             "compression_vs_fp32": 4 * values / state_bytes if state_bytes else None}
    logit_bytes = final_bytes or (location.size(f"train/{layout.LOGIT_ROWS}")
                                  if location.exists(f"train/{layout.LOGIT_ROWS}") else 0)
    if logit_bytes:
        sizes.update({"logit_bytes": int(logit_bytes),
                      "logit_bytes_per_token": logit_bytes / train_tokens if train_tokens else None})
    if metadata.logits and metadata.logits["kind"] == "hidden":
        sizes["head_bytes"] = location.size(layout.HEAD_FILE)
    return sizes
