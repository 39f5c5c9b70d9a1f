"""Peak memory per process of a two-process `distill` under DDP against the same run under --fsdp
(docs/distributed.md, "Big models"), side by side in one run, on a student whose training state
dominates: a random BERT LAYERS x WIDTH with MiniLM's vocabulary, against a cache of the bench's MiniLM
teacher. Each run is `torchrun --nproc_per_node 2 -m tedcache.cli.main distill ... --max-steps STEPS`;
its metrics.json gives each process's peak (on a CPU the process's peak resident memory, which includes
loading the student; on a GPU what torch allocated in Stage II). Appends one JSON line per run.

    python examples/fsdp_memory.py WORKDIR OUT.jsonl [LAYERS WIDTH STEPS REPEATS]
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from tedcache import extract
from tedcache.demos import bench


def student_folder(work: Path, teacher: str, layers: int, width: int) -> Path:
    folder = work / f"student-{layers}x{width}"
    if not (folder / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(teacher)
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=width, num_hidden_layers=layers,
                            num_attention_heads=width // 64, intermediate_size=4 * width, num_labels=2)
        BertForSequenceClassification(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def main(work: Path, out: Path, layers: int, width: int, steps: int, repeats: int) -> None:
    teacher, _ = bench._pair_dirs(work, "minilm")
    cfg = bench._extract_config(work, "minilm", teacher, bench._data(work, 512))
    cache = extract(replace(cfg, stage1=replace(cfg.stage1, epochs=0.5)))
    student = student_folder(work, teacher, layers, width)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for repeat in range(repeats):
        for mode in ("ddp", "fsdp"):
            run = work / f"run-{mode}-{repeat}"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       "-m", "tedcache.cli.main", "distill", "--cache", cache, "--student", str(student),
                       "--out", str(run), "--method", "ted", "--batch-size", "8", "--max-steps", str(steps),
                       "--stage1-epochs", "0", "--student-layers", f"every:{layers // 2}", "--seed", "1"]
            command += ["--fsdp"] if mode == "fsdp" else []
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(done.stderr[-3000:])
            metrics = json.loads((run / "metrics.json").read_text())
            row = dict(mode=mode, repeat=repeat, student=f"{layers}x{width}",
                       parameters=sum(p.numel() for p in BertForSequenceClassification.from_pretrained(student).parameters()),
                       peak_mb_per_process=metrics["stage2_peak_memory_mb_per_process"],
                       median_step_s=metrics["stage2_median_step_s"], eval=metrics["best"])
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    work_dir, out_file, *shape = sys.argv[1:]
    size = [int(x) for x in shape] + [8, 1024, 6, 2][len(shape):]
    main(Path(work_dir), Path(out_file), *size)
