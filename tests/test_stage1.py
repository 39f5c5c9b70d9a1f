"""Stage I measured: per-filter validation metrics, early stopping on the validation loss, untrained
filters for the ablation, and decoder-only classifiers read at their last real token."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from helpers.builders import FILLER, NEGATIVE, POSITIVE, make_tokenizer, without_dropout, write_rows
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

from tedcache import DataConfig, ExtractConfig, FinetuneConfig, OptimConfig, TedcacheError, extract, finetune
from tedcache.cache import Cache
from tedcache.data import load_examples
from tedcache.filters import FilterBank, FilterSpec
from tedcache.models import load_classifier, load_tokenizer
from tedcache.reader import ExamplesSource
from tedcache.stage1 import FilterTraining, train_filters


def _examples(model_dir, rows_file, model):
    tokenizer = load_tokenizer(str(model_dir))
    examples, _ = load_examples([str(rows_file)], DataConfig(train=[]), tokenizer, None, "--data",
                                model_config=model.config)
    return ExamplesSource(examples), tokenizer.pad_token_id


def test_filters_are_measured_and_stop_when_validation_stops_improving(assets):
    model = load_classifier(str(assets["teacher"]))
    train, pad = _examples(assets["teacher"], assets["train"], model)
    evaluation, _ = _examples(assets["teacher"], assets["eval"], model)
    bank = FilterBank(FilterSpec([1, 3], 48, 40))
    cap = 40
    training = FilterTraining("classification", 2, OptimConfig(epochs=cap, lr=1e-2, batch_size=16, patience=2), pad, 42)
    result = train_filters(model, bank, train, training, eval_source=evaluation)
    measured = result["filters"]
    steps_per_epoch = -(-len(train) // 16)
    assert measured["split"] == "eval" and measured["stopped_early"] and measured["steps"] < cap * steps_per_epoch
    # it stopped two evaluations after the best one, and kept the best filters
    losses = [e["loss"] for e in result["evals"]]
    assert losses.index(min(losses)) == len(losses) - 3 and measured["metrics"] == result["best"]
    for layer in (1, 3):
        assert 0.0 <= measured["metrics"][f"{layer}/accuracy"] <= 1.0 and measured["metrics"][f"{layer}/loss"] > 0
    assert measured["metrics"]["loss"] == (measured["metrics"]["1/loss"] + measured["metrics"]["3/loss"]) / 2


def test_zero_epochs_leave_the_filters_untrained(assets):
    model = load_classifier(str(assets["teacher"]))
    train, pad = _examples(assets["teacher"], assets["train"], model)
    bank = FilterBank(FilterSpec([1, 3], 48, 40))
    before = [p.detach().clone() for p in bank.parameters()]
    result = train_filters(model, bank, train, FilterTraining("classification", 2, OptimConfig(epochs=0, batch_size=16),
                                                               pad, 42))
    assert result["filters"]["steps"] == 0 and result["filters"]["split"] == "train"
    assert all(torch.equal(a, b) for a, b in zip(before, bank.parameters()))


def _last_word_rows(n: int, seed: int) -> list[dict]:
    """The label is the sentiment of the last word; everything before it is filler."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(FILLER, k=rng.randint(3, 9)) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rows.append({"text": " ".join(words), "label": label})
    return rows


def test_decoder_classifier_filters_read_the_last_token(tmp_path):
    """A causal model's first token sees only itself: a Stage-I head there could not beat chance. Here a
    tiny GPT-2 classifier, fine-tuned on a task decided by the last word, teaches its filters."""
    folder = tmp_path / "gpt2-classifier"
    tokenizer = make_tokenizer(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64, num_labels=2,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    train_file = write_rows(tmp_path / "train.csv", _last_word_rows(256, 0))
    eval_file = write_rows(tmp_path / "eval.csv", _last_word_rows(128, 1))
    teacher = tmp_path / "teacher"
    tuned = finetune(FinetuneConfig(model=str(folder), out=str(teacher), data=DataConfig(train=[str(train_file)],
                                                                                          eval=[str(eval_file)]),
                                    optim=OptimConfig(epochs=8, lr=3e-3, batch_size=16)))
    assert tuned["best"]["accuracy"] > 0.9
    model = load_classifier(str(teacher))
    train, pad = _examples(teacher, train_file, model)
    evaluation, _ = _examples(teacher, eval_file, model)
    bank = FilterBank(FilterSpec([0, 1], 32, 32))
    training = FilterTraining("classification", 2, OptimConfig(epochs=20, lr=3e-3, batch_size=16, patience=3), pad, 42)
    result = train_filters(model, bank, train, training, eval_source=evaluation)
    metrics = result["filters"]["metrics"]
    assert metrics["1/accuracy"] > 0.85, metrics


def test_stage1_on_a_sample_of_the_training_split(assets, tmp_path):
    """--stage1-examples N: the filters train on N training examples drawn with the seed (fewer steps), the
    cache pass still covers every example, and the sample is part of the cache's identity."""
    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], max_length=24)
    base = ExtractConfig(teacher=str(assets["teacher"]), data=data, cache_dir=str(tmp_path / "caches"),
                         stage1=OptimConfig(epochs=1, batch_size=8), batch_size=16, shard_tokens=256)
    messages = []
    sampled = extract(replace(base, stage1_examples=32), log=messages.append)
    whole = extract(base)
    assert sampled != whole and extract(replace(base, stage1_examples=10_000)) == whole  # N >= all: the whole split
    meta, whole_meta = Cache(sampled).metadata, Cache(whole).metadata
    assert meta.identity["stage1_examples"] == 32 and "stage1_examples" not in whole_meta.identity
    assert meta.stage1_filters["steps"] == 4 and whole_meta.stage1_filters["steps"] == 12  # 32 / 8, 96 / 8
    assert meta.splits["train"] == whole_meta.splits["train"] == 96
    assert any("stage I on 32 of the 96 training examples" in m for m in messages)
    with pytest.raises(TedcacheError, match="--stage1-examples must be at least 1"):
        extract(replace(base, stage1_examples=0))


