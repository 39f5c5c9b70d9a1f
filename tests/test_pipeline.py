"""Stage I, the cache round trip, Stage II on cached vs live targets, distill without the teacher."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.builders import make_model, sentiment_rows, write_rows
from helpers.caches import extract_classifier

from tedcache import DataConfig, DistillConfig, ExtractConfig, OptimConfig, distill, extract
from tedcache.cache import Cache, CompactStates
from tedcache.config import FilterConfig
from tedcache.data import load_examples
from tedcache.errors import TedcacheError
from tedcache.filters import FilterBank, FilterSpec
from tedcache.layer_maps import map_layers
from tedcache.losses import Stage2Loss
from tedcache.models import load_classifier, load_tokenizer
from tedcache.reader import CacheSource, ExamplesSource, iterate_batches
from tedcache.stage1 import FilterTraining, train_filters
from tedcache.stage2 import stage2_step
from tedcache.teacher import teacher_targets


def test_stage1_changes_only_filters_and_heads(assets):
    tokenizer = load_tokenizer(str(assets["teacher"]))
    model = load_classifier(str(assets["teacher"]))
    examples, _ = load_examples([str(assets["train"])], DataConfig(train=[]), tokenizer, None, "--data",
                                model_config=model.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bank = FilterBank(FilterSpec([1, 3], 48, 40))
    bank_before = [p.detach().clone() for p in bank.parameters()]
    train_filters(model, bank, ExamplesSource(examples),
                  FilterTraining("classification", 2, OptimConfig(epochs=1, lr=1e-2, batch_size=16), tokenizer.pad_token_id, 42))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not torch.equal(a, b) for a, b in zip(bank_before, bank.parameters()))


def _teacher_bank(path) -> FilterBank:
    return FilterBank.from_bytes(Cache(path).filter_files())


# relative RMS error bound of the stored states per precision
@pytest.mark.parametrize("precision,bound", [("fp32", 0.0), ("fp16", 1e-3), ("bf16", 8e-3), ("int8", 2e-2)])
def test_cache_round_trip_matches_live_teacher(assets, tmp_path, precision, bound):
    cfg, path = extract_classifier(assets, tmp_path, precision=precision)
    cache = Cache(str(path))
    meta = cache.metadata
    assert meta.complete and meta.precision == precision and meta.layers == [0, 1, 2, 3]
    for key in ("format_version", "teacher_weights_sha256", "tokenizer_vocab_sha256", "data_fingerprint",
                "label_names", "filter_dim", "stage1", "created_by", "max_length", "tokenizer_sha256", "config",
                "stage1_filters"):
        assert getattr(meta, key) is not None, key
    assert meta.stage1_filters["split"] == "eval" and set(meta.stage1_filters["metrics"]) >= {"0/accuracy", "3/loss"}
    teacher = load_classifier(str(assets["teacher"])).eval()
    bank = _teacher_bank(path).eval()
    tokenizer = load_tokenizer(str(assets["teacher"]))
    examples, _ = load_examples([str(assets["train"])], cfg.data, tokenizer, None, "--data",
                                model_config=teacher.config)
    split = cache.split("train")
    stored = examples.reorder(split.example_ids)  # rows are stored in a seeded shuffled order
    for i in range(len(stored)):
        tokens = split.tokens("input_ids", split.starts[i], split.starts[i] + split.lengths[i])
        assert tokens.tolist() == stored.input_ids[stored.offsets[i]:stored.offsets[i + 1]].tolist()
    assert np.array_equal(split.labels, stored.labels)
    source = CacheSource(split, meta.layers)
    live = ExamplesSource(stored)
    batches = 0
    for cached, fresh in zip(iterate_batches(source, 16, 0), iterate_batches(live, 16, 0)):
        assert torch.equal(cached["input_ids"], fresh["input_ids"])
        logits, states = teacher_targets(teacher, bank, fresh)
        assert torch.allclose(cached["teacher_logits"], logits, atol=1e-5)
        mask = fresh["attention_mask"].bool()
        for got, want in zip(cached["teacher_states"], states):
            assert (got.values.dtype == torch.float32) == (precision == "fp32")  # compact until widened
            error = (got.widen()[mask] - want[mask]).pow(2).mean().sqrt() / want[mask].pow(2).mean().sqrt()
            assert error <= bound if bound else torch.equal(got.widen()[mask], want[mask])
        batches += 1
    assert batches == 6
    assert cache.split("eval") is not None and len(cache.split("test")) == 32


def test_same_inputs_reuse_the_cache_and_different_inputs_do_not_collide(assets, tmp_path):
    cfg, path = extract_classifier(assets, tmp_path)
    stamp = (Path(path) / "zarr.json").stat().st_mtime_ns
    assert extract(cfg) == path and (Path(path) / "zarr.json").stat().st_mtime_ns == stamp
    cfg.filters = FilterConfig(layers="every:2", dim=16)
    other = extract(cfg)
    assert other != path and Cache(str(other)).metadata.layers == [1, 3]
    assert Cache(str(other)).split("train").states(1, 0, 5)[0].shape == (5, 16)


def test_stage2_loss_on_cached_targets_equals_live_teacher(assets, tmp_path):
    cfg, path = extract_classifier(assets, tmp_path, precision="fp32")
    cache = Cache(str(path))
    teacher = load_classifier(str(assets["teacher"])).eval()
    bank_t = _teacher_bank(path).eval()
    student = load_classifier(str(assets["student"]), task="classification", label_names=["0", "1"]).eval()
    s_layers, t_layers = map_layers([0, 1], cache.layers, "interval", 2)
    assert t_layers == [1, 3]
    bank_s = FilterBank(FilterSpec(s_layers, 32, cache.metadata.filter_dim))
    loss = Stage2Loss("classification", "ted", kl_alpha=3.0, mse_alpha=5.0, temperature=2.0, filters=bank_s)
    batch = next(iterate_batches(CacheSource(cache.split("train"), t_layers), 16, 0))
    offline, _ = stage2_step(student, loss, batch)
    logits, states = teacher_targets(teacher, bank_t, batch)
    live = {**batch, "teacher_logits": logits,
            "teacher_states": [CompactStates(states[cache.layers.index(t)]) for t in t_layers]}
    online, terms = stage2_step(student, loss, live)
    assert set(terms) == {"task", "kl", "mse", "mse/0", "mse/1"}
    assert terms["mse"] == pytest.approx((terms["mse/0"] + terms["mse/1"]).item() / 2)
    torch.testing.assert_close(offline, online, atol=1e-6, rtol=1e-6)


def test_distill_without_teacher_all_methods(assets, tmp_path):
    teacher = tmp_path / "teacher-copy"
    shutil.copytree(assets["teacher"], teacher)
    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], test=[str(assets["test"])])
    path = extract(ExtractConfig(teacher=str(teacher), data=data, cache_dir=str(tmp_path / "c"),
                                 stage1=OptimConfig(epochs=1, batch_size=16)))
    shutil.rmtree(teacher)
    for method in ("ted", "kd", "finetune"):
        out = tmp_path / method
        report = distill(DistillConfig(cache=str(path), student=str(assets["student"]), out=str(out), method=method,
                                       optim=OptimConfig(epochs=2, batch_size=16, lr=1e-3)))
        saved = json.loads((out / "metrics.json").read_text())
        assert saved["method"] == method and len(saved["eval"]) == 2 and saved["best"] in saved["eval"]
        assert "accuracy" in saved["test"] and "accuracy" in saved["teacher"]["test"]
        assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
        terms = set(report["history"][-1])
        assert ("mse" in terms) == (method == "ted") and ("kl" in terms) == (method != "finetune")


def test_layer_map_rules():
    assert map_layers([0, 1], [0, 1, 2, 3, 4, 5], "interval", 2) == ([0, 1], [2, 5])
    assert map_layers([0, 1, 2], [1, 3, 5], "interval", 3) == ([0, 1, 2], [1, 3, 5])
    assert map_layers([0, 1], [0, 1, 2], "0:0,1:2", 2) == ([0, 1], [0, 2])
    # the demo student copies teacher layers 0 and 5: its layer 1 was trained to read teacher layer 4's output
    assert map_layers([0, 1], [2, 4, 5], "copy", 2, copied_from=[0, 5], teacher_total=6) == ([0, 1], [4, 5])
    assert map_layers([0, 2], list(range(30)), "copy", 3, [0, 12, 24], 30) == ([0, 2], [11, 29])
    for student, cache, rule in (([0, 1, 2], [0, 1], "interval"), ([0, 1], [0, 1, 2], "interval"),
                                 ([0, 1], [0, 1], "0:7"), ([0, 1], [0, 1], "x"), ([0, 1], [0, 1], "copy")):
        with pytest.raises(TedcacheError):
            map_layers(student, cache, rule, 2)
    with pytest.raises(TedcacheError, match="--layers 2,4,5"):
        map_layers([0, 1], [2, 5], "copy", 2, copied_from=[0, 5], teacher_total=6)


def test_regression_end_to_end(tmp_path):

    teacher = make_model(tmp_path / "t", layers=2, hidden=32, num_labels=1)
    train = write_rows(tmp_path / "r.csv", sentiment_rows(48, seed=5, regression=True))
    data = DataConfig(train=[str(train)], eval=[str(train)], task="regression")
    path = extract(ExtractConfig(teacher=str(teacher), data=data, cache_dir=str(tmp_path / "c"),
                                 stage1=OptimConfig(epochs=1, batch_size=16)))
    student = make_model(tmp_path / "s", layers=1, hidden=32, num_labels=1)
    report = distill(DistillConfig(cache=str(path), student=str(student), out=str(tmp_path / "o"),
                                   student_layers="all", layer_map="0:1", optim=OptimConfig(epochs=1, batch_size=16)))
    assert {"pearson", "spearman"} <= set(report["best"])
    with pytest.raises(TedcacheError, match="regression"):
        extract(ExtractConfig(teacher=str(tmp_path / "s"), data=DataConfig(train=[str(train)], task="classification"),
                              cache_dir=str(tmp_path / "c")))


def test_online_mode_refuses_another_teacher(assets, tmp_path):
    _, path = extract_classifier(assets, tmp_path)
    with pytest.raises(TedcacheError, match="not the teacher"):
        distill(DistillConfig(cache=path, student=str(assets["student"]), out=str(tmp_path / "o"),
                              teacher=str(assets["student"])))
