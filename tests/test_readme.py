"""The README's quick start, run as written: its commands are copied out of the README (so a changed quick
start is the one tested) and run in order by bash on a tiny model and a small CSV, with only the base
model's name replaced by the tiny model's folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.builders import make_model, sentiment_rows, write_rows

ROOT = Path(__file__).resolve().parent.parent


def quick_start() -> list[str]:
    """The commands of the README's quick start (its one bash block), comments dropped."""
    section = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line.split("  #")[0].rstrip() for line in block.splitlines() if line.strip()]


@pytest.mark.process
def test_the_readme_quick_start_runs_as_written(tmp_path):
    commands = quick_start()
    assert commands[0].startswith("BASE=") and [c.split()[1] for c in commands[1:] if c.startswith("tedcache")] == \
        ["finetune", "init-student", "distill"]  # (extract runs inside CACHE=$(...))
    base = make_model(tmp_path / "base-model", layers=6, hidden=32)
    for name, seed in (("train", 0), ("dev", 1), ("test", 2)):
        write_rows(tmp_path / f"{name}.csv", sentiment_rows(64, seed=seed))
    script = "\n".join(["set -euxo pipefail", f"BASE={base}", *commands[1:]])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "HOME": str(tmp_path)}  # caches and kept filters under tmp_path/.cache
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ran = [line for line in result.stderr.splitlines() if line.startswith("+") and "tedcache " in line]
    assert len(ran) == len(commands) - 1  # every command ran (bash -x traces each), and each ended well
    student = tmp_path / "runs" / "kd"
    assert (student / "metrics.json").is_file() and (student / "config.json").is_file()
    assert list(student.glob("*.safetensors"))