def test_a_students_stage1_is_reused_by_runs_with_its_key_and_the_outcome_is_unchanged(assets, tmp_path, monkeypatch):
    """Runs that share the student's and filters' initial weights, the cache, the Stage I settings and the
    seed reuse the first one's Stage I filters; every run ends as one that trains Stage I itself."""
    from tedcache import DistillConfig, distill, distillation

    monkeypatch.setattr(distillation, "STAGE1_STORE", tmp_path / "stage1")
    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], test=[str(assets["test"])],
                      max_length=24)
    cache = extract(ExtractConfig(teacher=str(assets["teacher"]), data=data, cache_dir=str(tmp_path / "c"),
                                  stage1=OptimConfig(epochs=1, batch_size=16)))
    base = DistillConfig(cache=cache, student=str(assets["student"]), out="", method="ted", seed=5,
                         optim=OptimConfig(epochs=2, batch_size=16, lr=1e-3), stage1=OptimConfig(epochs=2, batch_size=16),
                         log_every=1)
    reports, logs = {}, {}
    for name, reuse, lr in (("uncut", False, 1e-3), ("first", True, 1e-3), ("reused", True, 1e-3),
                            ("other stage II", True, 5e-4)):
        logs[name] = []
        reports[name] = distill(replace(base, out=str(tmp_path / name), reuse_stage1=reuse,
                                        optim=replace(base.optim, lr=lr)), log=logs[name].append)
    assert len(list((tmp_path / "stage1").iterdir())) == 1
    assert [any("reused" in line for line in logs[n]) for n in reports] == [False, False, True, True]
    assert ["reused" in reports[n]["phases"]["stage1"] for n in reports] == [False, False, True, True]
    # a reused Stage I reports the seconds it took here (loading), and the training's own beside them
    assert reports["reused"]["phases"]["stage1"]["trained_seconds"] == reports["first"]["phases"]["stage1"]["seconds"]
    for name in ("first", "reused"):
        for part in ("history", "eval", "best", "test"):
            assert reports[name][part] == reports["uncut"][part], (name, part)
        assert reports[name]["phases"]["stage1"]["history"] == reports["uncut"]["phases"]["stage1"]["history"]
    assert reports["other stage II"]["history"] != reports["uncut"]["history"]  # Stage II's own settings still count
    other_seed = distill(replace(base, out=str(tmp_path / "seed 6"), seed=6), log=logs.setdefault("seed 6", []).append)
    assert not any("reused" in line for line in logs["seed 6"]) and "reused" not in other_seed["phases"]["stage1"]
    # the same weights with another configuration (no dropout: Stage I's heads take theirs from it) train anew
    same_weights = without_dropout(assets["student"], tmp_path / "no-dropout")
    other_config = distill(replace(base, out=str(tmp_path / "no dropout"), student=str(same_weights)), log=lambda *_: None)
    assert "reused" not in other_config["phases"]["stage1"]


def test_stage1_reuse_is_on_by_default_and_can_be_turned_off_on_the_command_line():
    from tedcache.cli.main import app

    def given(*flags):
        return app.commands["distill"].make_context("distill", ["--cache", "c", "--student", "s", "--out", "o", *flags])
    assert given().params["reuse_stage1"] is True and given("--no-reuse-stage1").params["reuse_stage1"] is False


@pytest.mark.parametrize("kind, decoder", [("linear", False), ("mlp", False), ("linear", True)])
def test_filtering_only_the_head_s_position_gives_the_loss_and_gradients_of_filtering_every_token(kind, decoder):
    """A sequence head reads one position (token 0, or a decoder's last real token); Stage I filters only that
    position's state: the same loss and the same filter and head gradients as filtering every token."""
    from tedcache.filters import SequenceHead
    from tedcache.stage1 import at_head_positions, head_loss

    torch.manual_seed(0)
    model = (GPT2ForSequenceClassification(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)) if decoder else
             BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                      intermediate_size=32, vocab_size=50)))
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    batch = {"attention_mask": mask, "labels": torch.tensor([0, 1, 1])}
    hidden = [torch.randn(3, 5, 16) for _ in range(2)]
    bank = FilterBank(FilterSpec([0, 1], 16, 8, kind))
    heads = torch.nn.ModuleList(SequenceHead(8, 2, last_token=decoder, dropout=0.0) for _ in range(2))
    results = []
    for states, inputs in ((hidden, batch), at_head_positions(model, hidden, batch, "classification")):
        bank.zero_grad(), heads.zero_grad()
        loss = sum(head_loss(head, f, inputs, "classification") for head, f in zip(heads, bank(states)))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in [*bank.parameters(), *heads.parameters()]]))
    (full, full_grads), (pooled, pooled_grads) = results
    assert at_head_positions(model, hidden, batch, "classification")[0][0].shape == (3, 1, 16)
    torch.testing.assert_close(pooled, full)
    for a, b in zip(pooled_grads, full_grads):
        torch.testing.assert_close(a, b)
