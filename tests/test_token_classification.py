"""Token classification (one tag per word): sub-token alignment, CoNLL files, the cache's per-token labels
and teacher logits, Stage I heads per token, KD over words, seqeval metrics, and one-line errors."""

import json
import random

import numpy as np
import pytest
import torch
from helpers.builders import FILLER, NEGATIVE, POSITIVE, make_tokenizer
from helpers.commands import run_cli
from transformers import BertConfig, BertForTokenClassification

from tedcache import DataConfig, DistillConfig, ExtractConfig, OptimConfig, distill, extract
from tedcache.cache import Cache, layout
from tedcache.config import FilterConfig, FinetuneConfig, StudentConfig
from tedcache.data import IGNORED, UNTAGGED, load_examples
from tedcache.errors import TedcacheError
from tedcache.evaluate import token_metrics
from tedcache.experiments.stats import entity_counts, example_interval
from tedcache.finetuning import finetune
from tedcache.models import load_tokenizer
from tedcache.students import init_student

TAGS = ["O", "B-POS", "I-POS", "B-NEG", "I-NEG"]


def sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    """Filler words with runs of sentiment words: a run is one entity (B- then I- tags), always followed by
    a filler word, so the tags follow from the words and their left neighbours."""
    words, tags = [], []
    for _ in range(rng.randint(2, 6)):
        if rng.random() < 0.4:
            kind, pool = rng.choice([("POS", POSITIVE), ("NEG", NEGATIVE)])
            run = rng.choices(pool, k=rng.randint(1, 2))
            words += run + [rng.choice(FILLER)]  # a filler word ends the entity: runs never touch
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(run) - 1) + ["O"]
        else:
            words.append(rng.choice(FILLER + ["goodness"]))
            tags.append("O")
    return words, tags


def write_jsonl(path, n: int, seed: int):
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            words, tags = sentence(rng)
            f.write(json.dumps({"tokens": words, "tags": tags}) + "\n")
    return path


@pytest.fixture(scope="module")
def tagged(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tokcls")
    tokenizer = make_tokenizer(root / "base", extra=["##ness"])  # "goodness" -> good ##ness
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=96, max_position_embeddings=64, num_labels=2)
    BertForTokenClassification(config).save_pretrained(root / "base")
    files = {name: write_jsonl(root / f"{name}.jsonl", n, seed)
             for name, n, seed in (("train", 320, 0), ("eval", 40, 1), ("test", 40, 2))}
    data = DataConfig(train=[str(files["train"])], eval=[str(files["eval"])], test=[str(files["test"])],
                      task="token-classification", text_column="tokens", label_column="tags", max_length=32)
    teacher = root / "teacher"
    finetune(FinetuneConfig(model=str(root / "base"), data=data, out=str(teacher), seed=0,
                            optim=OptimConfig(epochs=30, lr=3e-3, batch_size=16)))
    return {"root": root, "data": data, "teacher": str(teacher), "files": files,
            "student": str(init_student(StudentConfig(source=str(teacher), layers=[0, 3], out=str(root / "student"))))}


def test_each_word_is_tagged_on_its_first_sub_token(tagged, tmp_path):
    tokenizer = load_tokenizer(tagged["teacher"])
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"tokens": ["the", "goodness", "good", "great"], "tags": ["O", "O", "B-POS", "I-POS"]}))
    data = DataConfig(train=[str(path)], task="token-classification", text_column="tokens", label_column="tags")
    examples, names = load_examples([str(path)], data, tokenizer, TAGS, "--data")
    ids = examples.input_ids.tolist()
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "the", "good", "##ness", "good", "great", "[SEP]"]
    expected = [IGNORED, 0, 0, IGNORED, 1, 2, IGNORED]
    assert examples.token_labels.tolist() == expected and examples.labels is None
    unlabelled, _ = load_examples([str(path)], data, tokenizer, TAGS, "--transfer-data", unlabelled="all")
    assert unlabelled.token_labels.tolist() == [IGNORED if t == IGNORED else UNTAGGED for t in expected]


def test_conll_files_read_as_sentences(tagged, tmp_path):
    conll = tmp_path / "train.conll"
    conll.write_text("-DOCSTART- O\n\nthe DT O\ngood JJ B-POS\n\nawful JJ B-NEG\nplot NN O\n")
    data = DataConfig(train=[str(conll)], task="token-classification", text_column="tokens", label_column="tags")
    examples, names = load_examples([str(conll)], data, load_tokenizer(tagged["teacher"]), TAGS, "--data")
    assert len(examples) == 2 and sorted(set(examples.token_labels.tolist()) - {IGNORED}) == [0, 1, 3]
    conll.write_text("the\n")
    with pytest.raises(TedcacheError, match="has no tag"):
        load_examples([str(conll)], data, load_tokenizer(tagged["teacher"]), TAGS, "--data")


