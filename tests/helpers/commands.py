"""The `tedcache` command run in this process or in one of its own, the arguments the tests give it, and
the check that a refusal is one line."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

from tedcache.cli.main import main

# many small shards (64 tokens) and batches: an extraction writes many units, so a kill lands mid-way
MANY_UNITS = {"max_length": 24, "shard_tokens": 64, "batch_size": 8}


def run_cli(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The `tedcache` command run in this process: the console entry point's own function (cli.main.main,
    flags parsed, errors turned into one line and an exit status), its output captured. Returns what a
    subprocess would (returncode, stdout, stderr) without the seconds a new interpreter spends importing
    torch and transformers."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(cwd or os.getcwd()):
        try:
            main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    return subprocess.CompletedProcess(["tedcache", *map(str, args)], code, out.getvalue(), err.getvalue())


def run_cli_process(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real `tedcache` console entry point in a subprocess (for what needs a process of its own)."""
    return subprocess.run([sys.executable, "-m", "tedcache.cli.main", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def assert_one_line_error(result, *needles):
    """A refusal: a non-zero exit, no traceback, and one `error:` line (the last) holding every needle."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert len([line for line in lines if line.startswith("error")]) == 1
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def flags(**given) -> list[str]:
    """Keyword arguments as command-line flags (stage1_epochs=0.5 -> --stage1-epochs 0.5)."""
    return [str(x) for name, value in given.items() for x in (f"--{name.replace('_', '-')}", value)]


def extract_args(assets, cache_dir, *extra, **given) -> list[str]:
    """`tedcache extract` of the tiny teacher on the fixture's training rows into `cache_dir`, with `given`
    flags added or replacing those (python names: data=..., eval_data=..., stage1_epochs=0.5), then `extra`."""
    return ["extract", *flags(**{"teacher": assets["teacher"], "data": assets["train"], "cache_dir": cache_dir,
                                 **given}), *map(str, extra)]


def distill_args(cache, student, out, batch_size, *extra, **given) -> list[str]:
    """A short TED `tedcache distill` (2 epochs, Stage I half an epoch, seed 3), with `given` flags added or
    replacing those, then `extra` (switches such as --fsdp)."""
    return ["distill", *flags(**{"cache": cache, "student": student, "out": out, "batch_size": batch_size,
                                 "epochs": 2, "lr": 1e-3, "stage1_epochs": 0.5, "seed": 3, "method": "ted", **given}),
            *map(str, extra)]


def long_distill_args(cache, student, out) -> list[str]:
    """A TED distill long enough to be killed after a checkpoint (6 epochs, a checkpoint every 5 steps)."""
    return distill_args(cache, student, out, 8, epochs=6, checkpoint_every=5)
