"""Unlabelled transfer data: a cache of labelled and unlabelled examples, and one of unlabelled text only.
The cache holds the teacher's outputs for every example; distill's task loss reads gold labels only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.builders import sentiment_rows, write_rows

from tedcache import DataConfig, DistillConfig, ExtractConfig, OptimConfig, distill, extract
from tedcache.cache import Cache
from tedcache.errors import TedcacheError
from tedcache.losses import labels_or_teacher, task_loss


def test_task_loss_reads_only_gold_labels():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.0]])
    labels = torch.tensor([0, -1, 1])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert task_loss(logits, labels, "classification") == pytest.approx(float(expected))
    assert float(task_loss(logits, torch.tensor([-1, -1, -1]), "classification")) == 0.0
    targets = torch.tensor([1.0, float("nan"), 3.0])
    assert float(task_loss(torch.tensor([[2.0], [9.0], [3.0]]), targets, "regression")) == pytest.approx(0.5)
    assert labels_or_teacher(labels, logits, "classification").tolist() == [0, 0, 1]


def _text_only(path, rows):
    return write_rows(path, [{"text": r["text"]} for r in rows])


def test_a_cache_of_labelled_and_unlabelled_examples(assets, tmp_path):
    transfer = _text_only(tmp_path / "transfer.csv", sentiment_rows(64, seed=7))
    data = DataConfig(train=[str(assets["train"])], transfer=[str(transfer)], eval=[str(assets["eval"])],
                      test=[str(assets["test"])])
    path = extract(ExtractConfig(teacher=str(assets["teacher"]), data=data, cache_dir=str(tmp_path / "c"),
                                 stage1=OptimConfig(epochs=1, batch_size=16)))
    cache = Cache(path)
    train = cache.split("train")
    assert len(train) == 96 + 64 and cache.metadata.labelled_train == 96
    assert (train.labels == -1).sum() == 64 and train.teacher_logits.shape == (160, 2)
    assert np.isfinite(train.teacher_logits).all()
    report = distill(DistillConfig(cache=path, student=str(assets["student"]), out=str(tmp_path / "run"),
                                   log_every=1, optim=OptimConfig(epochs=1, batch_size=16)))
    assert "accuracy" in report["test"] and all(np.isfinite(h["loss"]) for h in report["history"])


def test_a_cache_of_unlabelled_text_only(assets, tmp_path):
    rows = sentiment_rows(64, seed=8)
    unlabelled = write_rows(tmp_path / "unlabelled.csv", [{"text": r["text"], "label": ""} for r in rows])
    data = DataConfig(train=[str(unlabelled)], eval=[str(assets["eval"])])
    path = extract(ExtractConfig(teacher=str(assets["teacher"]), data=data, cache_dir=str(tmp_path / "c"),
                                 stage1=OptimConfig(epochs=1, batch_size=16)))
    cache = Cache(path)
    assert cache.metadata.labelled_train == 0 and (cache.split("train").labels == -1).all()
    assert cache.metadata.stage1_filters["steps"] > 0  # the filters learned the teacher's predictions
    report = distill(DistillConfig(cache=path, student=str(assets["student"]), out=str(tmp_path / "run"),
                                   method="kd", log_every=1, optim=OptimConfig(epochs=1, batch_size=16)))
    assert all(h["task"] == 0.0 and h["kl"] > 0 for h in report["history"])


def test_empty_labels_are_refused_outside_a_caches_training_data(assets, tmp_path):
    rows = sentiment_rows(8, seed=9)
    rows[3]["label"] = ""
    holey = write_rows(tmp_path / "holey.csv", rows)
    data = DataConfig(train=[str(assets["train"])], eval=[str(holey)])
    with pytest.raises(TedcacheError, match="empty labels"):
        extract(ExtractConfig(teacher=str(assets["teacher"]), data=data, cache_dir=str(tmp_path / "c")))
