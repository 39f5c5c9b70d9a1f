"""Two real processes on the CPU (gloo), started by the real launchers (torchrun, accelerate launch):
the teacher pass gives the one-process cache value for value, also after one process is SIGKILLed and
the command re-run; Stage I under DDP trains the one-process filters up to float rounding; distill
gives the one-process loss curve at the same global batch."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import zarr
from conftest import make_model, sentiment_rows, write_rows

from tedcache import reader
from tedcache.cache import Cache
from tedcache.distributed import Processes
from tedcache.errors import TedcacheError
from tedcache.reader import CacheSource, iterate_batches, num_batches

# One thread per process everywhere, the one-process references included: a float sum split over a
# different number of threads rounds differently, and the comparisons below are exact.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_one(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tedcache.cli.main", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=600)


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "tedcache.cli.main", *map(str, args)]


def accelerate_launch(*args) -> list[str]:
    # --multi_gpu is accelerate's multi-process launcher; without a GPU the processes join over gloo
    # (its --cpu runs one process, or several only through MPI)
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 500),
            "-m", "tedcache.cli.main", *map(str, args)]


def _extract_args(assets, data, cache_dir, *extra):
    return ["extract", "--teacher", assets["teacher"], "--data", data, "--eval-data", assets["eval"],
            "--test-data", assets["test"], "--max-length", "24", "--stage1-epochs", "0.5", "--shard-tokens", "64",
            "--batch-size", "8", "--cache-dir", cache_dir, *extra]


def cache_contents(path: str) -> tuple[dict, dict[str, np.ndarray], dict[str, dict]]:
    """Metadata (less timings and the folder it was written to), every array, and every unit record of a cache."""
    root = zarr.open_group(path, mode="r")
    meta = {k: v for k, v in root.attrs["tedcache"].items() if k != "timings"}
    # where each run wrote, and how it placed its teacher
    meta["config"] = {k: v for k, v in meta["config"].items() if k not in ("cache_dir", "device_map", "offload_dir")}
    arrays = {name: arr[...] for name, arr in root.members(max_depth=None) if isinstance(arr, zarr.Array)}
    records = {str(p.relative_to(path)): json.loads(p.read_text()) for p in Path(path).glob("units/*/*.json")}
    return meta, arrays, records


def assert_same_cache(a: str, b: str) -> None:
    meta_a, arrays_a, records_a = cache_contents(a)
    meta_b, arrays_b, records_b = cache_contents(b)
    assert meta_a == meta_b and meta_a["complete"]
    assert sorted(arrays_a) == sorted(arrays_b) and any(k.startswith("train/states/") for k in arrays_a)
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)
    assert records_a == records_b and len(records_a) > 10


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


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


@pytest.mark.process
def test_killing_one_process_then_rerunning_resumes(assets, one_process_raw_cache, tmp_path):
    data, reference = one_process_raw_cache
    cache_dir = tmp_path / "caches"
    args = _extract_args(assets, data, cache_dir, "--states", "raw")
    launcher = subprocess.Popen(torchrun(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deadline, victim = time.time() + 300, None
    while time.time() < deadline and launcher.poll() is None:
        if len(list(cache_dir.glob("*/units/train/*.json"))) >= 4:
            victim = next((p for p in _children(launcher.pid) if _rank_of(p) == 1), None)
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


def _without_dropout(folder: Path) -> Path:
    """Dropout draws differ between processes; without it one step's loss depends on the batch alone."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def no_dropout_student(tmp_path_factory):
    return _without_dropout(make_model(tmp_path_factory.mktemp("student") / "s", layers=2, hidden=32, seed=1))


@pytest.mark.process
def test_stage1_under_ddp_trains_the_one_process_filters(assets, one_process_cache, tmp_path):
    """Two processes train the filters at the same global batch, each on its half: without dropout (the
    teacher's, and so its heads', see stage1.head_dropout) the filters, and so every state, equal one
    process's up to float rounding; everything else in the cache is identical."""
    from safetensors.torch import load_file

    data, _ = one_process_cache
    teacher = _without_dropout(make_model(tmp_path / "teacher", layers=4, hidden=48))
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


def _distill_args(cache, student, out, batch_size, *extra):
    return ["distill", "--cache", cache, "--student", student, "--out", out, "--batch-size", batch_size,
            "--epochs", "2", "--lr", "1e-3", "--stage1-epochs", "0.5", "--seed", "3", "--method", "ted", *extra]


