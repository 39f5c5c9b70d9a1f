"""A cache from a trainer of one's own: the map-style CacheDataset gives the reader's examples and
targets (in any order, through DataLoader workers and a DistributedSampler), and DistillationTrainer (a
transformers.Trainer) trains on distill's losses step for step; wrong inputs are refused in one line."""

import json

import pytest
import torch
from helpers.builders import make_model, without_dropout
from helpers.caches import extract_classifier, extract_lm
from torch.utils.data import DataLoader, DistributedSampler
from transformers import TrainingArguments

from tedcache import DistillConfig, OptimConfig, distill
from tedcache.cache import Cache, CompactStates
from tedcache.errors import TedcacheError
from tedcache.hf import DistillationTrainer
from tedcache.reader import CacheDataset, CacheSource, iterate_batches


@pytest.fixture(scope="module")
def ted_cache(assets, tmp_path_factory):
    return extract_classifier(assets, tmp_path_factory.mktemp("trainers"))[1]


def _assert_same_batch(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if isinstance(value, list):  # teacher states, one CompactStates per layer
            for a, b in zip(got[key], value):
                torch.testing.assert_close(a.widen(), b.widen(), rtol=0, atol=0)
        elif isinstance(value, CompactStates):
            torch.testing.assert_close(got[key].widen(), value.widen(), rtol=0, atol=0)
        elif isinstance(value, dict):
            for name in value:
                torch.testing.assert_close(got[key][name], value[name], rtol=0, atol=0)
        else:
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def _reader_batches(cache: str, layers: list[int], with_logits: bool, batch_size: int) -> list[dict]:
    opened = Cache(cache)
    source = CacheSource(opened.split("train"), layers, with_logits)
    return list(iterate_batches(source, batch_size, opened.metadata.pad_token_id))


def test_the_dataset_gives_the_reader_s_examples_and_targets(ted_cache):
    dataset = CacheDataset(ted_cache, "train", windows=1)
    layers = Cache(ted_cache).layers
    assert len(dataset) == 96 and len(layers) == 4
    loader = DataLoader(dataset, batch_size=16, collate_fn=dataset.collate)
    for got, want in zip(loader, _reader_batches(ted_cache, layers, True, 16), strict=True):
        _assert_same_batch(got, want)
    item = dataset[5]
    assert item["example_index"] == 5 and item["input_ids"].ndim == 1 and len(item["teacher_states"]) == 4
    assert item["teacher_states"][0][0].shape == (len(item["input_ids"]), Cache(ted_cache).metadata.filter_dim)


def test_workers_and_a_distributed_sampler_cover_every_example_once(ted_cache):
    dataset = CacheDataset(ted_cache, "train")
    want = {int(i): b for b in _reader_batches(ted_cache, Cache(ted_cache).layers, True, 1)
            for i in b["example_index"]}
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=3)
        loader = DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=2, collate_fn=dataset.collate)
        for batch in loader:
            index = int(batch["example_index"][0])
            seen.append(index)
            _assert_same_batch(batch, want[index])
    assert sorted(seen) == list(range(96))


def test_the_dataset_carries_a_causal_lm_cache_s_sparse_rows(lm_assets, tmp_path):  # noqa: F811
    _, cache = extract_lm(lm_assets, tmp_path)
    dataset = CacheDataset(cache, "train")
    loader = DataLoader(dataset, batch_size=4, collate_fn=dataset.collate)
    batches = list(loader)
    assert "teacher_rows" in batches[0]
    for got, want in zip(batches, _reader_batches(cache, Cache(cache).layers, True, 4), strict=True):
        _assert_same_batch(got, want)


def _trainer_args(out, **extra) -> TrainingArguments:
    return TrainingArguments(str(out), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3, warmup_steps=0,
                             weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, seed=3, report_to=[],
                             save_strategy="no", use_cpu=True, optim="adamw_torch_fused", disable_tqdm=True, **extra)


def test_the_trainer_trains_on_distill_s_losses(ted_cache, tmp_path):
    """No dropout, no clipping, no weight decay: both train the same student and filters on the same
    batches with AdamW and the linear schedule, so every step's loss terms agree to float rounding."""
    student = str(without_dropout(make_model(tmp_path / "student", layers=2, hidden=32, seed=1)))
    stage1 = OptimConfig(epochs=1, lr=1e-3, batch_size=16)
    distill(DistillConfig(cache=ted_cache, student=student, out=str(tmp_path / "distill"), method="ted", seed=3,
                          optim=OptimConfig(epochs=3, lr=1e-3, batch_size=8, warmup_ratio=0.0, weight_decay=0.0),
                          stage1=stage1, max_steps=6, log_every=1))
    history = json.loads((tmp_path / "distill" / "metrics.json").read_text())["history"]
    trainer = DistillationTrainer(ted_cache, student, _trainer_args(tmp_path / "trainer"), method="ted", stage1=stage1)
    trainer.train()
    logged = [record for record in trainer.state.log_history if "stage2/loss" in record]
    assert [h["step"] for h in history] == [r["step"] for r in logged] == list(range(1, 7))
    for mine, theirs in zip(logged, history):
        for term in ("loss", "task", "kl", "mse", "mse/0", "mse/1"):
            assert mine[f"stage2/{term}"] == pytest.approx(theirs[term], rel=1e-5), (mine["step"], term)
    assert history[-1]["loss"] < history[0]["loss"]


def test_the_trainer_refuses_what_it_cannot_train_in_one_line(ted_cache, tmp_path):
    other_vocab = str(make_model(tmp_path / "other", layers=2, hidden=32, extra_vocab=["zebra"]))
    with pytest.raises(TedcacheError, match="tokenizer vocabulary differs") as refused:
        DistillationTrainer(ted_cache, other_vocab, _trainer_args(tmp_path / "a"), method="kd")
    student = str(make_model(tmp_path / "student", layers=2, hidden=32, seed=1))
    with pytest.raises(TedcacheError, match="--method lwd needs a cache of raw teacher states") as refused_lwd:
        DistillationTrainer(ted_cache, student, _trainer_args(tmp_path / "b"), method="lwd")
    no_states = CacheDataset(ted_cache, "train", layers=[])
    trainer = DistillationTrainer(ted_cache, student, _trainer_args(tmp_path / "c"), method="ted",
                                  stage1=OptimConfig(epochs=0), trainer_kwargs=dict(
                                      train_dataset=no_states, data_collator=no_states.collate))
    with pytest.raises(TedcacheError, match="the batch has no 'teacher_states'") as refused_batch:
        trainer.train()
    assert all("\n" not in str(r.value) for r in (refused, refused_lwd, refused_batch))
