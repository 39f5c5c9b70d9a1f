"""Ordinary fine-tuning: a classifier or regressor on labelled data (makes a teacher, or a baseline from
raw data), or a causal LM on text (adapts a teacher to the user's domain before extraction)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import torch

from .config import FinetuneConfig
from .data import load_blocks, load_examples
from .errors import note
from .evaluate import evaluate, task_validation
from .loop import Phase, Runtime, fit
from .losses import lm_loss, task_loss
from .models import load_for_task, load_tokenizer, pad_id, source_hash, tokenizer_hash
from .reader import ExamplesSource, iterate_batches, num_batches
from .run_folder import save_run
from .schema import check_choices
from .taps import forward_with_taps
from .tasks import TASK


def finetune(cfg: FinetuneConfig, log=None) -> dict:
    """Fine-tune `cfg.model` (classification, regression: with a fresh head sized to the data's labels;
    causal-lm: with the next-token loss on packed blocks); save the best epoch to `cfg.out` (causal-lm:
    the lowest validation perplexity)."""
    log = log or note
    check_choices(cfg)
    task = cfg.data.task
    lm = TASK[task].causal
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    evaluation, label_names = None, None
    if lm:
        train = load_blocks(cfg.data.train, cfg.data, tokenizer, "--data", cfg.data.limit)
        if cfg.data.eval:
            evaluation = load_blocks(cfg.data.eval, cfg.data, tokenizer, "--eval-data")
    else:
        train, label_names = load_examples(cfg.data.train, cfg.data, tokenizer, None, "--data", cfg.data.limit)
        if cfg.data.eval:
            evaluation, _ = load_examples(cfg.data.eval, cfg.data, tokenizer, label_names, "--eval-data")
    torch.manual_seed(cfg.seed)
    model = load_for_task(cfg.model, "model", task, label_names, trust_remote_code=cfg.trust_remote_code)
    pad = pad_id(tokenizer)
    source = ExamplesSource(train)

    def loss_fn(batch):
        logits, _ = forward_with_taps(model, batch, [])
        if lm:
            loss = lm_loss(logits, batch["input_ids"], batch["attention_mask"])
        else:
            loss = task_loss(logits, batch["labels"], task)
        return loss, {"task": loss.detach()}

    def evaluate_model():
        return evaluate(model, iterate_batches(ExamplesSource(evaluation), 64, pad), task, label_names=label_names,
                        questions=evaluation.questions)

    result = fit(Phase([model], lambda e: iterate_batches(source, cfg.optim.batch_size, pad, True, cfg.seed, e),
                       num_batches(source, cfg.optim.batch_size), loss_fn, cfg.optim, "fine-tune"),
                 Runtime(task_validation(evaluate_model, task) if evaluation is not None else None))
    report = {"method": "finetune", "config": asdict(cfg), "recipe": recipe(cfg, tokenizer, train, evaluation),
              "task": task, "label_names": label_names,
              "history": result["history"], "eval": result["evals"], "best": result["best"],
              "seconds": result["seconds"]}
    save_run(model, tokenizer, cfg.out, report, cfg)
    log(f"fine-tuned in {result['seconds']:.0f}s; saved to {cfg.out}")
    return report


def recipe(cfg: FinetuneConfig, tokenizer, train, evaluation) -> str:
    """sha256 of everything that decides the fine-tuned model up to float rounding: the base model's files,
    the tokenizer, the data's content, the settings and the seed (not folder names, not the machine). A cache
    of this teacher records it (teacher_recipe), so a rebuild elsewhere continues the same studies."""
    made_from = {"model": source_hash(cfg.model), "tokenizer": tokenizer_hash(tokenizer), "data": train.fingerprint,
                 "eval_data": evaluation.fingerprint if evaluation is not None else None,
                 "settings": {**asdict(cfg), "model": None, "out": None, "data": None},
                 "task": cfg.data.task, "max_length": cfg.data.max_length, "block_size": cfg.data.block_size}
    return hashlib.sha256(json.dumps(made_from, sort_keys=True, default=str).encode()).hexdigest()
