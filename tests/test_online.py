"""Online mode (`distill --teacher`) is offline mode with the cache's read replaced by the live teacher: the
same examples in the same order, the same student, the same random streams, and targets computed as the
extraction computed them. Whole runs with dropout on, compared step by step (docs/design.md, "Why caching
is faithful")."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.caches import extract_lm

from tedcache import DataConfig, DistillConfig, ExtractConfig, OptimConfig, distill, extract, reader
from tedcache.cache import Cache
from tedcache.config import FilterConfig
from tedcache.filters import FilterBank
from tedcache.models import load_classifier
from tedcache.reader import CacheSource, iterate_batches
from tedcache.teacher import LiveTargets, teacher_targets

FP32_RELATIVE = 1e-5  # float rounding: the teacher sees other padding in training batches than in extraction's
TINY = 1e-8  # terms this close to zero are compared absolutely
# A KL is the difference of a cross-entropy and an entropy of order 0.1-1, so it carries their absolute
# rounding (about 1e-8 here) even when it is 1e-4 itself: compared relative to at least this
KL_SCALE = 0.1
SMALL_WINDOWS = 2048  # bytes of states a reader window holds: many windows an epoch, as in a real-sized cache
RUN = dict(kl_alpha=2.0, mse_alpha=3.0, log_every=1, stage1=OptimConfig(epochs=1, batch_size=16),
           optim=OptimConfig(epochs=2, batch_size=16, lr=1e-3))


@pytest.fixture(scope="module")
def caches(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("online-caches")
    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], test=[str(assets["test"])],
                      max_length=24)
    made = {}
    for name, states, precision in (("fp32", "filtered", "fp32"), ("int8", "filtered", "int8"), ("raw", "raw", "fp32")):
        made[name] = extract(ExtractConfig(teacher=str(assets["teacher"]), data=data, cache_dir=str(root),
                                           filters=FilterConfig(layers="1,3"), states=states, precision=precision,
                                           stage1=OptimConfig(epochs=1, lr=1e-3, batch_size=16), batch_size=16,
                                           shard_tokens=256))
    return made


def both_runs(cache: str, student: str, teacher: str, out, **settings) -> tuple[dict, dict]:
    """The same distill from the cache and online."""
    return tuple(distill(DistillConfig(cache=cache, student=student, out=str(out / mode), teacher=live, **settings))
                 for mode, live in (("offline", None), ("online", teacher)))


def largest_differences(offline: dict, online: dict) -> dict[str, float]:
    """Per logged term, the largest relative difference over all steps (|a - b| / |a|; absolute below TINY)."""
    assert [r["step"] for r in offline["history"]] == [r["step"] for r in online["history"]]
    worst: dict[str, float] = {}
    for a, b in zip(offline["history"], online["history"]):
        assert a.keys() == b.keys()
        for key in a.keys() - {"step"}:
            scale = max(abs(a[key]), KL_SCALE) if key == "kl" else abs(a[key]) if abs(a[key]) > TINY else 1.0
            difference = abs(a[key] - b[key]) / scale
            worst[key] = max(worst.get(key, 0.0), difference)
    return worst


def assert_same_selection(offline: dict, online: dict, metric: str) -> None:
    """The same best epoch, with its metric, and the same test metric."""
    assert offline["best"]["step"] == online["best"]["step"]
    assert offline["best"][metric] == pytest.approx(online["best"][metric], abs=1e-9)
    assert offline["test"][metric] == pytest.approx(online["test"][metric], abs=1e-9)


@pytest.mark.parametrize("method", ["ted", "kd", "lwd"])
def test_fp32_cache_and_live_teacher_train_the_same_student(method, assets, caches, tmp_path, monkeypatch):
    monkeypatch.setattr(reader.sources, "WINDOW_BYTES", SMALL_WINDOWS)
    cache = caches["raw" if method == "lwd" else "fp32"]
    offline, online = both_runs(cache, str(assets["student"]), str(assets["teacher"]), tmp_path, method=method, **RUN)
    assert len(offline["history"]) == 12  # 2 epochs of 6 steps, every step logged
    worst = largest_differences(offline, online)
    print(f"{method} fp32: largest relative difference per term over 12 steps: {worst}")
    assert {"task", "kl", "loss"} <= worst.keys() and ("mse" in worst) == (method != "kd")
    assert all(value <= FP32_RELATIVE for value in worst.values()), worst
    assert_same_selection(offline, online, "accuracy")


def test_int8_cache_stays_within_the_codec_bound(assets, caches, tmp_path, monkeypatch):
    """The int8 codec stores each state value with at most half a quantisation step of error; e_l below is
    the largest error of any stored value of layer l, measured against the live teacher. At the first step
    (the same student, the same batch) each layer's filtered MSE can then differ by at most
    2 sqrt(MSE_l) e_l + e_l^2 (Cauchy-Schwarz), and the task and KL terms not at all beyond float rounding
    (logits are stored in fp32). After it the students drift apart by what those differences did to the
    weights: the whole run is held to the codec's own relative RMS error (measured: a sixth of it)."""
    monkeypatch.setattr(reader.sources, "WINDOW_BYTES", SMALL_WINDOWS)
    cache = Cache(caches["int8"])
    teacher = load_classifier(str(assets["teacher"])).eval()
    bank = FilterBank.from_bytes(cache.filter_files()).eval()
    largest, squared_error, squared_target = [0.0, 0.0], 0.0, 0.0
    for batch in iterate_batches(CacheSource(cache.split("train"), cache.layers), 16, 0):
        _, live = teacher_targets(teacher, bank, batch)
        real = batch["attention_mask"].bool()
        for layer, (stored, exact) in enumerate(zip(batch["teacher_states"], live)):
            error = (stored.widen() - exact)[real]
            largest[layer] = max(largest[layer], float(error.abs().max()))
            squared_error += float((error ** 2).sum())
            squared_target += float((exact[real] ** 2).sum())
    relative = math.sqrt(squared_error / squared_target)
    offline, online = both_runs(caches["int8"], str(assets["student"]), str(assets["teacher"]), tmp_path, method="ted",
                                **RUN)
    first_off, first_on = offline["history"][0], online["history"][0]
    assert first_off["task"] == pytest.approx(first_on["task"], rel=FP32_RELATIVE)
    assert first_off["kl"] == pytest.approx(first_on["kl"], rel=FP32_RELATIVE, abs=TINY)
    for layer, e in enumerate(largest):  # student layer j reads cached layer j (the interval map of 2 on 2)
        key = f"mse/{layer}"
        bound = 2 * math.sqrt(first_on[key]) * e + e ** 2
        assert abs(first_off[key] - first_on[key]) <= bound, (key, first_off[key], first_on[key], bound)
    worst = largest_differences(offline, online)
    print(f"ted int8: largest value error per layer {largest}, relative RMS error {relative:.3g}; first step's MSE "
          f"{first_off['mse']:.6g} against {first_on['mse']:.6g} live; largest relative difference per term over "
          f"12 steps: {worst}")
    assert all(value <= relative for key, value in worst.items() if key != "grad_ratio"), worst
    assert offline["best"]["step"] == online["best"]["step"]


def test_causal_lm_hidden_cache_and_live_teacher_train_the_same_student(lm_assets, tmp_path, monkeypatch):  # noqa: F811
    """--logits hidden: the exact full distribution rebuilt from cached final states trains what the live
    teacher's logits train."""
    monkeypatch.setattr(reader.sources, "WINDOW_BYTES", SMALL_WINDOWS)
    _, cache = extract_lm(lm_assets, tmp_path, logits="hidden")
    offline, online = both_runs(cache, str(lm_assets["llama_student"]), str(lm_assets["llama"]), tmp_path, method="ted",
                                **{**RUN, "optim": OptimConfig(epochs=2, batch_size=8, lr=1e-3),
                                                     "stage1": OptimConfig(epochs=1, batch_size=8)})
    worst = largest_differences(offline, online)
    print(f"causal-lm ted, --logits hidden fp32: largest relative difference per term: {worst}")
    assert {"task", "kl", "mse"} <= worst.keys()
    assert all(value <= FP32_RELATIVE for value in worst.values()), worst
    assert_same_selection(offline, online, "perplexity")


def test_loading_the_teacher_moves_no_generator(assets, caches):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    LiveTargets(str(assets["teacher"]), Cache(caches["fp32"]), [1, 3], torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)
