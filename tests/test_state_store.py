"""Stage I on stored states (--stage1-states stored): the filters a live Stage I trains when the frozen model
has no dropout, to float rounding, for the teacher's filters, a causal LM's and the student's; what the
cache records; and a spool that leaves nothing on disk. (That the cache pass's values read from the store
are the teacher's own, bit for bit, is checked where a repaired unit is recomputed by the teacher:
tests/test_store.py, and where a killed extraction resumes: tests/test_resume.py.)"""

from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers.builders import documents, make_lm, without_dropout, write_text
from helpers.caches import assert_same_cache

from tedcache import DataConfig, DistillConfig, ExtractConfig, OptimConfig, distill, extract
from tedcache.cache import Cache
from tedcache.data import load_blocks, load_examples
from tedcache.filters import FilterBank, FilterSpec
from tedcache.models import load_causal_lm, load_classifier, load_tokenizer
from tedcache.reader import ExamplesSource
from tedcache.stage1 import FilterTraining, train_filters
from tedcache.state_store import in_order, store_states, stored_source


def _both_ways(model, bank, source, evaluation, task, num_outputs, pad):
    """(live result, live bank, stored result, stored bank) from the same initial filters and seed."""
    stored_bank = copy.deepcopy(bank)
    cfg = OptimConfig(epochs=3, lr=1e-2, batch_size=16, patience=2)
    training = FilterTraining(task, num_outputs, cfg, pad, 7)
    live = train_filters(model, bank, source, training, eval_source=evaluation)
    source, evaluation = (stored_source(model, s, bank.spec.layers, task, in_order(s, 16, pad))
                          for s in (source, evaluation))
    stored = train_filters(model, stored_bank, source, training, eval_source=evaluation)
    return live, bank, stored, stored_bank


def _assert_same_training(live, live_bank, stored, stored_bank):
    assert live["steps"] == stored["steps"] > 0
    for a, b in zip(live_bank.parameters(), stored_bank.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert stored["filters"]["metrics"] == pytest.approx(live["filters"]["metrics"], rel=1e-4, abs=1e-5)


def test_stored_states_train_the_filters_a_dropout_free_live_stage1_trains(assets, tmp_path):
    folder = without_dropout(assets["teacher"], tmp_path / "teacher")
    model = load_classifier(str(folder))
    tokenizer = load_tokenizer(str(folder))
    sources = [ExamplesSource(load_examples([str(assets[s])], DataConfig(train=[]), tokenizer, None, "--data",
                                            model_config=model.config)[0]) for s in ("train", "eval")]
    torch.manual_seed(0)
    _assert_same_training(*_both_ways(model, FilterBank(FilterSpec([1, 3], 48, 40)), *sources, "classification", 2,
                                      tokenizer.pad_token_id))


def test_a_causal_lm_filters_on_stored_states_too(tmp_path):

    folder = make_lm(tmp_path / "lm", "llama", layers=2)  # (Llama has no dropout by default)
    model = load_causal_lm(str(folder))
    tokenizer = load_tokenizer(str(folder))
    data = DataConfig(train=[], task="causal-lm", block_size=16)
    sources = [ExamplesSource(load_blocks([str(write_text(tmp_path / f"{n}.txt", documents(n, n)))], data, tokenizer,
                                          "--data")) for n in (60, 20)]
    torch.manual_seed(0)
    _assert_same_training(*_both_ways(model, FilterBank(FilterSpec([0, 1], 32, 32)), *sources, "causal-lm", 1,
                                      tokenizer.pad_token_id))


def test_extract_and_distill_with_stored_states_match_live_ones_and_the_cache_says_which(assets, tmp_path):
    teacher = without_dropout(assets["teacher"], tmp_path / "teacher")
    student = without_dropout(assets["student"], tmp_path / "student")
    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], max_length=24)
    base = ExtractConfig(teacher=str(teacher), data=data, cache_dir=str(tmp_path / "caches"), precision="fp32",
                         stage1=OptimConfig(epochs=2, lr=1e-2, batch_size=16), batch_size=16, shard_tokens=256)
    caches = {mode: extract(replace(base, stage1_states=mode)) for mode in ("live", "stored")}
    assert caches["live"] != caches["stored"]  # the mode is part of the cache's identity
    opened = {mode: Cache(path) for mode, path in caches.items()}
    assert {m: c.metadata.stage1["states"] for m, c in opened.items()} == {"live": "live", "stored": "stored"}
    live, stored = (opened[m].metadata.stage1_filters for m in ("live", "stored"))
    assert stored["metrics"] == pytest.approx(live["metrics"], rel=1e-4, abs=1e-5)
    for layer in (0, 1, 2, 3):
        a, b = (opened[m].split("train").states(layer, 0, 1 << 20)[0] for m in ("live", "stored"))
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(opened["live"].split("eval").teacher_logits, opened["stored"].split("eval").teacher_logits,
                               atol=1e-5)

    runs = {mode: distill(DistillConfig(cache=caches["stored"], student=str(student), out=str(tmp_path / mode),
                                        method="ted", student_layers="0,1", stage1_states=mode, max_steps=2,
                                        optim=OptimConfig(batch_size=16),
                                        stage1=OptimConfig(epochs=2, lr=1e-2, batch_size=16)))
            for mode in ("live", "stored")}
    live, stored = (runs[m]["phases"]["stage1"]["filters"] for m in ("live", "stored"))
    assert live["steps"] == stored["steps"] > 0
    assert stored["metrics"] == pytest.approx(live["metrics"], rel=1e-4, abs=1e-5)
    assert runs["stored"]["config"]["stage1_states"] == "stored"


