"""`tedcache select`: from a cache to the best student in one command. Each method is tuned with the same
budget on the validation split (tune), each best configuration runs on the same seeds (compare's runs),
the paired verdicts are read, and the winner's best seed by validation is copied to OUT/best. A method
wins only where the intervals say so; a tie is named and settled by cost, never by a coin. Every step
keeps what it finished, so re-running the command resumes it."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from ..config import DistillConfig, SelectConfig, TuneConfig
from ..configfile import read_config_file, resolve
from ..errors import note
from ..run_folder import find_runs
from ..tasks import LOWER_IS_BETTER
from .compare import run_blocks
from .results import SELECT_FILE, format_comparisons, methods_table, summarize
from .tune import tune

COST_ORDER = ("finetune", "kd", "lwd", "ted")  # cheapest first: no targets; logits; states too; states and Stage I


def select(cfg: SelectConfig, log=None) -> dict:
    """Tune, run, judge and keep the winner; write OUT/select.json and return its content."""
    log = log or note
    out = Path(cfg.base.out)
    tuned = tune(TuneConfig(base=replace(cfg.base, out=str(out / "tune")), methods=cfg.methods, trials=cfg.trials,
                            pruner=cfg.pruner, raw_cache=cfg.raw_cache), log)
    best = {method: resolve(DistillConfig, read_config_file(tuned["methods"][method]["config"]))
            for method in cfg.methods}  # (lwd's reads the raw-state cache, as its trials did)
    runs = run_blocks(best, cfg.seeds, out / "runs", log)
    summary = summarize(find_runs(runs))
    winner, reason = decide(summary)
    chosen = _best_seed(summary, winner)
    if (out / "best").exists():
        shutil.rmtree(out / "best")
    shutil.copytree(chosen, out / "best")
    result = {"winner": winner, "reason": reason, "best_run": str(chosen), "tune": tuned, "summary": summary,
              "config": asdict(cfg)}
    (out / SELECT_FILE).write_text(json.dumps(result, indent=2))
    print(methods_table(summary) + "\n\n" + format_comparisons(summary) + f"\n\n{reason}\nbest student: {out / 'best'} "
          f"(copied from {chosen})")
    return result


def decide(summary: dict) -> tuple[str, str]:
    """The winning method and why: the one method no other beats, where the paired verdicts single one out;
    among several that none beats (a tie: no interval excludes zero between them), the cheapest."""
    methods = [row["method"] for row in summary["rows"]]
    beaten = {c["b"] if c["better"] == c["a"] else c["a"] for c in summary["comparisons"] if c["better"]}
    top = [m for m in methods if m not in beaten]
    if len(top) == 1:
        others = [m for m in methods if m != top[0]]
        return top[0], (f"{top[0]} wins: no other method beats it, and it beats or ties {', '.join(others)}"
                        if others else f"{top[0]} is the only method")
    cheapest = min(top, key=lambda m: COST_ORDER.index(m) if m in COST_ORDER else len(COST_ORDER))
    return cheapest, (f"not resolved between {', '.join(top)} (no paired interval excludes zero between them); "
                      f"picked {cheapest}, the cheapest of them to train")


def _best_seed(summary: dict, method: str) -> Path:
    """The winner's run with the best validation score."""
    row = next(r for r in summary["rows"] if r["method"] == method)
    pick = min if summary["metric"] in LOWER_IS_BETTER else max
    return pick(find_runs(row["runs"]), key=lambda r: r.validation()).folder
