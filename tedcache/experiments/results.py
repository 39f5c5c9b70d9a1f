"""Reading run folders (each holds the metrics.json that distill or finetune wrote) and summarising them:
one row per method (and per cache, when several were used) with the mean and spread over seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..run_folder import Run, cache_read

COMPARE_FILE = "compare.json"
SELECT_FILE = "select.json"  # tedcache select's decision, beside its runs/ and best/


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def varied_caches(runs: list[Run]) -> bool:
    """Whether some method was run from more than one cache (then caches are compared, not only methods)."""
    caches: dict[str, set] = {}
    for run in runs:
        caches.setdefault(run.method, set()).add(run.cache)
    return any(len(c) > 1 for c in caches.values())


# Settings that say how a run was carried out, not what it trains (online mode computes the same targets).
HOW_NOT_WHAT = {"seed", "out", "resume", "checkpoint_every", "workers", "verify", "log_every", "device", "teacher",
                "reuse_stage1"}
# Settings a method does not read (a KD run's mse_alpha, layer map, ... change nothing).
UNUSED_BY = {"finetune": {"kl_alpha", "mse_alpha", "temperature", "kd_targets", "layer_map", "student_layers",
                          "finetune_first", "stage1"},
             "kd": {"mse_alpha", "layer_map", "student_layers", "finetune_first", "stage1"},
             "lwd": {"finetune_first", "stage1"}}
METHOD_ORDER = ("ted", "lwd", "kd", "finetune")  # comparisons read "ted - kd", "kd - finetune", ...


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "data":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def definition(run: Run) -> dict:
    """Everything that defines what a run trains, less its seed: runs with equal definitions are seeds
    of one variant."""
    config = _flatten(run.metrics.get("requested") or run.metrics["config"])
    if "cache" in run.metrics:  # a rebuild of the same cache (another machine) is the same variant
        config["cache"] = cache_read(run.metrics)[0]
    unused = UNUSED_BY.get(run.method, set())
    return {k: v for k, v in config.items()
            if k not in HOW_NOT_WHAT and k.split(".")[0] not in unused and k != "method"}


def _label(method: str, settings: dict) -> str:
    shown = [f"{k}={Path(v).name if k == 'cache' else v}" for k, v in settings.items()]
    return method + (f" ({', '.join(shown)})" if shown else "")


def group_runs(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """Runs grouped by method and definition, each group labelled by its method and the settings in which
    it differs from other groups of the same method (e.g. "ted (layer_map=0:4,1:5)")."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        key = (run.method, json.dumps(definition(run), sort_keys=True, default=str))
        groups.setdefault(key, []).append(run)
    labelled = []
    for (method, key), group in groups.items():
        siblings = [json.loads(k) for m, k in groups if m == method]
        mine = json.loads(key)
        varying = {k: mine.get(k) for k in sorted(set().union(*siblings))
                   if len({json.dumps(s.get(k), default=str) for s in siblings}) > 1}
        labelled.append((_label(method, varying), group))
    return sorted(labelled, key=lambda item: (METHOD_ORDER.index(item[1][0].method)
                                               if item[1][0].method in METHOD_ORDER else 99, item[0]))


def compare_groups(a: list[Run], b: list[Run], label_a: str, label_b: str) -> dict | None:
    """The paired comparison of two groups over their common seeds (None without a common seed)."""
    from . import stats

    by_seed_a, by_seed_b = {r.seed: r for r in a}, {r.seed: r for r in b}
    seeds = sorted(set(by_seed_a) & set(by_seed_b))
    if not seeds:
        return None
    pairs = [(by_seed_a[s], by_seed_b[s]) for s in seeds]
    task, metric = a[0].task, a[0].metric
    by_seed = stats.seed_interval([x.test() - y.test() for x, y in pairs])
    outputs = [(x.test_outputs(), y.test_outputs()) for x, y in pairs]
    by_example = None
    if all(o is not None for pair in outputs for o in pair) and len({len(o["values"]) for p in outputs for o in p}) == 1:
        by_example = stats.example_interval([x for x, _ in outputs], [y for _, y in outputs], task,
                                            label_names=a[0].metrics.get("label_names"))
    return {"a": label_a, "b": label_b, "seeds": seeds, "metric": metric, "by_seed": by_seed,
            "by_example": by_example, "better": stats.better_of(label_a, label_b, by_seed, by_example, metric),
            "verdict": stats.verdict(label_a, label_b, by_seed, by_example, metric)}


