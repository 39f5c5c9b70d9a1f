"""click app: flags -> config dataclasses -> tedcache API. Errors become one line on stderr."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
import datasets
import transformers

from tedcache.cache import collect_garbage, inspect_cache, list_caches, remove_cache, repair, verify
from tedcache.config import (
    DEFAULT_CACHE_DIR,
    DEFAULT_CACHES,
    CompareConfig,
    DistillConfig,
    ExtractConfig,
    FinetuneConfig,
    SelectConfig,
    StudentConfig,
    TuneConfig,
)
from tedcache.demos import demo_lm
from tedcache.demos.bench import bench_table, run_bench
from tedcache.demos.bench_big import big_table, run_big
from tedcache.demos.demo import FULL_DEMO, QUICK_DEMO, run_demo
from tedcache.distillation import distill
from tedcache.errors import TedcacheError
from tedcache.experiments.compare import compare
from tedcache.experiments.report import build_report
from tedcache.experiments.selection import select
from tedcache.experiments.tune import tune
from tedcache.extraction import extract
from tedcache.finetuning import finetune
from tedcache.students import init_student
from tedcache.tasks import TASK

from .options import config_command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="tedcache")
def app():
    """tedcache: TED distillation through an offline, compressed teacher feature cache."""


def extract_command(cfg: ExtractConfig) -> None:
    """Train the teacher's filters (TED's Stage I), run the teacher once, write the cache; prints its path
    last. Interrupted? Run the same command again: it resumes."""
    click.echo(extract(cfg))


def distill_command(cfg: DistillConfig) -> None:
    """Train a student against a cache (TED's Stage II, or the kd / lwd / finetune baselines); the teacher
    is not loaded unless --teacher asks for online mode. Many processes: accelerate launch -m
    tedcache.cli.main distill ... (or torchrun); see docs/distributed.md."""
    distill(cfg)
    click.echo(cfg.out)


def compare_command(cfg: CompareConfig) -> None:
    """Run several methods over several seeds from one cache; print each method's test metric as mean ± std.
    Finished runs are kept and a run cut off mid-way continues from its checkpoint: re-running the command
    resumes. Feed OUT to tedcache report."""
    compare(cfg)


def tune_command(cfg: TuneConfig) -> None:
    """Tune each method's settings with Optuna over one cache: the same number of trials per method, scored
    on the validation split only, poor trials pruned. Writes OUT/best-<method>.yaml (run it with tedcache
    distill --config), OUT/trials-<method>.csv and OUT/tune.json (importances, trials per hour). The
    studies live in OUT/study.journal: re-running resumes, and several processes may share one OUT."""
    tune(cfg)


def init_student_command(cfg: StudentConfig) -> None:
    """Make a student from a model and save it; prints its folder. --init copy keeps some of its layers,
    random builds a new model of its kind at another shape, prune keeps its most active heads, neurons and
    channels (see docs/choosing-methods.md for which to use)."""
    click.echo(init_student(cfg))


def select_command(cfg: SelectConfig) -> None:
    """From a cache to the best student: tune each method with the same number of trials (validation only),
    run each one's best configuration on the same --seeds, print the paired verdicts, and copy the winner's
    best seed (by validation) to OUT/best. A tie is named and settled for the cheapest method. Re-running
    resumes; tedcache report OUT renders it."""
    select(cfg)


def finetune_command(cfg: FinetuneConfig) -> None:
    """Ordinary fine-tuning (to make a teacher, or a baseline)."""
    finetune(cfg)
    click.echo(cfg.out)


@app.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", required=True, help="Folder for index.html (self-contained) and the PNG plots.")
def report(runs, out):
    """An HTML report with plots from run folders (distill, finetune or compare outputs). Prints the page's path."""
    click.echo(build_report(list(runs), out))


@app.command("verify")
@click.argument("cache")
@click.option("--repair", "repair_units", is_flag=True, help="Forget the damaged units, so the extract command recomputes them.")
def verify_command(cache, repair_units):
    """Read a whole cache and check every shard against its checksum. Exit 1 when anything is wrong."""
    problems = verify(cache)
    for problem in problems:
        click.echo(str(problem))
    if not problems:
        click.echo(f"ok: {cache}")
        return
    if repair_units:
        count = repair(cache, problems)
        click.echo(f"forgot {count} damaged units; re-run the extract command that made {cache} to recompute them")
    sys.exit(1)


@app.command("ls")
@click.option("--cache-dir", default=DEFAULT_CACHES, show_default=True)
def list_command(cache_dir):
    """The caches in a cache folder, one line each."""
    for row in list_caches(cache_dir):
        writing = f" (writing: {row['writing']})" if row["writing"] else ""
        state = "complete" if row["complete"] else f"incomplete{writing}"
        reading = f"  read by: {'; '.join(row['reading'])}" if row["reading"] else ""
        click.echo(f"{row['path']}  teacher={row['teacher']}  data={row['data']}  layers={row['layers']}  "
                   f"{row['states']}/{row['precision']}  {row['bytes_on_disk'] / 2**20:.1f}MiB  {state}{reading}")


@app.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def inspect(cache, as_json):
    """Everything about one cache: metadata, sizes, bytes per value, per-layer statistics."""

    info = inspect_cache(cache)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    for key, value in info.items():
        click.echo(f"{key}: {json.dumps(value, default=str) if isinstance(value, (dict, list)) else value}")


@app.command()
@click.argument("caches", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Remove a cache even while an extraction writes it or a run reads it.")
def rm(caches, force):
    """Delete caches (refused while an extraction writes one or a run reads it)."""
    for cache in caches:
        remove_cache(cache, force)
        click.echo(f"removed {cache}")


@app.command()
@click.option("--cache-dir", default=DEFAULT_CACHES, show_default=True)
def gc(cache_dir):
    """Delete the incomplete caches that no running extraction writes and no run reads."""
    for path in collect_garbage(cache_dir):
        click.echo(f"removed {path}")


@app.command()
@click.option("--profile", default="pairs", show_default=True, type=click.Choice(["pairs", "big"]),
              help="pairs: the --pairs below; big: a causal-LM teacher of about 1.2B parameters on a GPU "
                   "(SmolLM2-135M on a CPU) with tune trials per hour from the cache and live (its own sizes).")
@click.option("--pairs", default=["minilm,bert"], show_default=True, multiple=True,
              help="Which model pairs: minilm, bert; comma-separated or the flag repeated.")
@click.option("--steps", default=20, show_default=True, type=int, help="Timed steps per mode (first 3 are warm-up).")
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--examples", default=1024, show_default=True, type=int, help="Training examples in the cache.")
@click.option("--workdir", default=str(DEFAULT_CACHE_DIR / "bench"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per pair.")
def bench(profile, pairs, steps, batch_size, examples, workdir, as_json):
    """Distill step time and memory: student alone vs offline TED vs online TED, side by side."""
    if profile == "big":
        row = run_big(str(Path(workdir) / "big"))
        click.echo(json.dumps(row, indent=2) if as_json else big_table(row))
        return
    results = run_bench(workdir, tuple(p for joined in pairs for p in joined.split(",") if p), steps, batch_size, examples)
    click.echo(json.dumps(results, indent=2) if as_json else bench_table(results))


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
    if TASK[task].causal:

        demo_lm.run_lm_demo(workdir=workdir, size=demo_lm.FULL_LM_DEMO if full else demo_lm.QUICK_LM_DEMO, seed=seed)
        return

    run_demo(workdir=workdir, size=FULL_DEMO if full else QUICK_DEMO, seed=seed)


config_command(app, "extract", ExtractConfig)(extract_command)
config_command(app, "distill", DistillConfig)(distill_command)
config_command(app, "compare", CompareConfig, exclude=("base.method", "base.seed", "base.resume"))(compare_command)
config_command(app, "tune", TuneConfig, exclude=("base.method", "base.resume"))(tune_command)
config_command(app, "select", SelectConfig, exclude=("base.method", "base.seed", "base.resume"))(select_command)
config_command(app, "finetune", FinetuneConfig)(finetune_command)
config_command(app, "init-student", StudentConfig,
               exclude=("data.transfer", "data.eval", "data.test", "data.limit"))(init_student_command)


def _quiet_libraries() -> None:
    """Keep stderr for tedcache's own progress: no per-file bars or load reports from the libraries."""
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(args: list[str] | None = None) -> None:
    """Entry point: run the app on `args` (default: the command line); user errors print one line (no
    traceback) and exit 2."""
    _quiet_libraries()
    try:
        app.main(args=args, prog_name="tedcache", standalone_mode=False)
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
