"""The faults users meet, met for real (`make faults` runs them with the kills of Stage I in test_resume.py
and test_distributed.py, and prints one line per fault): a disk too small for the cache (refused before
anything is written), a disk that fills up mid-extraction (one line naming the folder and the room still
needed, then the same command resumes to the clean cache), a read-only file system (these mount a small
tmpfs, which needs root, as CI has; elsewhere they are skipped), and SIGKILLs at seeded random moments of
an extraction and of a TED distill."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.builders import sentiment_rows, write_rows
from helpers.caches import assert_same_cache
from helpers.commands import MANY_UNITS, extract_args, long_distill_args, run_cli
from helpers.processes import ENV, refused_then_resumed, run_one

from tedcache.cache import Cache


@pytest.fixture
def small_disk(tmp_path):
    """mount(size, read_only=False) -> a fresh tmpfs folder of that size; unmounted afterwards."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _args(assets, data, cache_dir) -> list:
    return extract_args(assets, cache_dir, data=data, eval_data=assets["eval"], stage1_epochs=0.2, precision="fp32",
                        **MANY_UNITS)


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


@pytest.mark.process  # mounts a disk of its own
def test_a_disk_clearly_too_small_is_refused_before_anything_is_written(assets, tmp_path, small_disk, fault_log):
    disk = small_disk("64k")
    data = write_rows(tmp_path / "train.csv", sentiment_rows(600, seed=7))
    result = run_cli(*_args(assets, data, disk / "caches"))
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert f"{disk} has " in line and " free and the cache needs about " in line and "--cache-dir" in line
    assert list(disk.iterdir()) == []
    fault_log("a 64 KiB disk for a bigger cache: refused before writing, both sizes named; lost: nothing")


