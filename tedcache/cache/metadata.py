"""A cache's metadata: the typed, documented schema of attrs["tedcache"], and unit records.

`python -m tedcache.cache.metadata` prints docs/cache-format.md (a test checks the page is current)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from ..errors import TedcacheError
from ..schema import from_dict, help_of, hints, setting, to_dict, type_name
from . import layout
from .location import Location


@dataclass(frozen=True)
class CacheMetadata:
    """Everything a cache says about itself (zarr attribute "tedcache" of the cache's root group)."""

    format_version: int = setting(help="Layout version (tedcache.cache.layout.FORMAT_VERSION); other versions are "
                                       "refused with the rebuild command.")
    identity: dict[str, Any] = setting(help="The inputs that determine the content (teacher weights, tokenizer, data, "
                                            "layers, filters, Stage I, precision, seed...); the folder name ends "
                                            "with their hash.")
    created_by: str = setting(help="tedcache version that wrote the cache.")
    task: str = setting(help="classification, regression, causal-lm, token-classification or question-answering.")
    states: str = setting(help="filtered (TED filters' outputs), raw (hidden states, for LWD) or none (the teacher's "
                               "outputs only, for KD).")
    layers: list[int] = setting(help="0-based teacher layers whose states are stored.")
    filter_dim: int = setting(help="Width d of each stored state.")
    teacher: str = setting(help="The teacher as given to extract (folder or hub name).")
    teacher_weights_sha256: str = setting(help="sha256 of every teacher parameter and buffer (online mode checks it).")
    tokenizer_vocab_sha256: str = setting(help="sha256 of the token -> id map and special tokens (a student must "
                                               "match it).")
    pad_token_id: int = setting(help="Padding id used when batching.")
    precision: str = setting(help="fp32, fp16, bf16 or int8 storage of the states.")
    seed: int = setting(help="Seed of Stage I and of the training split's storage order.")
    shard_tokens: int = setting(help="Tokens per shard: the unit of writing, resuming and checksumming.")
    chunk_tokens: int = setting(help="Tokens per inner chunk of per-token arrays (random reads).")
    tokenizer: str | None = setting(None, "Where the tokenizer came from.")
    tokenizer_sha256: str | None = setting(None, "sha256 of the tokenizer's whole configuration (normaliser, "
                                                 "pre-tokeniser, vocabulary, special tokens); absent in caches "
                                                 "written before it was recorded.")
    teacher_recipe: str | None = setting(None, "sha256 of how the teacher was made, where tedcache finetune made it "
                                               "(its base model's files, data, settings and seed; metrics.json's "
                                               "recipe): a rebuild of that teacher on another machine has the same "
                                               "recipe and may differ in its last bits. Null for other teachers.")
    label_names: list[str] | None = setting(None, "classification: the label names, in id order.")
    num_outputs: int | None = setting(None, "Teacher outputs per example (labels; 1 for regression; question-answering: "
                                                 "2 per token, start and end).")
    filter_kind: str | None = setting(None, "linear or mlp (null for raw states).")
    teacher_hidden_size: int | None = setting(None, "The teacher's hidden size.")
    teacher_num_layers: int | None = setting(None, "The teacher's number of transformer layers.")
    teacher_dtype: str = setting("fp32", "Precision the teacher's weights were loaded and run in (extract --dtype): bf16, "
                                         "fp16 or fp32; online mode loads it the same way.")
    data: dict[str, Any] = setting(help="The data sources and columns as given.", factory=dict)
    data_fingerprint: str | None = setting(None, "Hash of the training texts and labels.")
    max_length: int | None = setting(None, "Tokens per example (causal-lm: per block).")
    logits: dict[str, Any] | None = setting(None, "causal-lm: the per-token teacher targets (kind: sample, topk, full "
                                                  "or hidden; size, temperature, vocab).")
    vocab_size: int | None = setting(None, "The teacher's vocabulary size (its config's; causal-lm logit rows span "
                                           "the tokenizer's ids, logits.vocab, which a padded output layer exceeds).")
    lm_head: str | None = setting(None, "causal-lm: the Stage-I head kind (tied or new).")
    stage1: dict[str, Any] | None = setting(None, "The Stage-I optimiser settings (null for raw states).")
    stage1_filters: dict[str, Any] | None = setting(None, "How well each teacher filter learned: split measured on, "
                                                          "steps trained, whether patience stopped it, and per layer "
                                                          "the Stage-I head's loss (classification: accuracy; "
                                                          "causal-lm: the layer's logit-lens loss beside it).")
    state_variance: dict[str, float] | None = setting(None, "Per stored layer, the variance of the teacher states "
                                                            "over the training tokens (mean over the d channels of "
                                                            "each channel's variance, before encoding): distill "
                                                            "--mse-norm variance divides each layer's MSE by it.")
    splits: dict[str, int] = setting(help="Examples per split.", factory=dict)
    tokens: dict[str, int] = setting(help="Real tokens per split.", factory=dict)
    labelled_train: int | None = setting(None, "Training examples with a gold label (the rest are unlabelled "
                                               "transfer text: label -1, or NaN for regression).")
    trust_remote_code: bool = setting(False, "Whether the teacher's own code (shipped with the model) was allowed "
                                             "to run; online mode loads it the same way.")
    units: dict[str, int] = setting(help="Units (shards) per split.", factory=dict)
    slots: dict[str, int] = setting(help="Token slots per split (tokens plus the gaps at shard ends).", factory=dict)
    inputs_written: bool = setting(False, "The token arrays, filters and state arrays exist (a resume keeps them).")
    complete: bool = setting(False, "Every unit is written and checked; written last. Only complete caches are read.")
    checksums: dict[str, str] = setting(help="sha256 of every object written outside the units (units carry their "
                                             "own in their records).", factory=dict)
    timings: dict[str, Any] | None = setting(None, "Seconds spent: total, Stage I, teacher pass; processes used.")
    config: dict[str, Any] | None = setting(None, "The resolved extract configuration (reuse it with "
                                                  "tedcache extract --config).")

    def to_dict(self) -> dict:
        return to_dict(self)

    @property
    def content_key(self) -> str:
        """The hash that ends the cache's folder name: equal keys, equal content."""
        return layout.cache_key(self.identity)

    @property
    def recipe_key(self) -> str:
        """The content key with the teacher's exact weights replaced by its recipe (where tedcache finetune
        made it): caches built from one recipe, data, layers and settings on different machines share it.
        Tuning journals and finished runs are keyed to it; experiments.same_teacher checks the teachers."""
        identity = dict(self.identity)
        weights = identity.pop("teacher_weights")
        return layout.cache_key({**identity, "teacher": self.teacher_recipe or weights})

    @classmethod
    def from_dict(cls, data: dict, where: str = "cache metadata") -> "CacheMetadata":
        return from_dict(cls, data, where)


@dataclass(frozen=True)
class UnitRecord:
    """units/<split>/<u>.json: the done-marker of one unit (written after its shards)."""

    split: str = setting(help="train, eval or test.")
    unit: int = setting(help="Unit number within the split.")
    outputs: dict[str, list] = setting(help="Per-example teacher outputs: logits (rows) or nll (numbers).")
    checksums: dict[str, str] = setting(help="sha256 of every shard object the unit wrote.")
    state_moments: dict[str, list] | None = setting(None, "train units: per layer [tokens, per-channel sums, sum "
                                                          "of squares], gathered into state_variance at the end.")

    def to_bytes(self) -> bytes:
        return json.dumps(to_dict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "UnitRecord":
        return from_dict(cls, json.loads(data), "unit record")


def load_metadata(location: Location | str) -> CacheMetadata:
    """The cache's metadata, or a one-line error when the location holds no tedcache cache of this format."""
    location = location if isinstance(location, Location) else Location(location)
    if not location.exists("zarr.json"):
        if location.exists():
            raise TedcacheError(f"{location} is not a tedcache cache (no zarr.json); pass the folder that "
                                "tedcache extract printed")
        raise TedcacheError(f"cache {location} does not exist; run tedcache extract first and pass the path it prints")
    try:
        raw = dict(json.loads(location.read_bytes("zarr.json")).get("attributes", {})["tedcache"])
    except (KeyError, ValueError, TypeError) as exc:
        raise TedcacheError(f"{location} is not a tedcache cache (no readable metadata); pass the folder that "
                            "tedcache extract printed") from exc
    if raw.get("format_version") != layout.FORMAT_VERSION:
        raise TedcacheError(f"{location} is cache format {raw.get('format_version')}, this tedcache reads format "
                            f"{layout.FORMAT_VERSION}; rebuild it with tedcache extract --force")
    try:
        return CacheMetadata.from_dict(raw)
    except TedcacheError as exc:
        raise TedcacheError(f"{location} has metadata this tedcache cannot read ({exc}); rebuild it with "
                            "tedcache extract --force") from None


def schema_markdown() -> str:
    """docs/cache-format.md: the layout and every metadata field with its type and meaning."""
    lines = ["# The cache format", "", "This page answers how a cache is laid out and what its metadata says.", "",
             "Generated by `python -m tedcache.cache.metadata` from `tedcache/cache/layout.py` and the",
             "`CacheMetadata` dataclass; a test fails when this page and the code disagree.", "",
             "## Layout", "", "```", *layout.__doc__.strip().splitlines()[3:], "```", "",
             "## Metadata (`attrs[\"tedcache\"]`)", "", "| field | type | meaning |", "|---|---|---|"]
    for record in (CacheMetadata, UnitRecord):
        if record is UnitRecord:
            lines += ["", "## Unit records (`units/<split>/<u>.json`)", "", "| field | type | meaning |", "|---|---|---|"]
        types_of = hints(record)
        for field in fields(record):
            lines.append(f"| `{field.name}` | {type_name(types_of[field.name])} | {help_of(field)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(schema_markdown(), end="")
