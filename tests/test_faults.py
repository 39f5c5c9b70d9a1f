"""The environment's faults, met for real: a disk too small for the cache (refused before anything is
written), a disk that fills up mid-extraction (one line naming the folder and the room still needed, then
the same command resumes to the clean cache) and a read-only file system. Each mounts a small tmpfs,
which needs root (CI runs as root); elsewhere they are skipped."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli, sentiment_rows, write_rows
from test_distributed import assert_same_cache


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
    return ["extract", "--teacher", assets["teacher"], "--data", data, "--eval-data", assets["eval"], "--max-length",
            "24", "--stage1-epochs", "0.2", "--shard-tokens", "64", "--batch-size", "8", "--precision", "fp32",
            "--cache-dir", cache_dir]


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


def test_a_disk_clearly_too_small_is_refused_before_anything_is_written(assets, tmp_path, small_disk):
    disk = small_disk("64k")
    data = write_rows(tmp_path / "train.csv", sentiment_rows(600, seed=7))
    result = run_cli(*_args(assets, data, disk / "caches"))
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert f"{disk} has " in line and " free and the cache needs about " in line and "--cache-dir" in line
    assert list(disk.iterdir()) == []


def test_a_disk_filling_up_mid_extraction_is_said_as_such_and_the_same_command_resumes(assets, tmp_path, small_disk):
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
    with filler.open("wb") as f:  # the rest of the disk, taken by someone else
        try:
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
    os.remove(filler)
    resumed = run_cli(*_args(assets, data, disk / "caches"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming:" in resumed.stderr
    assert_same_cache(resumed.stdout.strip().splitlines()[-1], clean.stdout.strip().splitlines()[-1])


def test_a_read_only_file_system_is_named_in_one_line(assets, tmp_path, small_disk):
    disk = small_disk("1m", read_only=True)
    data = write_rows(tmp_path / "train.csv", sentiment_rows(60, seed=7))
    result = run_cli(*_args(assets, data, disk / "caches"))
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert f"cannot write in {disk / 'caches'}" in line and "read-only file system" in line


def test_resume_without_a_checkpoint_starts_the_run_and_says_so(assets, tmp_path):
    data = write_rows(tmp_path / "train.csv", sentiment_rows(60, seed=7))
    made = run_cli(*_args(assets, data, tmp_path / "caches"))
    assert made.returncode == 0, made.stderr
    run = run_cli("distill", "--cache", made.stdout.strip().splitlines()[-1], "--student", assets["student"], "--out",
                  tmp_path / "run", "--epochs", "1", "--stage1-epochs", "0.5", "--resume")
    assert run.returncode == 0, run.stderr
    assert "holds no checkpoint yet, so the run starts from the beginning" in run.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()
