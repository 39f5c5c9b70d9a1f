"""What the evidence study (examples/evidence/evidence.py, docs/evidence.md) measured, as the demos print it beside
their own one-seed tables: a one-seed table ranks nothing, the study's paired seeds do.

`examples/evidence/evidence.py report` writes the summary this module reads (tedcache/demos/evidence.json, shipped with
the package): per setting the seeds, each method's test metric as mean and spread over them, and the
paired differences with their 95% intervals and verdicts."""

from __future__ import annotations

import json
from pathlib import Path

SUMMARY = Path(__file__).with_name("evidence.json")
COMPARISONS = [("ted", "kd"), ("ted", "lwd"), ("ted", "finetune"), ("kd", "finetune")]


def compact(summary: dict, title: str, tuned: dict) -> dict:
    """The part of a `tedcache.experiments.results.summarize` summary the demos print (kept small: it ships)."""
    comparisons = [{"a": c["a"], "b": c["b"], "seeds": len(c["seeds"]), "by_seed": c["by_seed"],
                    "verdict": c["verdict"]} for c in summary["comparisons"] if (c["a"], c["b"]) in COMPARISONS]
    comparisons.sort(key=lambda c: COMPARISONS.index((c["a"], c["b"])))
    return {"title": title, "metric": summary["metric"], "comparisons": comparisons, "tuned": tuned}


def load(setting: str) -> dict | None:
    """The study's summary of `setting`, or None where that setting has not finished."""
    if not SUMMARY.exists():
        return None
    return json.loads(SUMMARY.read_text()).get(setting)


def tuned_params(setting: str, method: str) -> dict:
    """The best configuration the study's tuner found for `method` in `setting` (DistillConfig names, dotted
    into optim as `tedcache.experiments.tune.apply` takes them), or {} where the study has none."""
    found = load(setting) or {}
    return dict(found.get("tuned", {}).get(method, {}).get("params", {}))


def describe(params: dict) -> str:
    """Tuned parameters as one short phrase ("optim.lr 0.00026, kl_alpha 0.509")."""
    return ", ".join(f"{name} {value:.3g}" for name, value in params.items())


def study_lines(setting: str, seeds_here: int) -> list[str]:
    """Lines to print under a demo's table: how many seeds stand behind its rows, and the study's paired
    intervals for the same comparison, or that the study has not finished it."""
    here = f"Seeds behind each row above: {seeds_here}. One seed ranks nothing (seed-to-seed spread is of the " \
           "size of the differences between methods)."
    found = load(setting)
    if found is None:
        return [here, f"The evidence study's setting {setting} (docs/evidence.md) has not finished yet, so there is "
                      "no paired interval to show; run `tedcache compare` over several seeds for one."]
    how = "each method tuned on validation with the same budget" if found.get("tuned") else \
        "every method with the same fixed settings, not tuned"
    lines = [here, f"The evidence study, setting {setting} ({found['title']}; {how}; docs/evidence.md), paired "
                   f"test differences in {found['metric']}:", "",
             "| A − B | paired seeds | mean [95% interval over seeds] | verdict |", "|---|---|---|---|"]
    for c in found["comparisons"]:
        lines.append(f"| {c['a']} − {c['b']} | {c['seeds']} | {format_interval(c['by_seed'])} | {c['verdict']} |")
    return lines + across_settings(setting)


def across_settings(shown: str) -> list[str]:
    """One line per other finished setting of the study: its TED − KD interval and verdict, so a demo that can
    afford one setting still says what the others found."""
    summaries = json.loads(SUMMARY.read_text()) if SUMMARY.exists() else {}
    others = []
    for name, found in summaries.items():
        ted_kd = next((c for c in found["comparisons"] if (c["a"], c["b"]) == ("ted", "kd")), None)
        if name == shown or ted_kd is None or ted_kd["by_seed"].get("low") is None:
            continue
        others.append(f"- {name} ({found['title']}): ted − kd in {found['metric']} {format_interval(ted_kd['by_seed'])} "
                      f"over {ted_kd['seeds']} seeds, {ted_kd['verdict']}")
    if not others:
        return []
    return ["", "The study's other settings (docs/evidence.md):", *others]


def format_interval(interval: dict | None) -> str:
    """A paired difference as "+0.0123 [-0.0010, +0.0256]" (mean [95% interval]), or "-" where none was computed."""
    if not interval or interval.get("low") is None:
        return "-"
    return f"{interval['mean']:+.4f} [{interval['low']:+.4f}, {interval['high']:+.4f}]"