def test_seqeval_entity_scores():
    names = TAGS
    gold = np.array([1, 2, 0, 3, 0, 1])  # sentence 0: POS(2 words) O NEG; sentence 1: O POS
    pred = np.array([1, 2, 0, 0, 0, 1])  # misses the NEG entity
    example = np.array([0, 0, 0, 0, 1, 1])
    result = token_metrics(pred, gold, example, names)
    assert result["precision"] == 1.0 and result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(0.8) and result["accuracy"] == pytest.approx(5 / 6)


def test_extract_and_distill_token_classification(tagged, tmp_path):
    assert json.loads((tagged["root"] / "teacher" / "metrics.json").read_text())["best"]["f1"] > 0.8  # learnable
    cache = extract(ExtractConfig(teacher=tagged["teacher"], data=tagged["data"], filters=FilterConfig(layers="1,3"),
                                  stage1=OptimConfig(epochs=2, lr=1e-2, batch_size=16), precision="fp32",
                                  cache_dir=str(tmp_path / "caches")))
    opened = Cache(cache)
    meta = opened.metadata
    assert meta.task == "token-classification" and meta.label_names == sorted(TAGS) and meta.num_outputs == 5
    assert all(f"{layer}/accuracy" in meta.stage1_filters["metrics"] for layer in (1, 3))
    test = opened.split("test")
    tokens = int(test.starts[-1] + test.lengths[-1])
    assert test.tokens(layout.TOKEN_LOGITS, 0, tokens).shape == (tokens, 5)
    results = {}
    for method in ("finetune", "kd", "ted"):
        results[method] = distill(DistillConfig(cache=cache, student=tagged["student"], out=str(tmp_path / method),
                                                method=method, optim=OptimConfig(epochs=3, lr=3e-3, batch_size=16),
                                                stage1=OptimConfig(epochs=1, lr=1e-2, batch_size=16)))
    teacher = results["kd"]["teacher"]["test"]
    assert set(teacher) == {"f1", "precision", "recall", "accuracy"} and teacher["f1"] > 0.8
    for report in results.values():
        assert 0.0 <= report["test"]["f1"] <= 1.0
    assert "kl" in results["kd"]["history"][-1] and "mse" in results["ted"]["history"][-1]
    assert results["kd"]["test"]["f1"] > 0.5  # the student learns the tags from the teacher


def test_token_classification_errors(tagged, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"tokens": ["the", "good"], "tags": ["O", "B-WHAT"]}) + "\n")
    result = run_cli("extract", "--teacher", tagged["teacher"], "--task", "token-classification", "--data",
                     tagged["files"]["train"], "--eval-data", bad, "--text-column", "tokens", "--label-column", "tags",
                     "--cache-dir", tmp_path / "c")
    assert result.returncode != 0 and "Traceback" not in result.stderr and "B-WHAT" in result.stderr
    bad.write_text(json.dumps({"tokens": ["the", "good"], "tags": ["O"]}) + "\n")
    result = run_cli("extract", "--teacher", tagged["teacher"], "--task", "token-classification", "--data", bad,
                     "--text-column", "tokens", "--label-column", "tags", "--cache-dir", tmp_path / "c")
    assert result.returncode != 0 and "2 words but 1 tags" in result.stderr
    bad.write_text(json.dumps({"text": "the good", "tags": ["O", "O"]}) + "\n")
    result = run_cli("extract", "--teacher", tagged["teacher"], "--task", "token-classification", "--data", bad,
                     "--text-column", "text", "--label-column", "tags", "--cache-dir", tmp_path / "c")
    assert result.returncode != 0 and "must hold lists of words" in result.stderr
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())  # nothing half-written


def test_entity_f1_paired_bootstrap_over_sentences():
    """Per-sentence entity counts add up to seqeval's micro F1; the paired bootstrap resamples sentences."""
    rng = np.random.default_rng(0)
    sentences = [sentence(random.Random(i)) for i in range(60)]
    gold = np.array([TAGS.index(t) for _, tags in sentences for t in tags])
    example = np.array([i for i, (words, _) in enumerate(sentences) for _ in words])
    noisy = np.where(rng.random(len(gold)) < 0.2, rng.integers(0, len(TAGS), len(gold)), gold)
    good = {"values": gold.copy(), "labels": gold, "example": example}
    bad = {"values": noisy, "labels": gold, "example": example}
    counts = entity_counts(bad, TAGS)
    tp, fp, fn = counts.sum(0)
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(token_metrics(noisy, gold, example, TAGS)["f1"])
    interval = example_interval([good, good], [bad, bad], "token-classification", label_names=TAGS)
    assert interval["n"] == 60 and interval["low"] > 0 and interval["mean"] == pytest.approx(1 - 2 * tp / (2 * tp + fp + fn))
    assert example_interval([good], [bad], "token-classification") is None  # without tag names: not computed
