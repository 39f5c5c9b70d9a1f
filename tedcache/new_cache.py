"""A new cache: what it says about itself (its metadata), and the arrays and files made before the teacher
pass (token arrays, the teacher's filters, a causal LM's output layer)."""

from __future__ import annotations

import json
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from .cache import CacheMetadata, CacheWriter
from .cache.logits import head_tensors, id_dtype
from .data import Examples
from .extract_run import ExtractRun
from .filters import FilterBank
from .losses import labelled
from .models import pad_id, vocab_hash
from .run_folder import METRICS_FILE
from .schema import to_dict
from .taps import model_parts, num_layers
from .tasks import TASK


def cache_metadata(run: ExtractRun) -> CacheMetadata:
    """What the new cache says about itself (the writer adds the layout's counts as it writes)."""
    cfg, identity, splits, label_names, spec, teacher = (run.cfg, run.identity, run.splits, run.label_names,
                                                         run.spec, run.teacher)
    task, filtered = cfg.data.task, run.filtered
    lm = TASK[task].causal
    return CacheMetadata(
        format_version=0, identity=identity,  # format_version, chunk_tokens: set by CacheWriter.create
        created_by=f"tedcache {version('tedcache')}", task=task,
        states=cfg.states, layers=spec.layers, filter_dim=spec.out_dim, teacher=cfg.teacher,
        teacher_weights_sha256=identity["teacher_weights"], teacher_recipe=teacher_recipe(cfg.teacher),
        teacher_dtype=identity.get("teacher_dtype", "fp32"),
        tokenizer_vocab_sha256=vocab_hash(run.tokenizer),
        pad_token_id=pad_id(run.tokenizer), precision=cfg.precision, seed=cfg.seed, shard_tokens=cfg.shard_tokens,
        chunk_tokens=0, tokenizer=cfg.teacher, tokenizer_sha256=identity["tokenizer"], label_names=label_names,
        num_outputs=1 if task == "regression" else 2 if task == "question-answering" else
        None if lm else len(label_names),
        filter_kind=spec.kind if filtered else None, teacher_hidden_size=spec.in_dim,
        teacher_num_layers=num_layers(teacher),
        data={"train": cfg.data.train, "transfer": cfg.data.transfer, "eval": cfg.data.eval, "test": cfg.data.test,
              "text_column": cfg.data.text_column, "text_pair_column": cfg.data.text_pair_column,
              "label_column": cfg.data.label_column, "limit": cfg.data.limit},
        data_fingerprint=identity["data"], max_length=identity["max_length"],
        logits=None if run.logit_spec is None else asdict(run.logit_spec), vocab_size=teacher.config.vocab_size,
        lm_head=identity.get("lm_head"), stage1=identity["stage1"],
        splits={s: len(ex) for s, ex in splits.items()}, tokens={s: ex.num_tokens for s, ex in splits.items()},
        labelled_train=None if lm else labelled_examples(splits["train"], task),
        trust_remote_code=cfg.trust_remote_code,
        config=to_dict(cfg))


def teacher_recipe(teacher: str) -> str | None:
    """The recipe tedcache finetune recorded in the teacher's folder (None for a teacher it did not make)."""
    path = Path(teacher) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("recipe")
    except ValueError:
        return None


def labelled_examples(examples: Examples, task: str) -> int:
    """Training examples with a gold label (token classification: with at least one tagged word)."""
    if task == "question-answering":
        return len(examples)  # (it takes no unlabelled data)
    if task == "token-classification":
        tagged = np.add.reduceat(examples.token_labels >= 0, examples.offsets[:-1]) if len(examples) else []
        return int(np.count_nonzero(tagged))
    return int(labelled(torch.from_numpy(examples.labels), task).sum())


def create_cache(run: ExtractRun, metadata: CacheMetadata, bank: FilterBank | None) -> CacheWriter:
    """Metadata, token arrays, the teacher filters (and for --logits hidden its output layer): everything
    before the teacher pass."""
    logit_spec = run.logit_spec
    writer = CacheWriter.create(run.location, metadata)
    for split, examples in run.splits.items():
        writer.write_inputs(split, examples)
    if bank is not None:
        writer.save_filters(bank.to_bytes())
    writer.create_state_arrays(metadata.filter_dim)
    if TASK[metadata.task].per_token:
        writer.create_token_logit_arrays(metadata.num_outputs)
    if logit_spec is not None and logit_spec.kind == "hidden":
        head = head_tensors(model_parts(run.teacher).head, logit_spec.vocab)
        writer.save_head(save({k: v.contiguous().cpu() for k, v in head.items()}))
    elif logit_spec is not None:
        dtypes = {"ids": id_dtype(metadata.vocab_size), "logprobs": np.float16}
        if logit_spec.kind == "sample":
            dtypes["counts"] = np.uint8
        writer.create_logit_arrays(logit_spec.size, dtypes)
    writer.finish_inputs()
    return writer
