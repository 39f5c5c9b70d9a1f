"""The cache format's layout: names of its arrays and files, chunking, how examples are packed into
shards, and how a cache is named. FORMAT_VERSION changes whenever a cache that exists would be read
differently (arrays that only a new task writes do not change it).

Layout (FORMAT_VERSION 3), one zarr v3 group per cache, on local disk or behind an fsspec URL:

    attrs["tedcache"]              the metadata (tedcache.cache.metadata.CacheMetadata; docs/cache-format.md)
    <split>/starts     (E,)        int64   first token of example i            split: train, eval, test
    <split>/lengths    (E,)        int32   its token count (no padding on disk)
    <split>/unit_bounds (U+1,)     int64   unit u owns examples unit_bounds[u]:unit_bounds[u+1]
    <split>/input_ids  (N,)        int32   tokens; examples never straddle a shard of S tokens; N <= U*S
    <split>/token_type_ids (N,)    int8    when the tokenizer makes them
    <split>/token_labels (N,)      int16   token-classification: tag id on a word's first sub-token, else -100
    <split>/token_logits (N, C)    float32 token-classification: the teacher's class logits per token;
                                           question-answering: its start and end logits per token (C = 2)
    <split>/context_spans (N, 2)   int32   question-answering: each token's character span in its context (-1: none)
    <split>/question_index (E,)    int64   question-answering: the question each window (example) belongs to
    <split>/questions  (bytes,)    uint8   question-answering: UTF-8 json list of {id, context, answers}
    <split>/labels     (E,)        int64 class ids | float32 targets | (E, 2) answer tokens (not for causal-lm)
    <split>/example_ids (E,)       int64   source row of each example (training rows are stored shuffled)
    <split>/teacher_logits (E, C)  float32 classification/regression (written when every unit is done)
    <split>/teacher_nll (E,)       float32 causal-lm: the teacher's mean next-token loss on each block
    train/states/<layer> (N, d)    fp32 | fp16 | bf16 bits in uint16 | int8
    train/token_scales/<layer> (N,)    fp16     int8 only: per-token scale
    train/channel_scales/<layer> (d,)  float32  int8 only: per-channel scale, calibrated per layer
    train/logits/ids (N, S)        int8|16|32 causal-lm: sparse teacher distribution per token (-1 = unused)
    train/logits/logprobs (N, S)   fp16     the teacher's log-probabilities at those ids
    train/logits/counts (N, S)     uint8    sample:N only: draws of each id
    train/states/final (N, d)      --logits hidden: the teacher's final normed hidden state, stored (and
                                   scaled, int8) like a layer's states
    teacher_head.safetensors       --logits hidden: the teacher's output layer (checksum in the metadata)
    teacher_filters.safetensors / .json   the teacher's Stage-I filters (saved before the teacher pass)
    units/<split>/<u>.json         done-marker of unit u: its per-example teacher outputs and the sha256
                                   of every shard object it wrote (written last, atomically)
    .lock                          who is writing (host, pid, heartbeat), while an extraction runs
    .lock.guard                    local disks: the flock under which a lock is renewed, taken over or removed
    .readers/<host>-<pid>-<id>.json   who is reading (host, pid, command, heartbeat), while a run reads

Per-token arrays share one chunking: inner chunks for random reads, shards of S tokens as the unit of
writing. A unit is one shard of tokens, written whole by one writer, so a crash loses at most the
units in flight and concurrent writers never share a shard. The cache counts only once the metadata's
`complete` is true, written last.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

FORMAT_VERSION = 3
CHUNK_TOKENS = 256  # inner chunk of per-token arrays (a shard holds shard_tokens / CHUNK_TOKENS of them)
FILTER_FILES = ("teacher_filters.safetensors", "teacher_filters.json")
HEAD_FILE = "teacher_head.safetensors"  # --logits hidden: the teacher's output layer

# per-token arrays (relative to a split's group); the rest are per example
INPUT_IDS, TOKEN_TYPES = "input_ids", "token_type_ids"
TOKEN_LABELS, TOKEN_LOGITS = "token_labels", "token_logits"  # token-classification (logits: also QA)
CONTEXT_SPANS = "context_spans"  # question-answering
QUESTION_INDEX, QUESTIONS = "question_index", "questions"  # question-answering, per example and per split
LOGIT_ROWS = "logits"  # group of ids / logprobs / counts
FINAL = "final"  # --logits hidden: the final hidden state, stored under the states' names as if a layer


def states_array(layer: int) -> str:
    return f"states/{layer}"


def token_scales_array(layer: int) -> str:
    return f"token_scales/{layer}"


def channel_scales_array(layer: int) -> str:
    return f"channel_scales/{layer}"


def logit_array(name: str) -> str:
    return f"{LOGIT_ROWS}/{name}"


def teacher_output_array(kind: str) -> str:
    """Per-example teacher outputs gathered from the unit records: teacher_logits or teacher_nll."""
    return f"teacher_{kind}"


def unit_record(split: str, unit: int) -> str:
    return f"units/{split}/{unit:06d}.json"


def unit_folder(split: str) -> str:
    return f"units/{split}"


def cache_key(identity: dict) -> str:
    """Hash of everything that determines a cache's content (plus the format version)."""
    payload = json.dumps({"format_version": FORMAT_VERSION, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_name(teacher: str, identity: dict) -> str:
    """The cache's folder name: the teacher's folder name (readable) and the identity key (exact)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(teacher.rstrip("/")).name).strip("-")[:40] or "teacher"
    return f"{slug}-{cache_key(identity)}"


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


def storage_order(split: str, size: int, seed: int) -> np.ndarray:
    """Training rows are stored in a seeded shuffled order (so contiguous reads are random samples)."""
    return np.random.default_rng(seed).permutation(size) if split == "train" else np.arange(size)
