"""Big models, tested on the CPU with tiny ones: a teacher spread by --device-map (here over the CPU and
disk offload) writes the cache a teacher on one device writes, Stage I included; bad maps, and maps that
do not fit, are refused in one line; process groups own their share of a machine's GPUs; bf16-mixed
training follows fp32. (Several processes each placing a teacher, and FSDP: tests/test_distributed.py.)"""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import pytest
import torch
from helpers.caches import extract_lm, stored_files

from tedcache import extract
from tedcache.cache import Cache
from tedcache.errors import TedcacheError
from tedcache.models import device_group


def test_a_teacher_spread_over_cpu_and_disk_writes_the_one_device_cache(lm_assets, tmp_path):  # noqa: F811
    device_map = tmp_path / "map.json"  # layers 1 and 2 offloaded to disk, loaded for each of their forwards
    device_map.write_text(json.dumps({"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                                      "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu",
                                      "model.rotary_emb": "cpu", "lm_head": "cpu"}))
    cfg, whole = extract_lm(lm_assets, tmp_path / "whole")
    spread = extract(replace(cfg, cache_dir=str(tmp_path / "spread" / "caches"), device_map=str(device_map)))
    got, want = stored_files(spread), stored_files(whole)
    assert len(want) > 10 and got.keys() == want.keys()
    assert [name for name in want if got[name] != want[name]] == []  # Stage I's filters and every target
    a, b = Cache(spread).metadata, Cache(whole).metadata
    assert a.teacher_weights_sha256 == b.teacher_weights_sha256 and a.stage1_filters == b.stage1_filters


@pytest.mark.parametrize("device_map,named", [("missing.json", "not one of auto"),
                                              ('{"": "cuda:3"}', "cannot load teacher")])
def test_a_bad_device_map_is_refused_in_one_line(lm_assets, tmp_path, device_map, named):  # noqa: F811
    if device_map.startswith("{"):  # a device this machine lacks
        (tmp_path / "partial.json").write_text(device_map)
        device_map = str(tmp_path / "partial.json")
    cfg, _ = extract_lm(lm_assets, tmp_path / "first", states="none")
    with pytest.raises(TedcacheError, match=named) as refused:
        extract(replace(cfg, cache_dir=str(tmp_path / "caches"), device_map=device_map))
    assert "\n" not in str(refused.value)


def test_a_map_whose_disk_offload_does_not_fit_is_refused_naming_both_sizes(lm_assets, tmp_path):  # noqa: F811
    offload = tmp_path / "small"
    offload.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(offload)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        device_map = tmp_path / "map.json"
        device_map.write_text(json.dumps({"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
                                          "model.rotary_emb": "cpu", "lm_head": "cpu"}))
        cfg, _ = extract_lm(lm_assets, tmp_path / "first", states="none")
        with pytest.raises(TedcacheError, match=r"puts [\d.]+ MiB of the teacher's weights on disk \(.*small\), which "
                                                r"has [\d.]+ MiB free") as refused:
            extract(replace(cfg, cache_dir=str(tmp_path / "caches"), device_map=str(device_map), offload_dir=str(offload)))
        assert "\n" not in str(refused.value) and not (tmp_path / "caches").exists()
    finally:
        subprocess.run(["umount", str(offload)], check=True)


def test_a_process_group_owns_its_share_of_the_machine_gpus():
    assert device_group(0, 0, 1, 0) is None and device_group(0, 0, 1, 8) is None  # alone: every GPU
    assert device_group(0, 1, 4, 8) == [2, 3] and device_group(2, 3, 4, 8) == [6, 7]
    assert device_group(3, 1, 2, 8) == [3, 4, 5]
    with pytest.raises(TedcacheError, match="need 12 GPUs; this machine has 8"):
        device_group(3, 0, 4, 8)


def test_bf16_mixed_training_follows_fp32_on_the_cpu(assets, tmp_path):
    """--train-precision bf16-mixed: forwards under bf16 autocast, weights and losses fp32; its first 20
    steps' TED losses stay within 1% of fp32 training's, step by step, and the weights stay fp32."""
    from tedcache import DataConfig, DistillConfig, ExtractConfig, OptimConfig, distill
    from tedcache.models import load_classifier

    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], max_length=24)
    cache = extract(ExtractConfig(teacher=str(assets["teacher"]), data=data, cache_dir=str(tmp_path / "caches"),
                                  stage1=OptimConfig(epochs=1, lr=1e-2, batch_size=16), batch_size=16))
    runs = {precision: distill(DistillConfig(
        cache=cache, student=str(assets["student"]), out=str(tmp_path / precision), method="ted", student_layers="0,1",
        max_steps=20, log_every=1, train_precision=precision, device="cpu",
        optim=OptimConfig(epochs=3, lr=1e-3, batch_size=8), stage1=OptimConfig(epochs=1, lr=1e-2, batch_size=16)))
        for precision in ("fp32", "bf16-mixed")}
    full, mixed = ([h["loss"] for h in runs[p]["history"]] for p in ("fp32", "bf16-mixed"))
    assert len(full) == len(mixed) == 20 and full != mixed  # autocast really ran
    assert all(abs(m - f) <= 0.01 * abs(f) for f, m in zip(full, mixed)), list(zip(full, mixed))
    saved = load_classifier(str(tmp_path / "bf16-mixed"))
    assert {p.dtype for p in saved.parameters()} == {torch.float32}
