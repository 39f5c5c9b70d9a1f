"""The store: packing, int8 error, checksums and repair, the lock, ls / inspect / rm / gc, raw states + LWD."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers.caches import stored_files
from helpers.commands import run_cli

from tedcache import DataConfig, DistillConfig, ExtractConfig, OptimConfig, distill, extract
from tedcache.cache import (
    BackgroundWriter,
    Cache,
    CacheWriter,
    CompactStates,
    Location,
    Problem,
    UnitStates,
    calibrate_channel_scales,
    collect_garbage,
    encode_states,
    inspect_cache,
    list_caches,
    pack,
    remove_cache,
    repair,
    verify,
)
from tedcache.errors import TedcacheError


def _cfg(assets, cache_dir, **kw):
    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], max_length=24)
    return ExtractConfig(teacher=str(assets["teacher"]), data=data, cache_dir=str(cache_dir),
                         stage1=OptimConfig(epochs=1, batch_size=16), batch_size=16, shard_tokens=128, **kw)


def test_pack_never_straddles_a_shard():
    lengths = np.array([5, 7, 3, 8, 8, 1, 6])
    starts, bounds = pack(lengths, 10)
    assert starts.tolist() == [0, 10, 17, 20, 30, 38, 40]
    assert bounds.tolist() == [0, 1, 3, 4, 6, 7]
    assert all(s // 10 == (s + n - 1) // 10 for s, n in zip(starts, lengths))


def test_int8_error_bound_with_outlier_channels():
    torch.manual_seed(0)
    states = torch.randn(4096, 64) * torch.exp(torch.randn(64))  # log-normal channel scales
    states[:, :3] *= 40  # outlier channels, as real activations have
    scales = calibrate_channel_scales(states)
    q, token_scale = encode_states(states, "int8", scales)
    assert q.dtype == torch.int8 and token_scale.dtype == torch.float16
    decoded = CompactStates(q, token_scale, scales).widen()
    per_channel = (decoded - states).pow(2).mean(0).sqrt() / states.pow(2).mean(0).sqrt()
    assert per_channel.max() < 0.02  # every channel, outliers or not, within 2% RMS
    # a per-token scale alone is broken by the outliers: ordinary channels lose most of their signal
    alone, alone_scale = encode_states(states, "int8", torch.ones(64))
    naive = CompactStates(alone, alone_scale, torch.ones(64)).widen()
    naive_error = (naive - states).pow(2).mean(0).sqrt() / states.pow(2).mean(0).sqrt()
    assert naive_error.max() > 5 * per_channel.max()


@pytest.mark.parametrize("precision", ["int8", "bf16", "fp16", "fp32"])
def test_states_encoded_batch_by_batch_equal_the_whole_unit_encoded(precision):
    torch.manual_seed(0)
    batches = [torch.randn(n, 16) * 3 + 1 for n in (7, 1, 12)]
    whole = torch.cat(batches)
    scales = calibrate_channel_scales(whole)
    expected_values, expected_scale = encode_states(whole, precision, scales)
    known = UnitStates(precision, scales if precision == "int8" else None, torch.device("cpu"))
    calibrating = UnitStates(precision, None, torch.device("cpu"))  # (int8: encoded only at finish)
    for part in batches:
        known.add(part)
        calibrating.add(part)
    for encoded in (known.finish(), calibrating.finish(scales)):
        assert torch.equal(encoded.values, expected_values)
        assert (encoded.token_scale is None) == (expected_scale is None)
        assert expected_scale is None or torch.equal(encoded.token_scale, expected_scale)
        count, sums, squares = encoded.moments
        reference = whole.double()
        assert count == 20
        np.testing.assert_allclose(sums, reference.sum(0).numpy(), rtol=1e-12)
        assert squares == pytest.approx(float(reference.square().sum()), rel=1e-12)
    assert precision != "int8" or torch.equal(calibrating.float_states(), whole)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_names_a_corrupt_shard_distill_refuses_and_repair_recomputes(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "caches")
    path = extract(cfg)
    assert verify(path) == []
    before = Cache(path).split("train").states(3, 0, 1 << 20)
    shard = Path(path) / "train" / "states" / "3" / "c" / "2" / "0"
    _flip_byte(shard)
    problems = [str(p) for p in verify(path)]
    assert problems == ["corrupt: train/states/3/c/2/0 (unit train/2) (checksum mismatch)"]
    result = run_cli("verify", path)
    assert result.returncode == 1 and "train/states/3/c/2/0" in result.stdout
    refused = run_cli("distill", "--cache", path, "--student", assets["student"], "--out", tmp_path / "o", "--verify")
    assert refused.returncode == 2 and "failed verification" in refused.stderr
    assert not (tmp_path / "o").exists()
    repaired = run_cli("verify", path, "--repair")
    assert "forgot 1 damaged units" in repaired.stdout
    with pytest.raises(TedcacheError, match="incomplete"):
        Cache(path)
    messages = []
    assert extract(cfg, log=messages.append) == path
    assert any("resuming" in m and "1 to go" in m for m in messages)
    assert verify(path) == []
    after = Cache(path).split("train").states(3, 0, 1 << 20)
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])




def test_a_writer_process_writes_the_cache_a_writer_thread_writes_byte_for_byte(assets, tmp_path):
    by_process = extract(_cfg(assets, tmp_path / "process", writer="process"))
    by_thread = extract(_cfg(assets, tmp_path / "thread", writer="thread"))
    got, want = stored_files(by_process), stored_files(by_thread)
    assert len(want) > 20 and got.keys() == want.keys()
    assert [name for name in want if got[name] != want[name]] == []
    assert verify(by_process) == []


def test_a_writer_process_that_dies_is_named_in_one_line_with_the_way_on(assets, tmp_path):
    path = extract(_cfg(assets, tmp_path / "caches"))
    background = BackgroundWriter(CacheWriter(Location(path)))
    background.process.kill()
    background.process.join()
    with pytest.raises(TedcacheError, match=r"cache writer process failed \(exit code -9\).*run the same command"):
        background.write("train", 1, {})


def test_missing_shard_is_named(assets, tmp_path):
    path = extract(_cfg(assets, tmp_path / "caches", precision="fp16"))
    (Path(path) / "train" / "states" / "0" / "c" / "1" / "0").unlink()
    assert [str(p) for p in verify(path)] == ["missing: train/states/0/c/1/0 (unit train/1)"]


@pytest.mark.process
def test_lock_names_its_live_holder_and_stale_locks_are_taken_over(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "caches")
    path = Path(extract(cfg))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (path / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid, "since": "now"}))
        cfg.force, cfg.wait = True, 0
        with pytest.raises(TedcacheError, match=f"being written by pid {holder.pid}"):
            extract(cfg)
        result = run_cli("rm", path)
        assert result.returncode == 2 and f"pid {holder.pid}" in result.stderr
    finally:
        holder.kill()
        holder.wait()
    assert extract(cfg) == str(path)  # the holder is dead: its lock is stale
    assert not (path / ".lock").exists()


def test_ls_inspect_rm_gc(assets, tmp_path):
    cache_dir = tmp_path / "caches"
    path = extract(_cfg(assets, cache_dir))
    info = inspect_cache(path)
    for key in ("complete", "examples", "tokens", "layers", "filter_dim", "precision", "bytes_on_disk",
                "bytes_per_value", "compression_vs_fp32", "layer_stats", "teacher_weights_sha256"):
        assert key in info
    assert info["complete"] and info["examples"] == 96 and info["precision"] == "int8"
    assert 1.0 <= info["bytes_per_value"] < 1.5  # int8 values + fp16 token scales + shard-end gaps
    assert set(info["layer_stats"]) == {"0", "1", "2", "3"}
    as_json = json.loads(run_cli("inspect", path, "--json").stdout)
    assert as_json["tokens"] == info["tokens"]
    incomplete = Path(extract(_cfg(assets, cache_dir, precision="fp16")))
    meta_file = incomplete / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["tedcache"]["complete"] = False
    meta_file.write_text(json.dumps(meta))
    rows = {row["path"]: row for row in list_caches(str(cache_dir))}
    assert rows[path]["complete"] and not rows[str(incomplete)]["complete"]
    listed = run_cli("ls", "--cache-dir", cache_dir)
    assert listed.returncode == 0 and len(listed.stdout.strip().splitlines()) == 2 and "incomplete" in listed.stdout
    assert collect_garbage(str(cache_dir)) == [str(incomplete)]
    remove_cache(path)
    assert list_caches(str(cache_dir)) == []


def test_raw_states_feed_lwd_and_ted_refuses_them(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "caches", states="raw", precision="fp16")
    path = extract(cfg)
    assert repair(path, [Problem("forget unit 0", ("train", 0))]) == 1  # a raw cache resumes too
    messages = []
    assert extract(cfg, log=messages.append) == path and any("1 to go" in m for m in messages)
    meta = Cache(path).metadata
    assert meta.states == "raw" and meta.filter_dim == 48 and meta.stage1 is None
    report = distill(DistillConfig(cache=path, student=str(assets["student"]), out=str(tmp_path / "lwd"), method="lwd",
                                   optim=OptimConfig(epochs=1, batch_size=16)))
    assert "mse" in report["history"][-1] and report["layer_map"] == {0: 1, 1: 3}
    with pytest.raises(TedcacheError, match="--states filtered"):
        distill(DistillConfig(cache=path, student=str(assets["student"]), out=str(tmp_path / "ted"), method="ted"))


def test_a_logits_only_cache_skips_stage1_and_trains_the_kd_student_a_filtered_cache_trains(assets, tmp_path):
    """--states none: no Stage I, no filters, no states; KD from it is the run KD makes from a filtered cache
    of the same teacher and data (the same outputs, batches and order); ted and lwd are refused."""
    messages = []
    path = extract(_cfg(assets, tmp_path / "caches", states="none"), log=messages.append)
    meta = Cache(path).metadata
    assert meta.states == "none" and meta.layers == [] and meta.stage1 is None and meta.stage1_filters is None
    assert meta.timings["stage1_s"] == 0.0
    assert not any(m.startswith("stage I") or "filter" in m for m in messages)
    assert "no Stage I, no states" in messages[-1] and "targets: the teacher's outputs only" in messages[-1]
    assert not any(name.startswith("states") for name in zarr.open_group(path, mode="r")["train"].array_keys())
    filtered = extract(_cfg(assets, tmp_path / "caches"))
    assert Cache(filtered).metadata.timings["stage1_s"] > 0
    kd = {name: distill(DistillConfig(cache=cache, student=str(assets["student"]), out=str(tmp_path / name),
                                      method="kd", log_every=1, optim=OptimConfig(epochs=1, batch_size=16)))
          for name, cache in (("none", path), ("filtered", filtered))}
    assert kd["none"]["history"] == kd["filtered"]["history"] and kd["none"]["best"] == kd["filtered"]["best"]
    for method, needed in (("ted", "--states filtered"), ("lwd", "--states raw")):
        with pytest.raises(TedcacheError, match=needed):
            distill(DistillConfig(cache=path, student=str(assets["student"]), out=str(tmp_path / method), method=method))


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_workers_cover_the_epoch_with_compact_batches(assets, tmp_path, workers):
    from torch.utils.data import DataLoader

    from tedcache.reader import CacheBatches

    path = extract(_cfg(assets, tmp_path / "caches"))
    dataset = CacheBatches(path, "train", [1, 3], batch_size=16, shuffle=True, seed=3)
    dataset.set_epoch(1)
    seen = []
    for batch in DataLoader(dataset, batch_size=None, num_workers=workers):
        states = batch["teacher_states"]
        assert states[0].values.dtype == torch.int8 and states[0].token_scale.dtype == torch.float16
        assert states[0].values.shape[:2] == batch["input_ids"].shape
        seen += batch["example_index"].tolist()
    assert sorted(seen) == list(range(96))


def test_read_ahead_reads_the_same_batches_concurrently(assets, tmp_path, monkeypatch):
    from tedcache import reader
    from tedcache.reader import sources

    monkeypatch.setattr(sources, "WINDOW_BYTES", 2048)  # windows of a few examples: many reads to overlap
    path = extract(_cfg(assets, tmp_path / "caches"))
    source = reader.CacheSource(Cache(path).split("train"), [1, 3])
    reads, read = [], source.read
    source.read = lambda a, b: reads.append((a, b)) or read(a, b)

    def epoch(ahead: int) -> list[tuple[list, list]]:
        return [(b["example_index"].tolist(), [s.values.tolist() for s in b["teacher_states"]])
                for b in reader.iterate_batches(source, 16, 0, True, 3, 1, read_ahead=ahead)]

    reference = epoch(0)
    assert len(reads) > 5
    for ahead in (1, 4):
        assert epoch(ahead) == reference
