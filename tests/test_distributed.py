"""Two real processes on the CPU (gloo), started by the real launchers (torchrun, accelerate launch):
the teacher pass gives the one-process cache value for value, also after one process is SIGKILLed and
the command re-run; Stage I under DDP trains the one-process filters up to float rounding; distill
gives the one-process loss curve at the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.builders import make_model, sentiment_rows, without_dropout, write_rows
from helpers.caches import assert_same_cache, cache_contents
from helpers.commands import MANY_UNITS, distill_args, extract_args, long_distill_args
from helpers.processes import (
    ENV,
    accelerate_launch,
    children,
    kill_after_checkpoint,
    rank_of,
    refused_then_resumed,
    run_one,
    torchrun,
)

from tedcache import reader
from tedcache.cache import Cache
from tedcache.distributed import Processes
from tedcache.errors import TedcacheError
from tedcache.reader import CacheSource, iterate_batches, num_batches


def _extract_args(assets, data, cache_dir, *extra):
    return extract_args(assets, cache_dir, *extra, data=data, eval_data=assets["eval"], test_data=assets["test"],
                        stage1_epochs=0.5, **MANY_UNITS)






@pytest.fixture(scope="module")
def one_process_cache(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    data = write_rows(root / "train.csv", sentiment_rows(600, seed=7))
    result = run_one(*_extract_args(assets, data, root / "caches"))
    assert result.returncode == 0, result.stderr
    return data, result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def one_process_raw_cache(assets, one_process_cache, tmp_path_factory):
    """Raw states: no Stage I, so the whole cache is the teacher pass's."""
    data, _ = one_process_cache
    result = run_one(*_extract_args(assets, data, tmp_path_factory.mktemp("raw") / "caches", "--states", "raw"))
    assert result.returncode == 0, result.stderr
    return data, result.stdout.strip().splitlines()[-1]