@pytest.mark.process
def test_two_process_distill_matches_one_process_at_the_same_global_batch(one_process_cache, no_dropout_student,
                                                                           tmp_path):
    _, cache = one_process_cache
    one = run_one(*_distill_args(cache, no_dropout_student, tmp_path / "one", 16))
    assert one.returncode == 0, one.stderr
    accumulated = run_one(*_distill_args(cache, no_dropout_student, tmp_path / "accum", 8, "--grad-accum", "2"))
    assert accumulated.returncode == 0, accumulated.stderr
    two = subprocess.run(accelerate_launch(*_distill_args(cache, no_dropout_student, tmp_path / "two", 8,
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
    monkeypatch.setattr(reader, "WINDOW_BYTES", 8192)  # several windows in each reader's part
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
    two = subprocess.run(accelerate_launch(*_distill_args(cache, no_dropout_student, tmp_path / "two", 8,
                                                          "--shard-reads")),
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    run = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert run["processes"] == 2 and run["config"]["shard_reads"]
    per_epoch = num_batches(CacheSource(Cache(cache).split("train")), 8, 2, shard_reads=True)
    assert run["history"][-1]["step"] == 2 * per_epoch  # both processes stepped in lockstep to the end
    assert run["history"][-1]["loss"] < run["history"][0]["loss"]


def kill_after_checkpoint(args: list, state: Path, launcher: Callable = lambda *args: [
        sys.executable, "-m", "tedcache.cli.main", *map(str, args)]) -> None:
    """Start `tedcache ARGS` (through `launcher`), SIGKILL it, with every process it started, a few steps
    after its first checkpoint `state` is written."""
    proc = subprocess.Popen(launcher(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not state.exists():
        time.sleep(0.01)
    time.sleep(0.3)  # a few more steps past the checkpoint, lost by the kill
    assert proc.poll() is None, "the run finished before it could be killed"
    for pid in process_tree(proc.pid):  # (torchrun starts its workers in sessions of their own)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert state.exists()


def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it."""
    return [root] + [pid for child in _children(root) for pid in process_tree(child)]


def _long_run_args(cache, student, out):
    args = _distill_args(cache, student, out, 8, "--checkpoint-every", "5")
    args[args.index("--epochs") + 1] = "6"
    return args


def _refused_then_resumed(args: list, out: Path, straight: Path) -> tuple[dict, dict]:
    """A killed distill run again: refused without --resume, finished with it. Returns its metrics and the
    uninterrupted run's."""
    refused = run_one(*args)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = run_one(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    return tuple(json.loads((folder / "metrics.json").read_text()) for folder in (out, straight))


@pytest.mark.process
def test_compare_killed_mid_run_continues_that_run_from_its_checkpoint(one_process_cache, assets, tmp_path):
    _, cache = one_process_cache
    straight = run_one(*_long_run_args(cache, assets["student"], tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    args = ["compare", *_long_run_args(cache, assets["student"], tmp_path / "runs")[1:], "--methods", "ted"]
    args[args.index("--seed"):args.index("--seed") + 2] = ["--seeds", "3"]
    kill_after_checkpoint(args, tmp_path / "runs" / "ted-seed3.checkpoint" / "state.pt")
    rerun = run_one(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr  # continued, not started over
    a = json.loads((tmp_path / "runs" / "ted-seed3" / "metrics.json").read_text())
    b = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert a["history"] == b["history"] and a["eval"] == b["eval"] and a["test"] == b["test"]
    assert not (tmp_path / "runs" / "ted-seed3.checkpoint").exists()


@pytest.mark.process
def test_fsdp_distill_matches_one_process_resumes_after_a_kill_and_saves_a_plain_student(
        one_process_cache, no_dropout_student, tmp_path):
    """Two processes under --fsdp (each holding half of the student, its filters and their optimiser
    state) train on one process's loss curve at the same global batch (accumulated over two
    micro-batches), score the same, save a plain HF folder holding the same weights, and a run killed
    after a checkpoint resumes to the uninterrupted one."""
    from transformers import AutoModelForSequenceClassification

    _, cache = one_process_cache
    one = run_one(*_distill_args(cache, no_dropout_student, tmp_path / "one", 16))
    assert one.returncode == 0, one.stderr
    args = _distill_args(cache, no_dropout_student, tmp_path / "fsdp", 4, "--grad-accum", "2", "--fsdp",
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


@pytest.mark.process
def test_distill_killed_in_the_student_s_stage1_resumes_from_its_checkpoint(one_process_cache, assets, tmp_path,
                                                                           fault_log):
    _, cache = one_process_cache
    args = _long_run_args(cache, assets["student"], tmp_path / "run")
    args[args.index("--stage1-epochs") + 1] = "3"
    straight = run_one(*[tmp_path / "straight" if a == tmp_path / "run" else a for a in args])
    assert straight.returncode == 0, straight.stderr
    kill_after_checkpoint(args, tmp_path / "run.checkpoint" / "stage1" / "state.pt")
    assert not (tmp_path / "run.checkpoint" / "state.pt").exists()  # killed in Stage I, before Stage II began
    a, b = _refused_then_resumed(args, tmp_path / "run", tmp_path / "straight")
    assert a["phases"]["stage1"] == {**b["phases"]["stage1"], "seconds": a["phases"]["stage1"]["seconds"]}
    assert a["history"] == b["history"] and a["eval"] == b["eval"] and a["test"] == b["test"]
    assert not (tmp_path / "run.checkpoint").exists()
    fault_log("a distill SIGKILLed once inside the student's Stage I, resumed with --resume; lost: nothing (the "
              "uninterrupted run's Stage I and Stage II)")
