"""Crash safety: a real extraction process killed with SIGKILL, resumed by the same command, compared with
an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.builders import sentiment_rows, write_rows
from helpers.caches import assert_same_cache
from helpers.commands import MANY_UNITS, extract_args, run_cli
from helpers.processes import children, gone

from tedcache import DataConfig, ExtractConfig, OptimConfig, extract
from tedcache.cache import Cache


def _args(assets, data, cache_dir):
    return extract_args(assets, cache_dir, data=data, eval_data=assets["eval"], stage1_epochs=0.2, **MANY_UNITS)


def _arrays(path: str) -> dict[str, np.ndarray]:
    cache = Cache(path)
    out = {}
    for split in ("train", "eval"):
        group = cache.root[split]
        for name, arr in group.arrays():
            out[f"{split}/{name}"] = arr[...]
        if "states" in group:
            for name, arr in group["states"].arrays():
                out[f"{split}/states/{name}"] = arr[...]
            for name, arr in group["token_scales"].arrays():
                out[f"{split}/token_scales/{name}"] = arr[...]
    return out








@pytest.mark.process
def test_an_idle_writer_process_dies_with_its_parent_killed_by_sigkill(assets, tmp_path):
    path = extract(ExtractConfig(teacher=str(assets["teacher"]), data=DataConfig(train=[str(assets["train"])]),
                                 stage1=OptimConfig(epochs=0.2), cache_dir=str(tmp_path)))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from tedcache.cache import BackgroundWriter, CacheWriter, Location\n"
                               "writer = BackgroundWriter(CacheWriter(Location(sys.argv[1])))\n"
                               "print(writer.process.pid, flush=True)\n"
                               "time.sleep(120)", path], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    assert children(holder.pid) == [child]
    holder.kill()
    holder.wait()
    assert gone([child]), "the writer waits on its queue after its parent died"


@pytest.mark.long
@pytest.mark.process
def test_sigkill_then_same_command_resumes_to_identical_values(assets, tmp_path):
    data = write_rows(tmp_path / "big.csv", sentiment_rows(2500, seed=7))
    killed_dir = tmp_path / "killed"
    # the killed and the resumed run write from a process (the kind a kill could orphan), the clean run
    # from a thread (the CPU's default): the same cache either way
    proc = subprocess.Popen([sys.executable, "-m", "tedcache.cli.main", *map(str, _args(assets, data, killed_dir)),
                             "--writer", "process"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 240
    records = []
    while time.time() < deadline and proc.poll() is None:
        records = list(killed_dir.glob("*/units/train/*.json"))
        if len(records) >= 20:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "extraction finished before it could be killed"
    writers = children(proc.pid)
    assert len(writers) == 1  # the cache writer process
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert gone(writers), "the writer outlived its extraction"
    cache_path = records[0].parents[2]
    done_before = {p.name: p.stat().st_mtime_ns for p in (cache_path / "units" / "train").glob("*.json")}
    assert run_cli("distill", "--cache", cache_path, "--student", assets["student"], "--out",
                   tmp_path / "o").returncode == 2  # refused: incomplete

    resumed = run_cli(*_args(assets, data, killed_dir), "--writer", "process")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1] == str(cache_path)
    assert f"resuming: {len(done_before)} of" in resumed.stderr
    for name, stamp in done_before.items():  # finished units were kept, not recomputed
        assert (cache_path / "units" / "train" / name).stat().st_mtime_ns == stamp
    assert not (cache_path / ".lock").exists()

    clean = run_cli(*_args(assets, data, tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr
    clean_path = clean.stdout.strip().splitlines()[-1]
    assert Path(clean_path).name == cache_path.name  # same inputs, same name
    got, want = _arrays(str(cache_path)), _arrays(clean_path)
    assert set(got) == set(want) and len(got) > 10
    for key in want:
        assert np.array_equal(got[key], want[key]), key


def _kill_when(args: list, ready, seconds_after: float = 0.2) -> None:
    """Start `tedcache ARGS` as its own process; SIGKILL it `seconds_after` once `ready()` holds."""
    proc = subprocess.Popen([sys.executable, "-m", "tedcache.cli.main", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    time.sleep(seconds_after)
    assert proc.poll() is None, "the extraction finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.long
@pytest.mark.process
def test_stage1_killed_at_several_moments_resumes_to_the_uninterrupted_filters(assets, tmp_path, fault_log):
    """Three SIGKILLs during Stage I, each after a later checkpoint; the resumed extraction trains on from
    the last one and writes the uninterrupted extraction's cache: filters, Stage I's measurements and
    every array."""
    import torch

    data = write_rows(tmp_path / "train.csv", sentiment_rows(400, seed=5))
    args = _args(assets, data, tmp_path / "killed")
    args[args.index("--stage1-epochs") + 1] = "4"
    # no early stop, and the kill soon after a checkpoint: Stage I on stored states is fast (about 3 ms a step)
    args += ["--stage1-checkpoint-every", "4", "--stage1-batch-size", "8", "--stage1-patience", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight_args = list(args)
    straight_args[args.index("--cache-dir") + 1] = tmp_path / "straight"
    straight = subprocess.run([sys.executable, "-m", "tedcache.cli.main", *map(str, straight_args)],
                              capture_output=True, text=True, env=env, timeout=600)
    assert straight.returncode == 0, straight.stderr

    def state() -> Path | None:
        found = list((tmp_path / "killed").glob("*/stage1.checkpoint/state.pt"))
        return found[0] if found else None

    steps_seen = []
    for _ in range(3):
        before = state().stat().st_mtime_ns if state() else None
        _kill_when(args, lambda before=before: state() is not None and state().stat().st_mtime_ns != before,
                   seconds_after=0.02)
        steps_seen.append(torch.load(state(), weights_only=True)["loop"]["step"])
    assert steps_seen == sorted(steps_seen) and len(set(steps_seen)) == 3  # three moments, each later
    resumed = subprocess.run([sys.executable, "-m", "tedcache.cli.main", *map(str, args)], capture_output=True,
                             text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "stage I resumes from its checkpoint" in resumed.stderr
    paths = [r.stdout.strip().splitlines()[-1] for r in (straight, resumed)]
    assert_same_cache(paths[1], paths[0])
    assert not list((tmp_path / "killed").glob("*/stage1.checkpoint"))  # gone once the cache holds the filters
    fault_log(f"extraction SIGKILLed 3 times inside Stage I (at checkpointed steps {', '.join(map(str, steps_seen))}), "
              "resumed after each; lost: nothing (the uninterrupted filters and cache)")
