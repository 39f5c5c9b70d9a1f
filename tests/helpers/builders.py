"""Tiny random-initialised models and tokenizers made here, and small data sets written to files."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "dull", "boring", "poor", "weak"]
FILLER = ["the", "movie", "film", "plot", "actor", "was", "and", "very", "quite", "story", "scene", "a"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = FILLER + POSITIVE + NEGATIVE


def make_tokenizer(folder: Path, extra: list[str] = ()) -> BertTokenizerFast:
    folder.mkdir(parents=True, exist_ok=True)
    words = SPECIAL + POSITIVE + NEGATIVE + FILLER + list(extra)
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_model(folder: Path, layers: int = 4, hidden: int = 32, num_labels: int = 2, seed: int = 0,
               extra_vocab: list[str] = ()) -> Path:
    tokenizer = make_tokenizer(folder, extra_vocab)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def make_lm_tokenizer(folder: Path, extra: list[str] = ()) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>"] + WORDS + list(extra))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_lm(folder: Path, family: str, layers: int = 4, hidden: int = 32, seed: int = 0, extra=()) -> Path:
    tokenizer = make_lm_tokenizer(folder, extra)
    torch.manual_seed(seed)
    if family == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=2, n_positions=64,
                            bos_token_id=2, eos_token_id=2, pad_token_id=0)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=2, eos_token_id=2,
                             pad_token_id=0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return folder


def without_dropout(folder: Path, out: Path | None = None) -> Path:
    """The BERT in `folder` (copied to `out` first, when given) with its dropout probabilities at 0, so that
    train mode computes what eval mode does and processes' dropout draws cannot differ."""
    if out is not None:
        shutil.copytree(folder, out)
        folder = out
    config = AutoConfig.from_pretrained(folder)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.save_pretrained(folder)
    return folder


def write_rows(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def sentiment_rows(n: int, seed: int, regression: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(FILLER, k=rng.randint(2, 10)) + rng.choices(POSITIVE if label else NEGATIVE, k=2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": float(label) + rng.random() * 0.1 if regression else label})
    return rows


def documents(n: int, seed: int) -> list[str]:
    """Runs of consecutive vocabulary words from a random start: the next word is predictable."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        start = rng.randrange(len(WORDS))
        docs.append(" ".join(WORDS[(start + i) % len(WORDS)] for i in range(rng.randint(3, 12))))
    return docs


def write_text(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n")
    return path


def question(rng: random.Random) -> dict:
    """'which good ?' over filler words holding at most one run of positive words (the answer); about one
    question in five has none (unanswerable)."""
    words = rng.choices(FILLER + NEGATIVE, k=rng.randint(4, 24))
    answer, starts = "", []
    if rng.random() < 0.8:
        answer = " ".join(rng.choices(POSITIVE, k=rng.randint(1, 2)))
        at = rng.randint(0, len(words))
        starts = [len(" ".join(words[:at])) + (1 if at else 0)]
        words.insert(at, answer)
    return {"question": "which good", "context": " ".join(words),
            "answers": {"text": [answer] if answer else [], "answer_start": starts}}


def write_questions(path, n: int, seed: int):
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{seed}-{i}", **question(rng)}) + "\n")
    return path
