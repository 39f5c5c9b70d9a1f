"""Extractive question answering: windows over long contexts with a stride, answer tokens and character
spans, SQuAD json, best span across windows with the no-answer case, SQuAD EM/F1, the cache's per-token
start/end logits, Stage I heads per token, KD over start and end, and one-line errors."""

import json

import numpy as np
import pytest
import torch
from helpers.builders import make_tokenizer, write_questions
from helpers.commands import run_cli
from transformers import BertConfig, BertForQuestionAnswering

from tedcache import DataConfig, DistillConfig, ExtractConfig, OptimConfig, distill, extract
from tedcache.cache import Cache, layout, verify
from tedcache.config import FilterConfig, FinetuneConfig, StudentConfig
from tedcache.data import load_examples, load_table
from tedcache.data.questions import NO_ANSWER
from tedcache.experiments.stats import example_interval
from tedcache.finetuning import finetune
from tedcache.models import load_tokenizer
from tedcache.qa import answer_questions, best_span, squad_scores
from tedcache.run_folder import PREDICTIONS_FILE
from tedcache.students import init_student


@pytest.fixture(scope="module")
def answered(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("qa")
    tokenizer = make_tokenizer(root / "base", extra=["which"])
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=96, max_position_embeddings=64)
    BertForQuestionAnswering(config).save_pretrained(root / "base")
    files = {name: write_questions(root / f"{name}.jsonl", n, seed)
             for name, n, seed in (("train", 320, 0), ("eval", 40, 1), ("test", 40, 2))}
    data = DataConfig(train=[str(files["train"])], eval=[str(files["eval"])], test=[str(files["test"])],
                      task="question-answering", max_length=24, doc_stride=6)
    teacher = root / "teacher"
    finetune(FinetuneConfig(model=str(root / "base"), data=data, out=str(teacher), seed=0,
                            optim=OptimConfig(epochs=8, lr=3e-3, batch_size=16)))
    return {"root": root, "data": data, "teacher": str(teacher), "files": files,
            "student": str(init_student(StudentConfig(source=str(teacher), layers=[0, 3], out=str(root / "student"))))}


def test_windows_cover_long_contexts_and_keep_answer_spans(answered):
    tokenizer = load_tokenizer(answered["teacher"])
    data = answered["data"]
    table = load_table([str(answered["files"]["train"])])
    examples, _ = load_examples([str(answered["files"]["train"])], data, tokenizer, None, "--data")
    assert len(examples) > len(table)  # long contexts make several windows
    # the windows' tokens and spans are spooled to disk while tokenizing, never all in memory
    assert isinstance(examples.input_ids, np.memmap) and isinstance(examples.context_spans, np.memmap)
    assert np.diff(examples.offsets).max() <= data.max_length
    found = 0
    for window in range(len(examples)):
        q = examples.question_index[window]
        row = table[int(q)]
        a, b = examples.offsets[window], examples.offsets[window + 1]
        spans = examples.context_spans[a:b]
        start, end = examples.labels[window]
        if (start, end) == (NO_ANSWER, NO_ANSWER):
            continue
        found += 1
        assert row["context"][spans[start, 0]:spans[end, 1]] == row["answers"]["text"][0]
    assert found >= sum(bool(r["text"]) for r in table["answers"])  # every answer is in some window
    # consecutive windows of one question share doc_stride context tokens
    same = np.flatnonzero(examples.question_index[1:] == examples.question_index[:-1])
    w = int(same[0])
    first = examples.context_spans[examples.offsets[w]:examples.offsets[w + 1]]
    second = examples.context_spans[examples.offsets[w + 1]:examples.offsets[w + 2]]
    first, second = first[first[:, 0] >= 0], second[second[:, 0] >= 0]
    assert (first[-data.doc_stride:] == second[:data.doc_stride]).all()


def test_squad_json_is_read_one_row_per_question(tmp_path):
    squad = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "the good plot", "qas": [
        {"id": "a", "question": "which good", "answers": [{"text": "good", "answer_start": 4}]},
        {"id": "b", "question": "which bad", "answers": [], "plausible_answers": [{"text": "plot", "answer_start": 9}],
         "is_impossible": True}]}]}]}
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(squad))
    table = load_table([str(path)])
    assert table["id"] == ["a", "b"] and table["context"] == ["the good plot"] * 2
    assert table["answers"] == [{"text": ["good"], "answer_start": [4]}, {"text": [], "answer_start": []}]


