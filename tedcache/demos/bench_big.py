"""`tedcache bench --profile big`: the cache's payoff with a large causal-LM teacher, side by side in one run —
extraction against the teacher's bare forward, Stage II steps of the student alone, offline TED and online
TED, and `tune` trials per hour from the cache against the teacher live.

Two presets, picked by the device: on a GPU a randomly initialised Llama-shaped teacher of about 1.2B
parameters (24 x 2048, grouped-query attention, bf16) teaches a randomly initialised student of
SmolLM2-135M's shape, on 32 x 512-token blocks; on a CPU SmolLM2-135M itself teaches a small random
student shaped like it. Timing depends on the shapes, not the weights' values, so random teachers are
honest here; the text is Rotten Tomatoes' snippets as plain text (repeated where a preset needs more
tokens than they hold)."""

from __future__ import annotations

import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ..cache import Cache
from ..config import DataConfig, DistillConfig, ExtractConfig, FilterConfig, OptimConfig, StudentConfig, TuneConfig
from ..distillation import distill
from ..distributed import pick_device
from ..errors import note
from ..experiments.tune import tune
from ..extraction import extract
from ..students import init_student
from .bench import bare_forward_seconds
from .demo_lm import LMDemoSize, smollm2, snippet_texts


@dataclass(frozen=True)
class LlamaShape:
    depth: int
    width: int
    heads: int
    kv_heads: int
    ffn: int


@dataclass(frozen=True)
class BigProfile:
    """What `bench --profile big` builds and times."""

    teacher: LlamaShape | None  # None: SmolLM2-135M with its own weights
    student: LlamaShape  # randomly initialised (its key/value heads follow the teacher's grouping)
    teacher_layers: str  # the teacher layers cached (filtered states)
    student_layers: str  # the student layers that get filters
    block_size: int
    batch_size: int
    blocks: int  # training blocks in the cache (at most what the repeated text holds)
    text_repeats: int  # the training text, this many times over
    steps: int  # Stage II steps per mode (the first three are warm-up)
    trials: int  # tune trials from the cache, and as many with the teacher live
    trial_steps: int  # Stage II steps of each trial (at most an epoch: base settings train one)


GPU_PROFILE = BigProfile(teacher=LlamaShape(24, 2048, 32, 8, 5632), student=LlamaShape(30, 576, 12, 3, 1536),
                         teacher_layers="every:4", student_layers="every:5", block_size=512, batch_size=32,
                         blocks=1024, text_repeats=2, steps=30, trials=2, trial_steps=32)
CPU_PROFILE = BigProfile(teacher=None, student=LlamaShape(6, 192, 3, 1, 512),
                         teacher_layers="every:5", student_layers="all", block_size=128, batch_size=8,
                         blocks=256, text_repeats=1, steps=12, trials=2, trial_steps=32)


def default_profile() -> BigProfile:
    return GPU_PROFILE if pick_device().type == "cuda" else CPU_PROFILE


def _models(work: Path, profile: BigProfile) -> tuple[str, str]:
    """Teacher and student folders (made once). TEDCACHE_BENCH_SMOLLM2: a folder with SmolLM2's config and
    tokenizer only, for machines without the packaged model (a random teacher needs only the tokenizer;
    without weights, SmolLM2's own shape is randomly initialised too)."""
    source = os.environ.get("TEDCACHE_BENCH_SMOLLM2") or smollm2(work.parent / "smollm2-135m-instruct")
    teacher, student = work / "teacher", work / "student"
    if profile.teacher is None and any(Path(source).glob("*.safetensors")):
        teacher = Path(source)
    elif not (teacher / "config.json").exists():
        _save_random_teacher(source, profile, teacher)
    if not (student / "config.json").exists():
        shape = profile.student
        init_student(StudentConfig(source=str(teacher), out=str(student), init="random", depth=shape.depth,
                                   width=shape.width, heads=shape.heads, ffn=shape.ffn, embeddings="random"))
    return str(teacher), str(student)


