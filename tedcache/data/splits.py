"""An extraction's splits: train (with transfer text joined to it), eval and test, tokenized."""

from __future__ import annotations

from ..tasks import TASK
from .examples import Examples, concatenate
from .tokenize import load_blocks, load_examples


def load_splits(data, tokenizer, model_config) -> tuple[dict[str, Examples], list[str] | None]:
    """Tokenized train [, eval, test] splits of `data` (a DataConfig; causal-lm: packed blocks, transfer text
    joined to train) and the label names."""
    lm = TASK[data.task].causal
    if lm:
        train, label_names = load_blocks(data.train, data, tokenizer, "--data", data.limit), None
    else:
        train, label_names = load_examples(data.train, data, tokenizer, None, "--data", data.limit,
                                           model_config if data.task != "regression" else None,
                                           unlabelled="allow")
    if data.transfer:
        transfer = load_blocks(data.transfer, data, tokenizer, "--transfer-data") if lm else \
            load_examples(data.transfer, data, tokenizer, label_names, "--transfer-data", unlabelled="all")[0]
        train = concatenate(train, transfer)
    splits = {"train": train}
    for split, paths in (("eval", data.eval), ("test", data.test)):
        if paths:
            source = f"--{split}-data"
            splits[split] = load_blocks(paths, data, tokenizer, source) if lm \
                else load_examples(paths, data, tokenizer, label_names, source)[0]
    return splits, label_names