@pytest.mark.process
def test_two_process_extraction_equals_one_process(assets, one_process_raw_cache, tmp_path):
    data, reference = one_process_raw_cache
    result = subprocess.run(torchrun(*_extract_args(assets, data, tmp_path / "caches", "--states", "raw")),
                            capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    path = result.stdout.strip().splitlines()[-1]
    assert Path(path).name == Path(reference).name  # same inputs, same cache key
    assert json.loads((Path(path) / "zarr.json").read_text())["attributes"]["tedcache"]["timings"]["processes"] == 2
    assert_same_cache(path, reference)


@pytest.mark.process
def test_two_processes_each_spreading_the_teacher_over_cpu_and_disk_write_the_one_process_cache(
        assets, one_process_raw_cache, tmp_path):
    """Each process places its own teacher with the map (its own offload folder) and writes its units."""
    data, reference = one_process_raw_cache
    device_map = tmp_path / "map.json"
    device_map.write_text(json.dumps({"bert.embeddings": "cpu", "bert.encoder.layer.0": "cpu",
                                      "bert.encoder.layer.1": "disk", "bert.encoder.layer.2": "disk",
                                      "bert.encoder.layer.3": "cpu", "bert.pooler": "cpu", "classifier": "cpu"}))
    result = subprocess.run(torchrun(*_extract_args(assets, data, tmp_path / "caches", "--states", "raw",
                                                    "--device-map", device_map, "--offload-dir", tmp_path / "offload")),
                            capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_cache(result.stdout.strip().splitlines()[-1], reference)
    assert list((tmp_path / "offload").iterdir()) == []  # each process removed its offload






@pytest.mark.long
@pytest.mark.process
def test_killing_one_process_then_rerunning_resumes(assets, one_process_raw_cache, tmp_path):
    data, reference = one_process_raw_cache
    cache_dir = tmp_path / "caches"
    args = _extract_args(assets, data, cache_dir, "--states", "raw")
    launcher = subprocess.Popen(torchrun(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deadline, victim = time.time() + 300, None
    while time.time() < deadline and launcher.poll() is None:
        if len(list(cache_dir.glob("*/units/train/*.json"))) >= 4:
            victim = next((p for p in children(launcher.pid) if rank_of(p) == 1), None)
            if victim is not None:
                break
        time.sleep(0.02)
    assert victim is not None and launcher.poll() is None, "the extraction finished before a process could be killed"
    os.kill(victim, signal.SIGKILL)
    launcher.wait(timeout=120)
    assert launcher.returncode != 0
    written = len(list(cache_dir.glob("*/units/*/*.json")))
    rerun = subprocess.run(torchrun(*args), capture_output=True, text=True, env=ENV, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming: {written} of" in rerun.stderr  # the first process's log; the units written before are kept
    assert_same_cache(rerun.stdout.strip().splitlines()[-1], reference)




@pytest.fixture(scope="module")
def no_dropout_student(tmp_path_factory):
    return without_dropout(make_model(tmp_path_factory.mktemp("student") / "s", layers=2, hidden=32, seed=1))


@pytest.mark.process
def test_stage1_under_ddp_trains_the_one_process_filters(assets, one_process_cache, tmp_path):
    """Two processes train the filters at the same global batch, each on its half: without dropout (the
    teacher's, and so its heads', see stage1.head_dropout) the filters, and so every state, equal one
    process's up to float rounding; everything else in the cache is identical."""
    from safetensors.torch import load_file

    data, _ = one_process_cache
    teacher = without_dropout(make_model(tmp_path / "teacher", layers=4, hidden=48))
    args = _extract_args({**assets, "teacher": teacher}, data, tmp_path / "one", "--precision", "fp32",
                         "--stage1-epochs", "1")
    one = run_one(*args)
    assert one.returncode == 0, one.stderr
    args[args.index("--cache-dir") + 1] = tmp_path / "two"
    two = subprocess.run(torchrun(*args), capture_output=True, text=True, env=ENV, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    paths = [r.stdout.strip().splitlines()[-1] for r in (one, two)]
    (meta_a, arrays_a, _), (meta_b, arrays_b, _) = map(cache_contents, paths)
    filters = [load_file(Path(p) / "teacher_filters.safetensors") for p in paths]
    assert sorted(filters[0]) == sorted(filters[1])
    for name in filters[0]:
        torch.testing.assert_close(filters[1][name], filters[0][name], rtol=1e-4, atol=1e-5)
    steps = [m["stage1_filters"]["steps"] for m in (meta_a, meta_b)]
    assert steps[0] == steps[1] > 10
    for key, value in meta_a["stage1_filters"]["metrics"].items():
        assert meta_b["stage1_filters"]["metrics"][key] == pytest.approx(value, rel=1e-3), key
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:
        if "/states/" in name:
            np.testing.assert_allclose(arrays_b[name], arrays_a[name], rtol=1e-3, atol=1e-4, err_msg=name)
        else:
            np.testing.assert_array_equal(arrays_b[name], arrays_a[name], err_msg=name)




@pytest.mark.process
def test_two_process_distill_matches_one_process_at_the_same_global_batch(one_process_cache, no_dropout_student,
                                                                           tmp_path):
    _, cache = one_process_cache
    one = run_one(*distill_args(cache, no_dropout_student, tmp_path / "one", 16))
    assert one.returncode == 0, one.stderr
    accumulated = run_one(*distill_args(cache, no_dropout_student, tmp_path / "accum", 8, "--grad-accum", "2"))
    assert accumulated.returncode == 0, accumulated.stderr
    two = subprocess.run(accelerate_launch(*distill_args(cache, no_dropout_student, tmp_path / "two", 8,
                                                          "--checkpoint-every", "3")),  # checkpoints change nothing
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    runs = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "accum", "two")}
    assert runs["two"]["processes"] == 2 and runs["one"]["processes"] == 1
    reference = runs["one"]["history"]
    assert len(reference) >= 6 and {"task", "kl", "mse", "mse/0", "mse/1"} <= set(reference[0])
    for name in ("accum", "two"):
        history = runs[name]["history"]
        assert [h["step"] for h in history] == [h["step"] for h in reference]
        for mine, theirs in zip(history, reference):
            for key, value in theirs.items():
                if key == "grad_ratio":  # a diagnostic probed only in one process without accumulation
                    assert key not in mine
                    continue
                assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, mine["step"], key)
        # evaluation: each process scores half the batches, the outputs are gathered
        assert [e["accuracy"] for e in runs[name]["eval"]] == [e["accuracy"] for e in runs["one"]["eval"]]
        assert runs[name]["test"]["accuracy"] == runs["one"]["test"]["accuracy"]
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["accum", "one", "two"]  # the student saved once, no checkpoint folder left


def test_each_process_draws_its_own_dropout_masks_and_one_process_uses_the_seed_itself():
    draws = {}
    for rank, size in ((0, 1), (0, 2), (1, 2)):
        place = Processes(join=False)
        place.rank, place.size = rank, size
        place.seed(7)
        draws[rank, size] = torch.rand(8)
    torch.manual_seed(7)
    assert torch.equal(draws[0, 1], torch.rand(8))  # one process: the run's seed, as before DDP existed
    assert not torch.equal(draws[0, 2], draws[1, 2]) and not torch.equal(draws[0, 2], draws[0, 1])


@pytest.mark.process  # (its fixture runs the one-process reference in a process of its own)
@pytest.mark.parametrize("workers", [1, 2])
def test_shard_reads_give_each_process_its_own_half_of_the_reads(one_process_cache, workers, monkeypatch):
    """Each reader (process, DataLoader worker) reads its own contiguous part: every example once per
    epoch across processes, equal batch counts (DDP steps in lockstep), half the read volume each."""
    monkeypatch.setattr(reader.sources, "WINDOW_BYTES", 8192)  # several windows in each reader's part
    _, cache = one_process_cache
    split = Cache(cache).split("train")
    pad, size = Cache(cache).metadata.pad_token_id, 8

    def one_process(rank: int, shard_reads: bool) -> tuple[list[np.ndarray], int]:
        source = CacheSource(split, Cache(cache).layers)
        tokens_read, read = [], source.read
        source.read = lambda a, b: tokens_read.append(int(split.lengths[a:b].sum())) or read(a, b)
        batches = [batch["example_index"].numpy() for worker in range(workers)
                   for batch in iterate_batches(source, size, pad, True, 3, 1, worker=(worker, workers),
                                                process=(rank, 2), shard_reads=shard_reads)]
        return batches, sum(tokens_read)

    total = int(split.lengths.sum())
    runs = [one_process(rank, True) for rank in (0, 1)]
    seen = np.concatenate([index for batches, _ in runs for index in batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(len(split)))
    expected = num_batches(CacheSource(split), size, 2, shard_reads=True, workers=workers)
    for batches, tokens in runs:
        sizes = [len(b) for b in batches]  # full, but each reader's last holds its rest (at most one more)
        assert len(batches) == expected and max(sizes) <= size + 1 and sum(n != size for n in sizes) <= workers
        assert abs(tokens - total / 2) < 0.02 * total
    for rank in (0, 1):  # without shard reads every process reads everything
        assert one_process(rank, False)[1] == total
    with pytest.raises(TedcacheError, match="--shard-reads"):
        next(iterate_batches(CacheSource(split), size, pad, process=(0, len(split) + 1), shard_reads=True))


@pytest.mark.process
def test_two_process_distill_with_shard_reads(one_process_cache, no_dropout_student, tmp_path):
    _, cache = one_process_cache
    two = subprocess.run(accelerate_launch(*distill_args(cache, no_dropout_student, tmp_path / "two", 8,
                                                          "--shard-reads")),
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    run = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert run["processes"] == 2 and run["config"]["shard_reads"]
    per_epoch = num_batches(CacheSource(Cache(cache).split("train")), 8, 2, shard_reads=True)
    assert run["history"][-1]["step"] == 2 * per_epoch  # both processes stepped in lockstep to the end
    assert run["history"][-1]["loss"] < run["history"][0]["loss"]








@pytest.mark.long
@pytest.mark.process
def test_compare_killed_mid_run_continues_that_run_from_its_checkpoint(one_process_cache, assets, tmp_path):
    _, cache = one_process_cache
    straight = run_one(*long_distill_args(cache, assets["student"], tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    args = ["compare", *long_distill_args(cache, assets["student"], tmp_path / "runs")[1:], "--methods", "ted"]
    args[args.index("--seed"):args.index("--seed") + 2] = ["--seeds", "3"]
    del args[args.index("--method"):args.index("--method") + 2]  # (compare runs --methods)
    kill_after_checkpoint(args, tmp_path / "runs" / "ted-seed3.checkpoint" / "state.pt")
    rerun = run_one(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr  # continued, not started over
    a = json.loads((tmp_path / "runs" / "ted-seed3" / "metrics.json").read_text())
    b = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert a["history"] == b["history"] and a["eval"] == b["eval"] and a["test"] == b["test"]
    assert not (tmp_path / "runs" / "ted-seed3.checkpoint").exists()


@pytest.mark.long
@pytest.mark.process
def test_fsdp_distill_matches_one_process_resumes_after_a_kill_and_saves_a_plain_student(
        one_process_cache, no_dropout_student, tmp_path):
    """Two processes under --fsdp (each holding half of the student, its filters and their optimiser
    state) train on one process's loss curve at the same global batch (accumulated over two
    micro-batches), score the same, save a plain HF folder holding the same weights, and a run killed
    after a checkpoint resumes to the uninterrupted one."""
    from transformers import AutoModelForSequenceClassification

    _, cache = one_process_cache
    one = run_one(*distill_args(cache, no_dropout_student, tmp_path / "one", 16))
    assert one.returncode == 0, one.stderr
    args = distill_args(cache, no_dropout_student, tmp_path / "fsdp", 4, "--grad-accum", "2", "--fsdp",
                         "--checkpoint-every", "3")
    straight = subprocess.run(torchrun(*args), capture_output=True, text=True, env=ENV, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    runs = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "fsdp")}
    assert runs["fsdp"]["processes"] == 2 and len(runs["fsdp"]["stage2_peak_memory_mb_per_process"]) == 2
    assert [h["step"] for h in runs["fsdp"]["history"]] == [h["step"] for h in runs["one"]["history"]]
    for mine, theirs in zip(runs["fsdp"]["history"], runs["one"]["history"]):
        for key, value in theirs.items():
            if key != "grad_ratio":  # probed only in one process
                assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (mine["step"], key)
    assert [e["accuracy"] for e in runs["fsdp"]["eval"]] == [e["accuracy"] for e in runs["one"]["eval"]]
    assert runs["fsdp"]["test"]["accuracy"] == runs["one"]["test"]["accuracy"]
    students = [AutoModelForSequenceClassification.from_pretrained(tmp_path / name) for name in ("one", "fsdp")]
    weights = [dict(s.named_parameters()) for s in students]
    assert sorted(weights[0]) == sorted(weights[1])
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-3, atol=1e-5, msg=name)

    args[args.index("--out") + 1] = tmp_path / "killed"
    kill_after_checkpoint(args, tmp_path / "killed.checkpoint" / "state.pt", launcher=torchrun)
    resumed = subprocess.run(torchrun(*args, "--resume"), capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    killed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert killed["history"] == runs["fsdp"]["history"] and killed["eval"] == runs["fsdp"]["eval"]
    assert killed["test"] == runs["fsdp"]["test"]


@pytest.mark.long
@pytest.mark.process
def test_distill_killed_in_the_student_s_stage1_resumes_from_its_checkpoint(one_process_cache, assets, tmp_path,
                                                                           fault_log):
    _, cache = one_process_cache
    args = long_distill_args(cache, assets["student"], tmp_path / "run") + ["--no-reuse-stage1"]  # (trained, killed)
    args[args.index("--stage1-epochs") + 1] = "3"
    straight = run_one(*[str(tmp_path / "straight") if a == str(tmp_path / "run") else a for a in args])
    assert straight.returncode == 0, straight.stderr
    kill_after_checkpoint(args, tmp_path / "run.checkpoint" / "stage1" / "state.pt")
    assert not (tmp_path / "run.checkpoint" / "state.pt").exists()  # killed in Stage I, before Stage II began
    a, b = refused_then_resumed(args, tmp_path / "run", tmp_path / "straight")
    assert a["phases"]["stage1"] == {**b["phases"]["stage1"], "seconds": a["phases"]["stage1"]["seconds"]}
    assert a["history"] == b["history"] and a["eval"] == b["eval"] and a["test"] == b["test"]
    assert not (tmp_path / "run.checkpoint").exists()
    fault_log("a distill SIGKILLed once inside the student's Stage I, resumed with --resume; lost: nothing (the "
              "uninterrupted run's Stage I and Stage II)")
