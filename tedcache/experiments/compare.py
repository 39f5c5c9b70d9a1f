"""`tedcache compare`: several methods over several seeds from one cache, one run folder each, then the
mean ± std of each method's test metric. Finished runs are kept and a run cut off mid-way continues from
its checkpoint, so an interrupted compare resumes."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from ..config import CompareConfig, DistillConfig, check_methods, what_it_computes
from ..configfile import CONFIG_FILE, config_yaml
from ..distillation import distill
from ..errors import TedcacheError, note
from ..run_folder import METRICS_FILE, find_runs
from .results import COMPARE_FILE, format_comparisons, methods_table, summarize


def run_config(cfg: CompareConfig, method: str, seed: int) -> DistillConfig:
    """The distill configuration of one (method, seed) run."""
    base = cfg.base
    out = Path(base.out) / f"{method}-seed{seed}"
    return replace(base, method=method, out=str(out), cache=cfg.raw_cache if method == "lwd" else base.cache,
                   resume=Path(f"{out}.checkpoint").exists(), seed=seed)  # a run cut off mid-way continues


def run_done(run: DistillConfig) -> bool:
    """A run folder counts as done when it holds the metrics of exactly this configuration."""
    path = Path(run.out) / METRICS_FILE
    if not path.is_file():
        return False
    requested = json.loads(path.read_text()).get("requested") or {}
    return what_it_computes(requested) == what_it_computes(json.loads(json.dumps(asdict(run))))


def compare(cfg: CompareConfig, log=None) -> dict:
    """Run every (method, seed) not already done; write and return the summary (see results.summarize)."""
    log = log or note
    check_methods(cfg.methods, cfg.raw_cache)
    if not cfg.seeds:
        raise TedcacheError("--seeds is empty; give at least one seed, e.g. --seeds 1,2,3")
    runs = [run_config(cfg, method, seed) for method in cfg.methods for seed in cfg.seeds]
    Path(cfg.base.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.base.out) / CONFIG_FILE).write_text(config_yaml(cfg))
    for number, run in enumerate(runs, 1):
        if run_done(run):
            log(f"[{number}/{len(runs)}] {run.method} seed {run.seed}: done earlier, kept ({run.out})")
            continue
        log(f"[{number}/{len(runs)}] {run.method} seed {run.seed}")
        distill(run, log)
    summary = {**summarize(find_runs([r.out for r in runs])), "config": asdict(cfg)}
    (Path(cfg.base.out) / COMPARE_FILE).write_text(json.dumps(summary, indent=2))
    print(methods_table(summary) + "\n\n" + format_comparisons(summary))
    return summary
