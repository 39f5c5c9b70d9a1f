"""Reading run folders (each holds the metrics.json that distill or finetune wrote) and summarising them:
one row per method (and per cache, when several were used) with the mean and spread over seeds."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import TedcacheError
from .evaluate import PRIMARY_METRIC

COMPARE_FILE = "compare.json"


@dataclass
class Run:
    """One training run as recorded in its folder."""

    folder: Path
    metrics: dict

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def method(self) -> str:
        return self.metrics["method"]

    @property
    def task(self) -> str:
        return self.metrics["task"]

    @property
    def metric(self) -> str:
        return PRIMARY_METRIC[self.task]

    @property
    def seed(self) -> int:
        config = self.metrics["config"]
        return config["seed"] if "seed" in config else config["train"]["seed"]  # run folders before 0.2 kept it there

    @property
    def cache(self) -> str | None:
        return self.metrics.get("cache")

    @property
    def cache_mib(self) -> float | None:
        size = self.metrics.get("cache_bytes")
        return None if size is None else size / 2**20

    def test(self) -> float | None:
        return (self.metrics.get("test") or {}).get(self.metric)

    def validation(self) -> float | None:
        return (self.metrics.get("best") or {}).get(self.metric)

    def teacher_test(self) -> float | None:
        return ((self.metrics.get("teacher") or {}).get("test") or {}).get(self.metric)


def find_runs(paths: list[str]) -> list[Run]:
    """The runs named by `paths`: run folders, or folders holding run folders (such as a compare folder)."""
    runs = []
    for path in map(Path, paths):
        if (path / "metrics.json").is_file():
            runs.append(Run(path, json.loads((path / "metrics.json").read_text())))
        elif path.is_dir() and (inner := sorted(p.parent for p in path.glob("*/metrics.json"))):
            runs.extend(Run(p, json.loads((p / "metrics.json").read_text())) for p in inner)
        else:
            raise TedcacheError(f"{path} is not a run folder (no metrics.json in it or in its sub-folders); "
                                "pass folders written by tedcache distill, finetune or compare")
    if len({r.task for r in runs}) > 1:
        raise TedcacheError(f"the runs mix tasks ({', '.join(sorted({r.task for r in runs}))}); report one task at a time")
    return runs


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


def summarize(runs: list[Run]) -> dict:
    """{"metric", "teacher": test metric or None, "rows": [...]}; a row per method (per method and cache
    when the runs used several caches): seeds, runs, test and validation mean/std, cache size, and the
    test mean as a share of the teacher's (higher-is-better metrics only)."""
    scored = [r for r in runs if r.test() is not None]
    if not scored:
        return {"metric": runs[0].metric if runs else None, "teacher": None, "rows": []}
    metric = scored[0].metric
    several_caches = varied_caches(scored)
    groups: dict[tuple, list[Run]] = {}
    for run in scored:
        groups.setdefault((run.method, run.cache if several_caches else None), []).append(run)
    teachers = [t for r in scored if (t := r.teacher_test()) is not None]
    teacher = mean_std(teachers)[0] if teachers else None
    rows = []
    for (method, cache), group in groups.items():
        test_mean, test_std = mean_std([r.test() for r in group])
        valid = [v for r in group if (v := r.validation()) is not None]
        row = {"method": method, "cache": cache, "cache_mib": group[0].cache_mib, "seeds": sorted(r.seed for r in group),
               "runs": [r.name for r in group], "test_mean": test_mean, "test_std": test_std,
               "validation_mean": mean_std(valid)[0] if valid else None,
               "validation_std": mean_std(valid)[1] if valid else None}
        if teacher and metric not in ("perplexity",):
            row["share_of_teacher"] = test_mean / teacher
        rows.append(row)
    return {"metric": metric, "teacher": teacher, "rows": rows}


def format_table(summary: dict) -> str:
    """The summary as a markdown table."""
    metric = summary["metric"]
    lines = [f"| model | seeds | test {metric} (mean ± std) | validation {metric} | share of teacher |",
             "|---|---|---|---|---|"]
    if summary["teacher"] is not None:
        lines.append(f"| teacher | - | {summary['teacher']:.4f} | - | 100% |")
    for row in summary["rows"]:
        name = row["method"] + (f" ({Path(row['cache']).name})" if row["cache"] else "")
        valid = "-" if row["validation_mean"] is None else f"{row['validation_mean']:.4f} ± {row['validation_std']:.4f}"
        share = f"{100 * row['share_of_teacher']:.1f}%" if "share_of_teacher" in row else "-"
        lines.append(f"| {name} | {len(row['seeds'])} | {row['test_mean']:.4f} ± {row['test_std']:.4f} | {valid} | {share} |")
    return "\n".join(lines)