def test_the_spool_is_memory_mapped_and_leaves_no_file(assets, tmp_path, monkeypatch):
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    model = load_classifier(str(assets["teacher"]))
    tokenizer = load_tokenizer(str(assets["teacher"]))
    examples, _ = load_examples([str(assets["eval"])], DataConfig(train=[]), tokenizer, None, "--data",
                                model_config=model.config)
    source = ExamplesSource(examples)
    store = store_states(model, source, [1], "classification", in_order(source, 8, tokenizer.pad_token_id))
    assert isinstance(store.states[0], np.memmap) and list(spool.iterdir()) == []
    assert store.states[0].shape == (examples.num_tokens, 48) and store.example_outputs.shape == (len(examples), 2)
    first = torch.as_tensor(np.array(examples.input_ids[:examples.offsets[1]]), dtype=torch.long)[None]
    with torch.no_grad():
        out = model(input_ids=first, output_hidden_states=True)
    np.testing.assert_allclose(store.states[0][:examples.offsets[1]], out.hidden_states[2][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(store.example_outputs[0], out.logits[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_the_cache_pass_reads_from_the_store_what_the_teacher_computes(assets, tmp_path, task):
    """Every unit of a stored-state extraction forgotten and recomputed by the teacher (as a resume after a
    kill does) gives the cache back bit for bit: the store was filled with the teacher pass's own batches.
    For a causal LM the logits are its output layer on the stored last layer (tapped here)."""

    from tedcache.cache import Problem, repair
    from tedcache.config import FilterConfig

    if task == "causal-lm":
        teacher = make_lm(tmp_path / "lm", "llama", layers=2)
        data = DataConfig(train=[str(write_text(tmp_path / "train.txt", documents(200, 0)))],
                          eval=[str(write_text(tmp_path / "eval.txt", documents(30, 1)))], task=task, block_size=16)
        extra = dict(filters=FilterConfig(layers="0,1"), logits="sample:8")
    else:
        teacher, extra = assets["teacher"], {}
        data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], max_length=24)
    cfg = ExtractConfig(teacher=str(teacher), data=data, cache_dir=str(tmp_path / "caches"), batch_size=8,
                        stage1=OptimConfig(epochs=1, batch_size=16), shard_tokens=128, **extra)
    messages = []
    path = extract(cfg)
    built_once = shutil.copytree(path, tmp_path / "built-once")
    units = Cache(path).metadata.units
    assert repair(path, [Problem("forgotten", (split, u)) for split, count in units.items() for u in range(count)]) > 4
    assert extract(cfg, log=messages.append) == path
    assert messages and not any("stage I" in m for m in messages)  # no Stage I, no store: the teacher ran
    assert_same_cache(str(built_once), path)