@pytest.mark.process  # mounts a disk of its own (and the filler races an extraction process)
def test_a_disk_filling_up_mid_extraction_is_said_as_such_and_the_same_command_resumes(assets, tmp_path, small_disk,
                                                                                       fault_log):
    disk = small_disk("32m")
    data = write_rows(tmp_path / "train.csv", sentiment_rows(600, seed=7))
    clean = run_cli(*_args(assets, data, tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr
    proc = subprocess.Popen([sys.executable, "-m", "tedcache.cli.main", *map(str, _args(assets, data, disk / "caches"))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(disk.glob("caches/*/units/train/*.json")):
        time.sleep(0.005)
    filler = disk / "filler"
    try:  # the rest of the disk, taken by someone else (already full at the open is full too)
        with filler.open("wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-2000:]
    line = _one_line(stderr)
    assert "the disk is full where the cache is written" in line and str(disk / "caches") in line
    assert "it needs about" in line and "free space and run the same command to resume" in line
    cache = next(disk.glob("caches/*"))
    assert json.loads((cache / "zarr.json").read_text())["attributes"]["tedcache"]["complete"] is False
    filler.unlink(missing_ok=True)
    resumed = run_cli(*_args(assets, data, disk / "caches"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming:" in resumed.stderr
    assert_same_cache(resumed.stdout.strip().splitlines()[-1], clean.stdout.strip().splitlines()[-1])
    fault_log("the disk filled up mid-extraction, once: one line naming the folder and the room needed, then the "
              "same command resumed; lost: nothing (the clean cache, array for array)")


@pytest.mark.process  # mounts a disk of its own
def test_a_read_only_file_system_is_named_in_one_line(assets, tmp_path, small_disk, fault_log):
    disk = small_disk("1m", read_only=True)
    data = write_rows(tmp_path / "train.csv", sentiment_rows(60, seed=7))
    result = run_cli(*_args(assets, data, disk / "caches"))
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert f"cannot write in {disk / 'caches'}" in line and "read-only file system" in line
    fault_log("a read-only file system: one line naming the folder; lost: nothing")


def test_resume_without_a_checkpoint_starts_the_run_and_says_so(assets, tmp_path):
    data = write_rows(tmp_path / "train.csv", sentiment_rows(60, seed=7))
    made = run_cli(*_args(assets, data, tmp_path / "caches"))
    assert made.returncode == 0, made.stderr
    run = run_cli("distill", "--cache", made.stdout.strip().splitlines()[-1], "--student", assets["student"], "--out",
                  tmp_path / "run", "--epochs", "1", "--stage1-epochs", "0.5", "--resume", "--method", "ted")
    assert run.returncode == 0, run.stderr
    assert "holds no checkpoint yet, so the run starts from the beginning" in run.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()


def _kill_at(command: list, ready, delay: float, env: dict | None = None) -> None:
    """Start `command`, SIGKILL it and everything it started `delay` seconds after `ready()` first holds. The
    runs compared must use as many threads (`env`): a float sum split over other threads rounds otherwise."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env or {**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.005)
    time.sleep(delay)
    assert proc.poll() is None, "the command finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.process
def test_an_extraction_killed_at_five_seeded_moments_loses_nothing(assets, tmp_path, fault_log):
    data = write_rows(tmp_path / "train.csv", sentiment_rows(1500, seed=7))
    clean = run_cli(*_args(assets, data, tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr
    units = Cache(clean.stdout.strip().splitlines()[-1]).metadata.units["train"]
    rng = random.Random(39)
    moments = sorted(rng.sample(range(1, units - 20), 5))  # train units written before each kill
    command = [sys.executable, "-m", "tedcache.cli.main", *map(str, _args(assets, data, tmp_path / "killed"))]
    for written in moments:
        _kill_at(command, lambda written=written: len(list(tmp_path.glob("killed/*/units/train/*.json"))) >= written,
                 rng.uniform(0, 0.2))
        cache = next(tmp_path.glob("killed/*"))
        assert json.loads((cache / "zarr.json").read_text())["attributes"]["tedcache"]["complete"] is False
    resumed = run_cli(*_args(assets, data, tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_cache(resumed.stdout.strip().splitlines()[-1], clean.stdout.strip().splitlines()[-1])
    fault_log(f"extraction SIGKILLed 5 times (after {', '.join(map(str, moments))} of {units} train units, seeded), "
              "resumed after each; lost: nothing (the clean cache, array for array)")


@pytest.mark.process
def test_a_ted_distill_killed_at_three_seeded_moments_finishes_as_an_uninterrupted_run(assets, tmp_path, fault_log):
    data = write_rows(tmp_path / "train.csv", sentiment_rows(600, seed=7))
    made = run_cli(*_args(assets, data, tmp_path / "caches"), "--test-data", assets["test"])
    assert made.returncode == 0, made.stderr
    cache = made.stdout.strip().splitlines()[-1]
    straight = run_one(*long_distill_args(cache, assets["student"], tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    args = long_distill_args(cache, assets["student"], tmp_path / "run")
    state = tmp_path / "run.checkpoint" / "state.pt"
    rng = random.Random(38)
    steps = []
    command = [sys.executable, "-m", "tedcache.cli.main", *map(str, args), "--resume"]
    for _ in range(3):
        before = state.stat().st_mtime_ns if state.exists() else None
        waits = rng.randint(1, 3)  # checkpoints this run writes before its kill
        seen = []

        def ready(before=before, waits=waits, seen=seen) -> bool:
            if state.exists() and state.stat().st_mtime_ns not in (before, *seen):
                seen.append(state.stat().st_mtime_ns)
            return len(seen) >= waits

        _kill_at(command, ready, rng.uniform(0, 0.3), ENV)  # run_one's, one thread
        steps.append(torch.load(state, weights_only=True)["loop"]["step"])
    assert not (tmp_path / "run").exists()  # no run folder until the run has finished
    a, b = refused_then_resumed(args, tmp_path / "run", tmp_path / "straight")
    assert a["history"] == b["history"] and a["eval"] == b["eval"] and a["test"] == b["test"]
    assert steps == sorted(steps) and len(set(steps)) == 3
    assert not (tmp_path / "run.checkpoint").exists()
    fault_log(f"a TED distill SIGKILLed 3 times (at checkpointed steps {', '.join(map(str, steps))}, seeded), resumed "
              "after each; lost: nothing (the uninterrupted run's losses, validation and test scores)")
