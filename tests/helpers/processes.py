"""Processes the tests start, watch and kill: the command in a process of one thread, launchers for two
processes, and a process's children read from /proc."""

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

# One thread per process everywhere, the one-process references included: a float sum split over a
# different number of threads rounds differently, and the comparisons the tests make are exact.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_one(*args) -> subprocess.CompletedProcess:
    """`tedcache ARGS` in a process of its own, one thread."""
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


def state_and_parent(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) from /proc/PID/stat (after the command's parentheses), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (zombies are not counted)."""
    return [int(p.name) for p in Path("/proc").glob("[0-9]*")
            if (found := state_and_parent(int(p.name))) and found[1] == pid and found[0] != "Z"]


def process_tree(root: int) -> list[int]:
    """`root` and every live process descended from it."""
    return [root] + [pid for child in children(root) for pid in process_tree(child)]


def gone(pids: list[int], seconds: float = 10) -> bool:
    """Whether every process in `pids` has ended (a zombie counts as ended) within `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if all((found := state_and_parent(pid)) is None or found[0] == "Z" for pid in pids):
            return True
        time.sleep(0.05)
    return False


def rank_of(pid: int) -> int | None:
    """The RANK a launcher gave process `pid`, None without one."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


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


def refused_then_resumed(args: list, out: Path, straight: Path) -> tuple[dict, dict]:
    """A killed distill run again: refused without --resume, finished with it. Returns its metrics and the
    uninterrupted run's."""
    refused = run_one(*args)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = run_one(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    return tuple(json.loads((folder / "metrics.json").read_text()) for folder in (out, straight))