def test_squad_exact_match_and_f1():
    assert squad_scores("The Good!", ["good"]) == (1.0, 1.0)  # case, punctuation and articles ignored
    exact, f1 = squad_scores("very good plot", ["good plot", "lovely"])
    assert exact == 0.0 and f1 == pytest.approx(0.8)  # precision 2/3, recall 1
    assert squad_scores("", []) == (1.0, 1.0) and squad_scores("good", []) == (0.0, 0.0)


def test_best_span_across_windows_and_no_answer():
    spans = np.array([[-1, -1], [0, 3], [4, 8], [9, 13]])
    logits = np.zeros((4, 2))
    logits[2, 0], logits[3, 1], logits[0] = 2.0, 3.0, (1.0, 1.0)
    assert best_span(logits, spans) == (5.0, 2.0, 4, 13)
    logits[3, 0] = 9.0  # start after end is never chosen; the best is then the one-token span at 3
    assert best_span(logits, spans)[2:] == (9, 13)
    questions = [{"id": "x", "context": "the good plot", "answers": ["good"]},
                 {"id": "y", "context": "the plot", "answers": []}]
    windows = np.array([[1.0, 0.5, 4, 8], [3.0, 0.0, 0, 3],  # question 0: the second window's span wins...
                        [2.0, 5.0, 0, 3]])  # ...question 1: no answer beats the span
    result = answer_questions(windows, np.array([0, 0, 1]), questions)
    assert result["values"].tolist() == [0.0, 1.0] and result["has_answer"].tolist() == [True, False]


def test_extract_and_distill_question_answering(answered, tmp_path):
    teacher_eval = json.loads((answered["root"] / "teacher" / "metrics.json").read_text())["best"]
    assert teacher_eval["f1"] > 0.8  # learnable
    cache = extract(ExtractConfig(teacher=answered["teacher"], data=answered["data"],
                                  filters=FilterConfig(layers="1,3"), stage1=OptimConfig(epochs=2, lr=1e-2, batch_size=16),
                                  precision="fp32", cache_dir=str(tmp_path / "caches")))
    assert verify(cache) == []
    opened = Cache(cache)
    meta = opened.metadata
    assert meta.task == "question-answering" and meta.num_outputs == 2
    assert all(f"{layer}/accuracy" in meta.stage1_filters["metrics"] for layer in (1, 3))
    test = opened.split("test")
    tokens = int(test.starts[-1] + test.lengths[-1])
    assert test.tokens(layout.TOKEN_LOGITS, 0, tokens).shape == (tokens, 2)
    assert len(test.questions) == 40 and test.question_index.max() == 39 and test.labels.shape == (len(test), 2)
    results = {}
    for method in ("finetune", "kd", "ted"):
        results[method] = distill(DistillConfig(cache=cache, student=answered["student"], out=str(tmp_path / method),
                                                method=method, optim=OptimConfig(epochs=3, lr=3e-3, batch_size=16),
                                                stage1=OptimConfig(epochs=1, lr=1e-2, batch_size=16)))
    teacher = results["kd"]["teacher"]["test"]
    assert {"f1", "exact", "has_answer_f1", "no_answer_f1"} <= set(teacher) and teacher["f1"] > 0.8
    assert "kl" in results["kd"]["history"][-1] and "mse" in results["ted"]["history"][-1]
    assert results["kd"]["test"]["f1"] > 0.5  # the student learns to answer from the teacher
    outputs = [dict(np.load(tmp_path / m / PREDICTIONS_FILE)) for m in ("kd", "finetune")]
    assert len(outputs[0]["values"]) == 40  # per question
    interval = example_interval([outputs[0]], [outputs[1]], "question-answering")
    assert interval["n"] == 40 and interval["low"] <= interval["mean"] <= interval["high"]


def test_question_answering_errors(answered, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "which good", "context": "the good plot",
                               "answers": {"text": ["good"], "answer_start": [0]}}) + "\n")
    base = ["extract", "--teacher", answered["teacher"], "--task", "question-answering", "--cache-dir", tmp_path / "c"]
    result = run_cli(*base, "--data", bad)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "is not at character 0 of its context" in result.stderr
    bad.write_text(json.dumps({"question": "which good", "passage": "the good plot"}) + "\n")
    result = run_cli(*base, "--data", bad)
    assert result.returncode != 0 and "no column 'context'" in result.stderr
    result = run_cli(*base, "--data", answered["files"]["train"], "--transfer-data", answered["files"]["eval"])
    assert result.returncode != 0 and "takes no unlabelled transfer data" in result.stderr
    result = run_cli(*base, "--data", answered["files"]["train"], "--max-length", "24", "--doc-stride", "12")
    assert result.returncode != 0 and "--doc-stride (12) must be below half" in result.stderr
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())  # nothing half-written
