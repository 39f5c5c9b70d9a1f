"""Fixtures: tiny random-initialised BERTs, a word-level tokenizer made here, and a small labelled data set."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from tedcache.cli.main import main

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "dull", "boring", "poor", "weak"]
FILLER = ["the", "movie", "film", "plot", "actor", "was", "and", "very", "quite", "story", "scene", "a"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


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


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("assets")
    return {
        "teacher": make_model(root / "teacher", layers=4, hidden=48),
        "student": make_model(root / "student", layers=2, hidden=32, seed=1),
        "train": write_rows(root / "train.csv", sentiment_rows(96, seed=0)),
        "eval": write_rows(root / "eval.csv", sentiment_rows(32, seed=1)),
        "test": write_rows(root / "test.csv", sentiment_rows(32, seed=2)),
        "root": root,
    }


def run_cli(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The `tedcache` command run in this process: the console entry point's own function (cli.main.main,
    flags parsed, errors turned into one line and an exit status), its output captured. Returns what a
    subprocess would (returncode, stdout, stderr) without the seconds a new interpreter spends importing
    torch and transformers."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(cwd or os.getcwd()):
        try:
            main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    return subprocess.CompletedProcess(["tedcache", *map(str, args)], code, out.getvalue(), err.getvalue())


def run_cli_process(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real `tedcache` console entry point in a subprocess (for what needs a process of its own)."""
    return subprocess.run([sys.executable, "-m", "tedcache.cli.main", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture
def fault_log():
    """fault_log(line): one line for `make faults`' summary (what was done, how often, what was lost), written
    to $TEDCACHE_FAULTS_REPORT when set; call it once every check of the test has passed."""
    def log(line: str) -> None:
        report = os.environ.get("TEDCACHE_FAULTS_REPORT")
        if report:
            with open(report, "a") as f:
                f.write(line + "\n")

    return log