def _save_random_teacher(source: str, profile: BigProfile, folder: Path) -> None:
    """A randomly initialised Llama of the profile's teacher shape (or of the source's own) with the
    source's tokenizer; bf16 on a GPU."""
    tokenizer = AutoTokenizer.from_pretrained(source)
    shape = profile.teacher
    config = LlamaConfig.from_pretrained(source) if shape is None else LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.width, num_hidden_layers=shape.depth,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, intermediate_size=shape.ffn,
        max_position_embeddings=max(2048, profile.block_size), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    device = pick_device()
    with torch.device(device):  # a billion parameters initialise in seconds on a GPU
        model = LlamaForCausalLM(config)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    staging = folder.with_name(folder.name + ".partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)


@contextmanager
def _environment(name: str, value: str):
    """The variable set while the block runs (the processes it starts inherit it), then as it was."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def _in_own_process(fn, *args):
    """fn(*args) in a fresh process, so that its peak memory is its own (and a GPU's is freed after)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _trials_per_hour(cfg: TuneConfig) -> float:
    with redirect_stdout(sys.stderr):  # tune prints its table; the bench's stdout carries its own result only
        return tune(cfg)["methods"][cfg.methods[0]]["trials_per_hour"]


def run_big(workdir: str, profile: BigProfile | None = None) -> dict:
    """Build the pair and the cache, time everything; one result object."""
    profile = profile or default_profile()
    work = Path(workdir)
    teacher, student = _models(work, profile)
    size = LMDemoSize(train_blocks=profile.blocks, validation_snippets=64, test_snippets=0,
                      block_size=profile.block_size, student_epochs=1, stage1_epochs=0.1)
    files = snippet_texts(work / "data", size)
    data = DataConfig(train=[files["train"]] * profile.text_repeats, eval=[files["validation"]], task="causal-lm",
                      block_size=profile.block_size, limit=profile.blocks)
    note("== big: extraction (Stage I short: its cost is not the question here) and the bare forward")
    cfg = ExtractConfig(teacher=teacher, data=data, filters=FilterConfig(layers=profile.teacher_layers),
                        stage1=OptimConfig(epochs=0.05, lr=1e-3, batch_size=profile.batch_size),
                        batch_size=profile.batch_size, cache_dir=str(work / "caches"), force=True,
                        stage1_states="live")  # stored states would let the pass skip the teacher
    cache = extract(cfg)
    meta = Cache(cache).metadata
    forward_s = bare_forward_seconds(cfg, cache)
    tokens = meta.splits["train"] * profile.block_size
    device = pick_device()
    row = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "profile": asdict(profile), "teacher_params": _params(teacher), "student_params": _params(student),
           "train_blocks": meta.splits["train"], "forward_tokens_per_s": tokens / forward_s,
           "extract_over_forward": forward_s / meta.timings["teacher_pass_s"],
           "stage1_s": meta.timings["stage1_s"], "extract_s": meta.timings["total_s"]}

    for scratch in ("steps", "tune", "stage1"):  # every run measures afresh (tune would resume an earlier study,
        shutil.rmtree(work / scratch, ignore_errors=True)  # and reuse an earlier run's Stage I)
    with _environment("TEDCACHE_STAGE1_STORE", str(work / "stage1")):  # the store the modes' processes use
        base = DistillConfig(cache=cache, student=student, out="", method="ted", student_layers=profile.student_layers,
                             optim=OptimConfig(epochs=1, lr=2e-4, batch_size=profile.batch_size),
                             stage1=OptimConfig(epochs=0.02, lr=1e-3, batch_size=profile.batch_size))
        for mode, overrides in (("student", {"method": "finetune"}), ("offline", {}), ("online", {"teacher": teacher})):
            note(f"== big: {mode} Stage II steps")
            metrics = _in_own_process(distill, replace(base, out=str(work / "steps" / mode), max_steps=profile.steps,
                                                       **overrides))
            row[f"{mode}_step_s"] = metrics["stage2_median_step_s"]
            row[f"{mode}_peak_mb"] = metrics["stage2_peak_memory_mb"]
        row["offline_over_student"] = row["offline_step_s"] / row["student_step_s"]
        row["online_over_offline"] = row["online_step_s"] / row["offline_step_s"]

        # trials from the cache with the student's Stage I trained in every trial (before it was reused), then reused
        for source, teacher_live, reuse in (("cache_fresh_stage1", None, False), ("cache", None, True), ("live", teacher, True)):
            note(f"== big: {profile.trials} tune trials, targets from the {source}")
            trial = replace(base, out=str(work / "tune" / source), teacher=teacher_live, max_steps=profile.trial_steps,
                            reuse_stage1=reuse)
            row[f"trials_per_hour_{source}"] = _in_own_process(_trials_per_hour, TuneConfig(
                base=trial, methods=["ted"], trials=profile.trials, pruner="none", search=["optim.lr"]))
    row["trials_per_hour_ratio"] = row["trials_per_hour_cache"] / row["trials_per_hour_live"]
    saved = 3600 / row["trials_per_hour_live"] - 3600 / row["trials_per_hour_cache"]  # seconds a trial
    row["break_even_trials"] = row["extract_s"] / saved if saved > 0 else None
    return row


def _params(folder: str) -> int:
    config = LlamaConfig.from_pretrained(folder)
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters() if p.requires_grad)


def big_table(row: dict) -> str:
    """The big profile's figures as a markdown table (one column: this run's device)."""
    def mb(mode):
        return f"{row[f'{mode}_peak_mb']:,.0f}"
    even = row["break_even_trials"]
    lines = [
        f"| big profile | {row['device']} |", "|---|---|",
        f"| teacher / student parameters | {row['teacher_params'] / 1e6:,.2f}M / {row['student_params'] / 1e6:,.2f}M |",
        f"| batch | {row['profile']['batch_size']} x {row['profile']['block_size']} tokens |",
        f"| teacher bare forward, tokens/s | {row['forward_tokens_per_s']:,.0f} |",
        f"| extraction / bare forward (speed) | {row['extract_over_forward']:.2f} |",
        f"| whole extraction s (Stage I s) | {row['extract_s']:.1f} ({row['stage1_s']:.1f}) |",
        f"| step s: student alone / offline TED / online TED | {row['student_step_s']:.3f} / "
        f"{row['offline_step_s']:.3f} / {row['online_step_s']:.3f} |",
        f"| offline / student alone; online / offline | {row['offline_over_student']:.2f}; "
        f"{row['online_over_offline']:.2f} |",
        f"| peak MB: student alone / offline / online | {mb('student')} / {mb('offline')} / {mb('online')} |",
        f"| tune trials per hour: cache / live (ratio) | {row['trials_per_hour_cache']:.1f} / "
        f"{row['trials_per_hour_live']:.1f} ({row['trials_per_hour_ratio']:.2f}x) |",
        f"| tune trials per hour from the cache: Stage I trained every trial / reused | "
        f"{row['trials_per_hour_cache_fresh_stage1']:.1f} / {row['trials_per_hour_cache']:.1f} |",
        f"| trials after which the cache has paid for its extraction | "
        f"{'never' if even is None else f'{even:.1f}'} |",
    ]
    return "\n".join(lines)
