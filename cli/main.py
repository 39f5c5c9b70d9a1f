"""click app: flags -> config dataclasses -> tedcache API. Errors become one line on stderr."""

from __future__ import annotations

import os
import sys

import click

from tedcache.config import (
    DEFAULT_CACHE_DIR,
    DataConfig,
    DistillConfig,
    ExtractConfig,
    FilterConfig,
    FinetuneConfig,
    TrainConfig,
)


def _paths(values: tuple[str, ...]) -> list[str] | None:
    return [p for v in values for p in v.split(",") if p] or None


def data_options(f):
    """Flags that say which data and how to read it (shared by extract and finetune)."""
    options = [
        click.option("--data", "data", multiple=True, required=True,
                     help="Training data: csv/json/jsonl/parquet files, a datasets save_to_disk folder, or a hub name."),
        click.option("--eval-data", multiple=True, help="Evaluation split (same formats); used to pick the best epoch."),
        click.option("--test-data", multiple=True, help="Test split, scored once with the best model."),
        click.option("--task", default="classification", show_default=True,
                     help="classification, regression or causal-lm (plain text packed into blocks)."),
        click.option("--text-column", default="text", show_default=True),
        click.option("--text-pair-column", default=None, help="Second text of sentence-pair tasks."),
        click.option("--label-column", default="label", show_default=True),
        click.option("--max-length", default=128, show_default=True, type=int, help="Tokens per example (truncated)."),
        click.option("--block-size", default=128, show_default=True, type=int,
                     help="causal-lm: tokens per block (documents joined by EOS, then cut)."),
        click.option("--limit", default=None, type=int, help="Use only the first N training rows (causal-lm: blocks)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _data_config(kw: dict) -> DataConfig:
    return DataConfig(train=_paths(kw.pop("data")), eval=_paths(kw.pop("eval_data")), test=_paths(kw.pop("test_data")),
                      task=kw.pop("task"), text_column=kw.pop("text_column"),
                      text_pair_column=kw.pop("text_pair_column"), label_column=kw.pop("label_column"),
                      max_length=kw.pop("max_length"), block_size=kw.pop("block_size"), limit=kw.pop("limit"))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="tedcache")
def app():
    """tedcache: TED distillation through an offline, compressed teacher feature cache."""


@app.command()
@click.option("--teacher", required=True, help="Fine-tuned teacher: an HF model folder or hub name.")
@data_options
@click.option("--layers", default="all", show_default=True, help="Teacher layers to filter: all, every:K, or 0,5 (0-based).")
@click.option("--filter", "filter_kind", default="linear", show_default=True, help="linear or mlp.")
@click.option("--filter-dim", default=None, type=int, help="Filter output width [default: teacher hidden size].")
@click.option("--lm-head", default="tied", show_default=True,
              help="causal-lm Stage-I head: tied (frozen output embedding) or new (a trainable vocabulary projection).")
@click.option("--logits", default="sample:50", show_default=True,
              help="causal-lm teacher distribution per token: sample:N, topk:K or full (small vocabularies).")
@click.option("--logits-temperature", default=1.0, show_default=True, type=float,
              help="causal-lm: sample:N draws from softmax(logits / this); distill uses the same temperature.")
@click.option("--stage1-epochs", default=3.0, show_default=True, type=float)
@click.option("--stage1-lr", default=1e-3, show_default=True, type=float)
@click.option("--stage1-batch-size", default=32, show_default=True, type=int)
@click.option("--seed", default=42, show_default=True, type=int, help="Stage I seed and storage order.")
@click.option("--precision", default="int8", show_default=True, help="Stored states: fp32, fp16, bf16 or int8.")
@click.option("--states", default="filtered", show_default=True,
              help="filtered (TED) or raw (unfiltered hidden states, for --method lwd).")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Teacher batch for the cache pass.")
@click.option("--shard-tokens", default=16384, show_default=True, type=int,
              help="Tokens per shard: the unit of writing, resuming and checksumming.")
@click.option("--cache-dir", default=str(DEFAULT_CACHE_DIR / "caches"), show_default=True,
              help="A folder or an fsspec URL (s3://bucket/prefix).")
@click.option("--force", is_flag=True, help="Rebuild even if a cache of the same inputs exists.")
def extract(teacher, layers, filter_kind, filter_dim, lm_head, logits, logits_temperature, stage1_epochs, stage1_lr,
            stage1_batch_size, seed, precision,
            states, batch_size, shard_tokens, cache_dir, force, **kw):
    """Stage one: train teacher filters (Stage I), run the teacher once, write the cache. Prints its path last.
    Interrupted? Run the same command again: it resumes."""
    from tedcache.extraction import extract as run

    cfg = ExtractConfig(teacher=teacher, data=_data_config(kw),
                        filters=FilterConfig(layers=layers, kind=filter_kind, dim=filter_dim, lm_head=lm_head),
                        stage1=TrainConfig(epochs=stage1_epochs, lr=stage1_lr, batch_size=stage1_batch_size, seed=seed),
                        cache_dir=cache_dir, precision=precision, states=states, logits=logits,
                        logits_temperature=logits_temperature, batch_size=batch_size,
                        shard_tokens=shard_tokens, seed=seed, force=force)
    click.echo(run(cfg))


def distill_options(f):
    """Flags of a stage-two run besides cache, student, out, method and seed (shared by distill and compare)."""
    options = [
        click.option("--kl-alpha", default=1.0, show_default=True, type=float),
        click.option("--mse-alpha", default=1.0, show_default=True, type=float),
        click.option("--temperature", default=None, type=float,
                     help="KD temperature [default: 2.0; a causal-lm cache of samples: the temperature they were drawn at]."),
        click.option("--kd-targets", default="auto", show_default=True,
                     help="causal-lm: sampled (sample counts, unbiased) or logits (renormalised over the stored ids); "
                          "auto = sampled for sample:N caches."),
        click.option("--epochs", default=3.0, show_default=True, type=float),
        click.option("--lr", default=5e-5, show_default=True, type=float),
        click.option("--batch-size", default=32, show_default=True, type=int,
                     help="Examples per process per micro-batch (global batch: this x processes x --grad-accum)."),
        click.option("--grad-accum", default=1, show_default=True, type=int, help="Micro-batches per optimiser step."),
        click.option("--weight-decay", default=0.0, show_default=True, type=float),
        click.option("--warmup-ratio", default=0.0, show_default=True, type=float),
        click.option("--student-layers", default="all", show_default=True, help="Student layers that get filters (ted)."),
        click.option("--layer-map", default=None, help="Explicit student:teacher pairs, e.g. 0:2,1:5."),
        click.option("--finetune-first", default=0.0, show_default=True, type=float,
                     help="ted: epochs of plain fine-tuning before Stage I (the reference's practice)."),
        click.option("--stage1-epochs", default=1.0, show_default=True, type=float),
        click.option("--stage1-lr", default=1e-3, show_default=True, type=float),
        click.option("--stage1-batch-size", default=32, show_default=True, type=int,
                     help="ted: Stage I batch (every process runs the student's Stage I whole, by itself)."),
        click.option("--eval-every", default=0, show_default=True, type=int, help="Steps between evaluations (0: each epoch)."),
        click.option("--max-steps", default=None, type=int),
        click.option("--verify", "verify_first", is_flag=True, help="Check every shard's checksum before training."),
        click.option("--workers", default=0, show_default=True, type=int, help="DataLoader processes reading the cache."),
        click.option("--checkpoint-every", default=0, show_default=True, type=int,
                     help="Optimiser steps between checkpoints (0: after every epoch)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _distill_config(cache: str, student: str, out: str, method: str, seed: int, kw: dict) -> DistillConfig:
    train = TrainConfig(epochs=kw.pop("epochs"), lr=kw.pop("lr"), batch_size=kw.pop("batch_size"),
                        grad_accum=kw.pop("grad_accum"), weight_decay=kw.pop("weight_decay"),
                        warmup_ratio=kw.pop("warmup_ratio"), seed=seed)
    stage1 = TrainConfig(epochs=kw.pop("stage1_epochs"), lr=kw.pop("stage1_lr"), batch_size=kw.pop("stage1_batch_size"),
                         seed=seed)
    return DistillConfig(cache=cache, student=student, out=out, method=method, train=train, stage1=stage1,
                         verify=kw.pop("verify_first"), **kw)


@app.command()
@click.option("--cache", required=True, help="Cache folder printed by tedcache extract.")
@click.option("--student", required=True, help="Student: an HF model folder or hub name (same tokenizer as the teacher).")
@click.option("--out", required=True, help="Folder for the best student, its tokenizer and metrics.json.")
@click.option("--method", default="ted", show_default=True, help="ted, kd, lwd (raw-state cache) or finetune.")
@click.option("--seed", default=42, show_default=True, type=int)
@distill_options
@click.option("--resume", is_flag=True,
              help="Continue from the checkpoint an interrupted run of the same command left in OUT.checkpoint.")
def distill(cache, student, out, method, seed, **kw):
    """Stage two: train a student against a cache. The teacher is never loaded.
    Many processes: accelerate launch -m tedcache.cli.main distill ... (or torchrun); see docs/distributed.md."""
    from tedcache.distillation import distill as run

    run(_distill_config(cache, student, out, method, seed, kw))
    click.echo(out)


@app.command()
@click.option("--cache", required=True, help="Cache of filtered states (finetune, kd and ted runs read it).")
@click.option("--raw-cache", default=None, help="Cache of raw states from the same teacher and data (lwd runs).")
@click.option("--student", required=True, help="The student every run starts from.")
@click.option("--out", required=True, help="Folder for one run folder per method and seed, and compare.json.")
@click.option("--methods", default="finetune,kd,lwd,ted", show_default=True)
@click.option("--seeds", default="1,2,3", show_default=True)
@distill_options
def compare(cache, raw_cache, student, out, methods, seeds, **kw):
    """Run several methods over several seeds from one cache; print each method's test metric as mean ± std.
    Finished runs are kept and a run cut off mid-way continues from its checkpoint: re-running the command
    resumes. Feed OUT to tedcache report."""
    from tedcache.compare import CompareConfig
    from tedcache.compare import compare as run

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"--seeds '{seeds}' is not a comma list of integers, e.g. 1,2,3") from None
    base = _distill_config(cache, student, out, "ted", seed_list[0] if seed_list else 0, kw)
    run(CompareConfig(base=base, methods=[m for m in methods.split(",") if m.strip()], seeds=seed_list,
                      raw_cache=raw_cache))


@app.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", required=True, help="Folder for index.html (self-contained) and the PNG plots.")
def report(runs, out):
    """An HTML report with plots from run folders (distill, finetune or compare outputs). Prints the page's path."""
    from tedcache.report import build_report

    click.echo(build_report(list(runs), out))


@app.command()
@click.option("--model", required=True, help="Model to fine-tune: an HF folder or hub name.")
@data_options
@click.option("--out", required=True)
@click.option("--epochs", default=3.0, show_default=True, type=float)
@click.option("--lr", default=5e-5, show_default=True, type=float)
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--warmup-ratio", default=0.0, show_default=True, type=float)
@click.option("--seed", default=42, show_default=True, type=int)
def finetune(model, out, epochs, lr, batch_size, warmup_ratio, seed, **kw):
    """Ordinary fine-tuning (to make a teacher, or a baseline)."""
    from tedcache.finetuning import finetune as run

    run(FinetuneConfig(model=model, data=_data_config(kw), out=out,
                       train=TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, warmup_ratio=warmup_ratio,
                                         seed=seed)))
    click.echo(out)


@app.command("init-student")
@click.option("--from", "source", required=True, help="Model to copy layers from.")
@click.option("--layers", required=True, help="0-based layers to keep, e.g. 0,5.")
@click.option("--out", required=True)
def init_student(source, layers, out):
    """A shallower copy of a model keeping the given layers (DistilBERT-style initialisation)."""
    from tedcache.models import init_student as run
    from tedcache.taps import parse_layers

    click.echo(run(source, parse_layers(layers, 10**6), out))


@app.command()
@click.argument("cache")
@click.option("--repair", is_flag=True, help="Forget the damaged units, so the extract command recomputes them.")
def verify(cache, repair):
    """Read a whole cache and check every shard against its checksum. Exit 1 when anything is wrong."""
    from tedcache.store import repair as forget_units
    from tedcache.store import verify as run

    problems = run(cache)
    for problem in problems:
        click.echo(str(problem))
    if not problems:
        click.echo(f"ok: {cache}")
        return
    if repair:
        count = forget_units(cache, problems)
        click.echo(f"forgot {count} damaged units; re-run the extract command that made {cache} to recompute them")
    sys.exit(1)


@app.command("ls")
@click.option("--cache-dir", default=str(DEFAULT_CACHE_DIR / "caches"), show_default=True)
def list_command(cache_dir):
    """The caches in a cache folder, one line each."""
    from tedcache.catalog import list_caches

    for row in list_caches(cache_dir):
        state = "complete" if row["complete"] else f"incomplete{' (writing: ' + row['writing'] + ')' if row['writing'] else ''}"
        click.echo(f"{row['path']}  teacher={row['teacher']}  data={row['data']}  layers={row['layers']}  "
                   f"{row['states']}/{row['precision']}  {row['bytes_on_disk'] / 2**20:.1f}MiB  {state}")


@app.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def inspect(cache, as_json):
    """Everything about one cache: metadata, sizes, bytes per value, per-layer statistics."""
    import json

    from tedcache.catalog import inspect_cache

    info = inspect_cache(cache)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    for key, value in info.items():
        click.echo(f"{key}: {json.dumps(value, default=str) if isinstance(value, (dict, list)) else value}")


@app.command()
@click.argument("caches", nargs=-1, required=True)
def rm(caches):
    """Delete caches (refused while an extraction is writing one)."""
    from tedcache.catalog import remove_cache

    for cache in caches:
        remove_cache(cache)
        click.echo(f"removed {cache}")


@app.command()
@click.option("--cache-dir", default=str(DEFAULT_CACHE_DIR / "caches"), show_default=True)
def gc(cache_dir):
    """Delete the incomplete caches that no running extraction is writing."""
    from tedcache.catalog import collect_garbage

    for path in collect_garbage(cache_dir):
        click.echo(f"removed {path}")


@app.command()
@click.option("--pairs", default="minilm,bert", show_default=True, help="Which model pairs: minilm, bert.")
@click.option("--steps", default=20, show_default=True, type=int, help="Timed steps per mode (first 3 are warm-up).")
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--examples", default=1024, show_default=True, type=int, help="Training examples in the cache.")
@click.option("--workdir", default=str(DEFAULT_CACHE_DIR / "bench"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per pair.")
def bench(pairs, steps, batch_size, examples, workdir, as_json):
    """Stage-two step time and memory: student alone vs offline TED vs online TED, side by side."""
    import json

    from tedcache.bench import format_table, run_bench

    results = run_bench(workdir, tuple(p for p in pairs.split(",") if p), steps, batch_size, examples)
    click.echo(json.dumps(results, indent=2) if as_json else format_table(results))


@app.command()
@click.option("--task", default="classification", show_default=True,
              type=click.Choice(["classification", "causal-lm"]),
              help="classification: MiniLM on Rotten Tomatoes; causal-lm: SmolLM2-135M on the snippets as text.")
@click.option("--full", is_flag=True, help="More data and longer training (tens of minutes; causal-lm: hours).")
@click.option("--workdir", default=str(DEFAULT_CACHE_DIR / "demo"), show_default=True,
              help="Where the fine-tuned teacher, the cache and the students go (reused by later runs).")
@click.option("--seed", default=42, show_default=True, type=int)
def demo(task, full, workdir, seed):
    """The embedded defaults: MiniLM -> 2-layer student on Rotten Tomatoes (TED vs KD vs fine-tuning), or
    SmolLM2-135M -> 15-layer student on the snippets as text (perplexity; --task causal-lm)."""
    if task == "causal-lm":
        from tedcache import demo_lm

        demo_lm.run_lm_demo(workdir=workdir, size=demo_lm.FULL if full else demo_lm.QUICK, seed=seed)
        return
    from tedcache.demo import FULL, QUICK, run_demo

    run_demo(workdir=workdir, size=FULL if full else QUICK, seed=seed)


def _quiet_libraries() -> None:
    """Keep stderr for tedcache's own progress: no per-file bars or load reports from the libraries."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main() -> None:
    """Entry point: run the app; user errors print one line (no traceback) and exit 2."""
    from tedcache.errors import TedcacheError

    _quiet_libraries()
    try:
        app.main(standalone_mode=False)
    except TedcacheError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()} (see --help)", err=True)
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("TEDCACHE_DEBUG"):
            raise
        click.echo(f"error: unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                   "(set TEDCACHE_DEBUG=1 for a traceback, and please report it)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