def summarize(runs: list[Run]) -> dict:
    """{"metric", "teacher": test metric or None, "rows": [...], "comparisons": [...]}: a row per variant
    (see group_runs): seeds, runs, test and validation mean/std, cache size, and the test mean as a share
    of the teacher's (higher-is-better metrics only); a paired comparison for every two variants."""
    scored = [r for r in runs if r.test() is not None]
    if not scored:
        return {"metric": runs[0].metric if runs else None, "teacher": None, "rows": [], "comparisons": []}
    metric = scored[0].metric
    groups = group_runs(scored)
    teachers = [t for r in scored if (t := r.teacher_test()) is not None]
    teacher = mean_std(teachers)[0] if teachers else None
    rows = []
    for label, group in groups:
        runs_of = group
        group = list({r.seed: r for r in reversed(group)}.values())  # a variant run twice on a seed counts once
        test_mean, test_std = mean_std([r.test() for r in group])
        valid = [v for r in group if (v := r.validation()) is not None]
        row = {"label": label, "method": group[0].method, "cache": group[0].cache, "cache_mib": group[0].cache_mib,
               "seeds": sorted(r.seed for r in group), "runs": [str(r.folder) for r in runs_of],
               "test_mean": test_mean, "test_std": test_std,
               "validation_mean": mean_std(valid)[0] if valid else None,
               "validation_std": mean_std(valid)[1] if valid else None}
        if teacher and metric not in ("perplexity",):
            row["share_of_teacher"] = test_mean / teacher
        rows.append(row)
    comparisons = [c for i, (la, ga) in enumerate(groups) for lb, gb in groups[i + 1:]
                   if (c := compare_groups(ga, gb, la, lb)) is not None]
    return {"metric": metric, "teacher": teacher, "rows": rows, "comparisons": comparisons}


def methods_table(summary: dict) -> str:
    """The summary as a markdown table."""
    metric = summary["metric"]
    lines = [f"| model | seeds | test {metric} (mean ± std) | validation {metric} | share of teacher |",
             "|---|---|---|---|---|"]
    if summary["teacher"] is not None:
        lines.append(f"| teacher | - | {summary['teacher']:.4f} | - | 100% |")
    for row in summary["rows"]:
        name = row["label"]
        valid = "-" if row["validation_mean"] is None else f"{row['validation_mean']:.4f} ± {row['validation_std']:.4f}"
        share = f"{100 * row['share_of_teacher']:.1f}%" if "share_of_teacher" in row else "-"
        lines.append(f"| {name} | {len(row['seeds'])} | {row['test_mean']:.4f} ± {row['test_std']:.4f} | {valid} | {share} |")
    return "\n".join(lines)


def _interval(interval: dict | None, digits: int = 4) -> str:
    if not interval or interval["low"] is None:
        return "-"
    return f"{interval['mean']:+.{digits}f} [{interval['low']:+.{digits}f}, {interval['high']:+.{digits}f}]"


def comparison_rows(summary: dict) -> list[list[str]]:
    """Each paired comparison as table cells: A - B, seeds, seed interval, example interval, verdict."""
    rows = []
    for c in summary.get("comparisons", []):
        example = c["by_example"]
        unit = f" {example['unit']}" if example and example.get("unit") else ""
        rows.append([f"{c['a']} − {c['b']}", str(len(c["seeds"])), _interval(c["by_seed"]),
                     _interval(example) + unit, c["verdict"]])
    return rows


COMPARISON_HEADER = ["A − B", "paired seeds", "mean difference [95% interval over seeds]",
                     "per-example paired bootstrap [95%]", "verdict"]


def format_comparisons(summary: dict) -> str:
    """The paired comparisons as a markdown table."""
    lines = ["| " + " | ".join(COMPARISON_HEADER) + " |", "|" + "---|" * len(COMPARISON_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(summary)]
    return "\n".join(lines)
