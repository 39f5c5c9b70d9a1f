"""extract --dtype: the teacher's weights loaded and run in bf16, fp16 or fp32 (auto: fp32 on a CPU), the
choice recorded in the cache; Stage I's filters and every stored target stay fp32; online mode loads the
teacher as the cache says."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from helpers.builders import documents, make_lm, write_text

from tedcache import DataConfig, DistillConfig, ExtractConfig, FilterConfig, OptimConfig, distill, extract
from tedcache.cache import Cache


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def test_a_bf16_teacher_writes_what_the_fp32_one_does_to_bf16_rounding_and_the_cache_says_so(assets, tmp_path):
    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], max_length=24)
    base = ExtractConfig(teacher=str(assets["teacher"]), data=data, cache_dir=str(tmp_path / "caches"), states="raw",
                         precision="fp32", batch_size=16, shard_tokens=256)
    caches = {dtype: extract(replace(base, dtype=dtype)) for dtype in ("auto", "fp32", "bf16")}
    assert caches["auto"] == caches["fp32"] != caches["bf16"]  # auto is fp32 on a CPU; other caches keep their names
    full, half = Cache(caches["fp32"]), Cache(caches["bf16"])
    assert (full.metadata.teacher_dtype, half.metadata.teacher_dtype) == ("fp32", "bf16")
    assert half.metadata.identity["teacher_dtype"] == "bf16" and "teacher_dtype" not in full.metadata.identity
    for layer in full.metadata.layers:
        a, b = (c.split("train").states(layer, 0, 1 << 20)[0] for c in (half, full))
        assert a.dtype == np.float32 and 0 < _relative_error(a, b) < 0.03  # bf16 keeps 8 bits of mantissa
    assert 0 < _relative_error(half.split("eval").teacher_logits, full.split("eval").teacher_logits) < 0.05


def test_stage1_and_online_mode_run_with_a_bf16_teacher(assets, tmp_path):
    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], max_length=24)
    cache = extract(ExtractConfig(teacher=str(assets["teacher"]), data=data, cache_dir=str(tmp_path / "caches"),
                                  dtype="bf16", stage1=OptimConfig(epochs=1, lr=1e-2, batch_size=16), batch_size=16))
    filters = Cache(cache).metadata.stage1_filters["metrics"]
    assert all(np.isfinite(v) for v in filters.values())
    runs = {mode: distill(DistillConfig(cache=cache, student=str(assets["student"]), out=str(tmp_path / mode),
                                        method="ted", student_layers="0,1", max_steps=2, optim=OptimConfig(batch_size=16),
                                        stage1=OptimConfig(epochs=1, lr=1e-2, batch_size=16),
                                        teacher=str(assets["teacher"]) if mode == "online" else None))
            for mode in ("offline", "online")}  # online: the teacher loaded in bf16 again, its weights' hash checked
    assert runs["online"]["history"][0]["loss"] == pytest.approx(runs["offline"]["history"][0]["loss"], rel=2e-3)


def test_a_bf16_causal_lm_teacher_with_its_tied_head_and_hidden_logits(tmp_path):

    teacher = make_lm(tmp_path / "teacher", "llama", layers=2)
    student = make_lm(tmp_path / "student", "llama", layers=1, seed=1)
    text = {split: str(write_text(tmp_path / f"{split}.txt", documents(n, seed))) for split, n, seed in
            (("train", 80, 0), ("eval", 20, 1))}
    data = DataConfig(train=[text["train"]], eval=[text["eval"]], task="causal-lm", block_size=16)
    base = ExtractConfig(teacher=str(teacher), data=data, cache_dir=str(tmp_path / "caches"), logits="hidden",
                         filters=FilterConfig(layers="0,1"), precision="fp32", batch_size=16,
                         stage1=OptimConfig(epochs=1, lr=1e-2, batch_size=16))
    caches = {dtype: Cache(extract(replace(base, dtype=dtype))) for dtype in ("fp32", "bf16")}
    lens = {d: c.metadata.stage1_filters["metrics"]["1/logit_lens_loss"] for d, c in caches.items()}
    assert lens["bf16"] == pytest.approx(lens["fp32"], rel=0.02)  # the tied head ran in bf16 on fp32 states
    report = distill(DistillConfig(cache=caches["bf16"].location.url, student=str(student), out=str(tmp_path / "kd"),
                                   method="kd", max_steps=2, optim=OptimConfig(batch_size=8)))
    assert np.isfinite(report["history"][-1]["loss"])


@pytest.mark.process  # torch.compile starts its compile workers
def test_a_compiled_teacher_writes_what_the_eager_one_does_to_float_rounding_and_the_cache_says_so(assets, tmp_path):
    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], max_length=24)
    base = ExtractConfig(teacher=str(assets["teacher"]), data=data, cache_dir=str(tmp_path / "caches"), states="raw",
                         precision="fp32", batch_size=16, shard_tokens=256)
    eager, compiled = (Cache(extract(replace(base, compile=on))) for on in (False, True))
    assert compiled.metadata.identity["compiled"] is True and "compiled" not in eager.metadata.identity
    for layer in eager.metadata.layers:
        a, b = (c.split("train").states(layer, 0, 1 << 20)[0] for c in (compiled, eager))
        assert a.shape == b.shape and _relative_error(a, b) < 1e-5
    assert _relative_error(compiled.split("eval").teacher_logits, eager.split("eval").teacher_logits) < 1e-5
