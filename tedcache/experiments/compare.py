"""`tedcache compare`: several methods over several seeds from one cache, one run folder each, then the
mean ± std of each method's test metric. The runs go in blocks, one per seed with every method in it
(run_blocks, which select and the evidence study share): a paired difference then compares runs that read
the same targets, and an interrupted compare resumes block by block, a run cut off mid-way from its
checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from ..cache import load_metadata
from ..config import CompareConfig, DistillConfig, check_methods, what_it_computes
from ..configfile import CONFIG_FILE, config_yaml
from ..distillation import distill
from ..errors import TedcacheError, note
from ..run_folder import METRICS_FILE, cache_read, find_runs
from .results import COMPARE_FILE, format_comparisons, methods_table, summarize
from .same_teacher import check_same_teacher


def method_settings(cfg: CompareConfig) -> dict[str, DistillConfig]:
    """Each method's settings: the shared ones with the method set (lwd reading the raw-state cache)."""
    return {method: replace(cfg.base, method=method, cache=cfg.raw_cache if method == "lwd" else cfg.base.cache)
            for method in cfg.methods}


def run_config(settings: DistillConfig, out: Path, seed: int) -> DistillConfig:
    """The distill configuration of one (method, seed) run in `out`."""
    folder = out / f"{settings.method}-seed{seed}"
    return replace(settings, out=str(folder), seed=seed,
                   resume=Path(f"{folder}.checkpoint").exists())  # a run cut off mid-way continues


def _settings(config: dict) -> dict:
    """What a run trains, less the cache's path (a rebuilt cache of the same recipe has another)."""
    return {k: v for k, v in what_it_computes(json.loads(json.dumps(config))).items() if k != "cache"}


def run_done(run: DistillConfig) -> bool:
    """A run folder counts as done when it holds the metrics of these settings on a cache of the same
    recipe (a rebuild of the same teacher: same_teacher checks it once per folder of runs)."""
    path = Path(run.out) / METRICS_FILE
    if not path.is_file():
        return False
    metrics = json.loads(path.read_text())
    if _settings(metrics.get("requested") or {}) != _settings(asdict(run)):
        return False
    meta = load_metadata(run.cache)
    return cache_read(metrics)[0] in (meta.recipe_key, meta.content_key)


def _other_build(block: list[DistillConfig]) -> set[str]:
    """The done runs of a block to run again: none when every run is done and all read caches of one teacher
    build (one teacher's bits, one content per recipe); otherwise those that read other caches than these."""
    done = {run.out: cache_read(json.loads((Path(run.out) / METRICS_FILE).read_text())) for run in block if run_done(run)}
    contents: dict[str, set] = {}
    for recipe, content, _ in done.values():
        contents.setdefault(recipe, set()).add(content)
    one_build = len({weights for *_, weights in done.values()}) <= 1 and all(len(c) == 1 for c in contents.values())
    if len(done) == len(block) and one_build:
        return set()
    current = {run.out: load_metadata(run.cache).content_key for run in block}
    return {out for out, (_, content, _) in done.items() if content != current[out]}


def run_blocks(settings: dict[str, DistillConfig], seeds: list[int], out: Path, log) -> list[str]:
    """Run every method's settings on every seed into `out`, seed by seed: a block (one seed, every method)
    is the unit of resume. A finished block is kept; in an unfinished one, runs that read another build of
    the caches than this one (another machine's rebuild) run again, so every pair in a block read the same
    targets. Returns the run folders."""
    if not seeds:
        raise TedcacheError("--seeds is empty; give at least one seed, e.g. --seeds 1,2,3")
    for cache in dict.fromkeys(s.cache for s in settings.values()):
        check_same_teacher(out, cache, log)
    folders, total = [], len(settings) * len(seeds)
    for seed in seeds:
        block = [run_config(s, out, seed) for s in settings.values()]
        again = _other_build(block)
        for run in block:
            folders.append(run.out)
            where = f"[{len(folders)}/{total}] {run.method} seed {run.seed}"
            if run_done(run) and run.out not in again:
                log(f"{where}: done earlier, kept ({run.out})")
                continue
            log(where + (": run again, its block's other runs read this machine's caches" if run.out in again else ""))
            distill(run, log)
    return folders


def compare(cfg: CompareConfig, log=None) -> dict:
    """Run every (method, seed) not already done, in blocks; write and return the summary (results.summarize)."""
    log = log or note
    check_methods(cfg.methods, cfg.raw_cache)
    out = Path(cfg.base.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(config_yaml(cfg))
    folders = run_blocks(method_settings(cfg), cfg.seeds, out, log)
    summary = {**summarize(find_runs(folders)), "config": asdict(cfg)}
    (out / COMPARE_FILE).write_text(json.dumps(summary, indent=2))
    print(methods_table(summary) + "\n\n" + format_comparisons(summary))
    return summary
