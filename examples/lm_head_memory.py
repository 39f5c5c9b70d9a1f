"""Peak memory and step time of Stage II on the LM demo's shapes with the KD and next-token terms taken
from the student's whole logits (`distill --whole-logits`) against the default, from its final states
through its output layer a chunk of positions at a time (docs/design.md, "Use it from your own
trainer"). SmolLM2-135M writes a `--logits hidden` cache (exact KD targets); the student is the LM demo's
15-layer copy; each mode is a `distill --method kd --max-steps STEPS` in its own process, side by side in
one run. On a CPU the peak is the process's peak resident memory (loading included). Appends one JSON line
per run.

    python examples/lm_head_memory.py WORKDIR OUT.jsonl [BLOCK_SIZE BATCH STEPS REPEATS]
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from tedcache import extract
from tedcache.config import DEFAULT_CACHE_DIR, DataConfig, ExtractConfig, StudentConfig
from tedcache.demos.demo_lm import QUICK_LM_DEMO, STUDENT_LAYERS, smollm2, snippet_texts
from tedcache.students import init_student


def main(work: Path, out: Path, block_size: int, batch: int, steps: int, repeats: int) -> None:
    teacher = smollm2(DEFAULT_CACHE_DIR / "smollm2-135m-instruct")
    files = snippet_texts(work / "data", QUICK_LM_DEMO)
    student = work / "student"
    if not (student / "config.json").exists():
        init_student(StudentConfig(source=teacher, layers=STUDENT_LAYERS, out=str(student)))
    data = DataConfig(train=[files["train"]], eval=[files["validation"]], task="causal-lm", block_size=block_size,
                      limit=batch * steps * 2)
    cache = extract(ExtractConfig(teacher=teacher, data=data, states="none", logits="hidden", precision="fp16",
                                  cache_dir=str(work / "caches")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for repeat in range(repeats):
        for mode in ("whole", "chunked"):
            run = work / f"run-{mode}-{repeat}"
            command = [sys.executable, "-m", "tedcache.cli.main", "distill", "--cache", cache, "--student",
                       str(student), "--out", str(run), "--method", "kd", "--batch-size", str(batch), "--max-steps",
                       str(steps), "--log-every", "1", "--seed", "1"] + (["--whole-logits"] if mode == "whole" else [])
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(done.stderr[-3000:])
            metrics = json.loads((run / "metrics.json").read_text())
            row = dict(mode=mode, repeat=repeat, block_size=block_size, batch=batch,
                       peak_mb=metrics["stage2_peak_memory_mb"], median_step_s=metrics["stage2_median_step_s"],
                       first_loss=metrics["history"][0]["loss"] if metrics["history"] else None,
                       last_loss=metrics["history"][-1]["loss"] if metrics["history"] else None)
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    work_dir, out_file, *shape = sys.argv[1:]
    size = [int(x) for x in shape] + [256, 8, 4, 1][len(shape):]
    main(Path(work_dir), Path(out_file), *size)
