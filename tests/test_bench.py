"""`tedcache bench`: its extraction reference (the bare forward over exactly the extraction's batches) and a whole run."""

from __future__ import annotations

import pytest
import torch
from helpers.builders import make_lm_tokenizer
from torch.nn.modules.module import register_module_forward_hook
from transformers.models.bert.modeling_bert import BertEmbeddings

from tedcache.cache import Cache
from tedcache.config import DataConfig, ExtractConfig
from tedcache.demos.bench import bare_forward_seconds
from tedcache.demos.demo import minilm_path
from tedcache.extraction import extract
from tedcache.taps import PROBE_TOKENS


def test_bare_forward_batches_exactly_as_extraction(assets, tmp_path):
    shapes = []

    def record(module, args, output):
        if isinstance(module, BertEmbeddings):
            shapes.append((tuple(output.shape[:2]), torch.is_grad_enabled()))

    # raw states: no Stage I, so every teacher forward is the teacher pass (int8 calibration on unit 0 included)
    cfg = ExtractConfig(teacher=str(assets["teacher"]), states="raw", shard_tokens=256, batch_size=16,
                        data=DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], max_length=32),
                        cache_dir=str(tmp_path / "caches"))
    handle = register_module_forward_hook(record)
    try:
        cache = extract(cfg)
        extraction = list(shapes)
        shapes.clear()
        seconds = bare_forward_seconds(cfg, cache)
    finally:
        handle.remove()

    meta = Cache(cache).metadata
    assert meta.units["train"] > 2  # several units, so the calibration unit is one of many
    probe = ((1, PROBE_TOKENS), False)  # each load runs the model once on a dummy input to find its parts
    assert extraction[0] == probe and shapes[0] == probe
    extraction, shapes = extraction[1:], shapes[1:]
    assert shapes == extraction and not any(grad for _, grad in shapes)
    assert sum(size for (size, _), _ in shapes) == sum(meta.splits.values())
    assert 0 < seconds and 0 < meta.timings["teacher_pass_s"] < meta.timings["total_s"]


@pytest.mark.long
@pytest.mark.process  # each mode is measured in a process of its own
def test_bench_runs_every_mode_side_by_side(tmp_path, monkeypatch):
    """`tedcache bench` end to end on the MiniLM pair, a few steps: every mode measured in its own process."""
    from transformers import AutoTokenizer, BertConfig

    from tedcache.demos.bench import run_bench

    shapes = tmp_path / "minilm-shapes"  # MiniLM's tokenizer and a small config: timing only needs shapes
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(shapes)
    BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=6, num_attention_heads=2,
               intermediate_size=128).save_pretrained(shapes)
    monkeypatch.setenv("TEDCACHE_BENCH_MINILM", str(shapes))
    [row] = run_bench(str(tmp_path / "bench"), ("minilm",), steps=5, batch_size=8, examples=64)
    assert row["device"] == "cpu" and row["extract_over_forward"] > 0 and row["stage1_s"] > 0
    assert row["whole_extract_in_forwards"] > 1 / row["extract_over_forward"]  # Stage I and loading cost too
    for mode in ("student_only", "offline", "online"):
        assert row[f"{mode}_step_s"] > 0 and row[f"peak_mem_{'student' if mode == 'student_only' else mode}_mb"] > 0


@pytest.mark.long
@pytest.mark.process  # Stage II modes and tune studies each run in a process of their own
def test_big_profile_times_every_part_on_a_tiny_llama(tmp_path, monkeypatch):
    """`bench --profile big` end to end with tiny shapes: a random Llama teacher (the tokenizer from
    TEDCACHE_BENCH_SMOLLM2), a random student of the profile's shape, every figure measured, the live
    trials really run with the teacher."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from tedcache.demos.bench_big import BigProfile, LlamaShape, big_table, run_big

    make_lm_tokenizer(tmp_path / "tokenizer", [f"w{i}" for i in range(300)])
    monkeypatch.setenv("TEDCACHE_BENCH_SMOLLM2", str(tmp_path / "tokenizer"))
    profile = BigProfile(teacher=LlamaShape(4, 32, 4, 2, 64), student=LlamaShape(2, 16, 2, 1, 32),
                         teacher_layers="every:2", student_layers="all", block_size=32, batch_size=4, blocks=24,
                         text_repeats=2, steps=5, trials=1, trial_steps=3)
    work = tmp_path / "big"
    row = run_big(str(work), profile)

    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher")
    assert row["teacher_params"] == sum(p.numel() for p in teacher.parameters())
    student = AutoConfig.from_pretrained(work / "student")
    assert (student.num_hidden_layers, student.hidden_size, student.num_attention_heads,
            student.num_key_value_heads, student.intermediate_size) == (2, 16, 2, 1, 32)
    assert row["device"] == "cpu" and row["train_blocks"] == 24 and row["extract_over_forward"] > 0
    for mode in ("student", "offline", "online"):
        assert row[f"{mode}_step_s"] > 0 and row[f"{mode}_peak_mb"] > 0
    assert row["trials_per_hour_ratio"] == pytest.approx(row["trials_per_hour_cache"] / row["trials_per_hour_live"])
    for source, live, reuse in (("cache_fresh_stage1", None, False), ("cache", None, True),
                                ("live", str(work / "teacher"), True)):
        [trial] = (work / "tune" / source / "trials" / "ted").glob("*/metrics.json")
        metrics = json.loads(trial.read_text())
        assert metrics["config"]["teacher"] == live and metrics["config"]["max_steps"] == 3
        assert metrics["config"]["reuse_stage1"] == reuse and row[f"trials_per_hour_{source}"] > 0
    assert "trials per hour" in big_table(row)
