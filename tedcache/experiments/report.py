"""`tedcache report`: one self-contained HTML page (plots embedded) plus the same plots as PNG files,
built only from what the run folders recorded in their metrics.json."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from ..errors import TedcacheError
from ..run_folder import Run, find_runs
from .results import COMPARISON_HEADER, SELECT_FILE, comparison_rows, summarize, varied_caches

CURVE_PANELS = (("task", "task loss"), ("kl", "KL (T² scaled)"), ("mse/", "filtered MSE per layer"))


def fmt(value: float | None, digits: int = 4) -> str:
    """How every number appears on the page (the report test reads them back with the same rule)."""
    return "-" if value is None else f"{value:.{digits}f}"


def _figure(width: float, height: float, panels: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, panels, figsize=(width, height), squeeze=False)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def curves_plot(run: Run) -> bytes | None:
    """Task loss, KL and per-layer filtered MSE against the optimiser step, the terms this run had."""
    history = run.metrics.get("history") or []
    panels = [(prefix, title) for prefix, title in CURVE_PANELS
              if any(k == prefix or (prefix.endswith("/") and k.startswith(prefix)) for h in history for k in h)]
    if not panels:
        return None
    fig, axes = _figure(4.2 * len(panels), 3.0, len(panels))
    for ax, (prefix, title) in zip(axes[0], panels):
        keys = sorted({k for h in history for k in h if k == prefix or (prefix.endswith("/") and k.startswith(prefix))})
        for key in keys:
            points = [(h["step"], h[key]) for h in history if key in h]
            ax.plot(*zip(*points), label=f"layer {key.split('/')[1]}" if "/" in key else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(run.name, fontsize=10)
    return _png(fig)


def eval_plot(runs: list[Run]) -> bytes | None:
    """The validation metric at every evaluation (x: epochs), one line per run."""
    evaluated = [r for r in runs if r.metrics.get("eval")]
    if not evaluated:
        return None
    metric = evaluated[0].metric
    fig, axes = _figure(7.5, 4.0)
    ax = axes[0][0]
    for run in evaluated:
        points = [(e["epoch"], e[metric]) for e in run.metrics["eval"]]
        ax.plot(*zip(*points), marker="o", label=run.name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric}")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def methods_plot(summary: dict) -> bytes | None:
    """Test metric per method: mean with a ±std bar, the teacher as a dashed line."""
    rows = summary["rows"]
    if not rows:
        return None
    fig, axes = _figure(6.5, 3.6)
    ax = axes[0][0]
    labels = [row["label"].replace(" (", "\n(") for row in rows]
    ax.bar(labels, [r["test_mean"] for r in rows], yerr=[r["test_std"] for r in rows], capsize=4, color="#6a8fc7")
    if summary["teacher"] is not None:
        ax.axhline(summary["teacher"], color="k", linestyle="--", label="teacher")
        ax.legend(fontsize=8)
    low = min([r["test_mean"] - r["test_std"] for r in rows] + [summary["teacher"] or float("inf")])
    high = max([r["test_mean"] + r["test_std"] for r in rows] + [summary["teacher"] or float("-inf")])
    margin = max(1e-3, 0.15 * (high - low))
    ax.set_ylim(low - margin, high + margin)
    ax.set_ylabel(f"test {summary['metric']}")
    return _png(fig)


def paired_plot(summary: dict) -> bytes | None:
    """Each paired difference A − B with its 95% interval over seeds (and, where recorded, over test
    examples), against a line at zero: an interval that crosses it is not resolved. Per-example intervals in
    another unit than the metric (causal-lm: block loss in nats, not perplexity) get their own panel."""
    comparisons = summary.get("comparisons") or []
    if not comparisons:
        return None
    seeds, examples = ("by_seed", "#2a5caa", "over seeds"), ("by_example", "#d08020", "over test examples")
    unit = next((c["by_example"]["unit"] for c in comparisons if (c.get("by_example") or {}).get("unit")), None)
    panels = [(summary["metric"], [seeds, examples])] if unit is None else [(summary["metric"], [seeds]),
                                                                              (unit, [examples])]
    fig, axes = _figure(7.5 * len(panels), 0.9 + 0.5 * len(comparisons), len(panels))
    for ax, (measure, series) in zip(axes[0], panels):
        offsets = [0.12, -0.12] if len(series) == 2 else [0.0]
        for y, c in enumerate(reversed(comparisons)):
            for (key, colour, label), offset in zip(series, offsets):
                interval = c.get(key)
                if not interval or interval.get("low") is None:
                    continue
                ax.errorbar(interval["mean"], y + offset, capsize=3, fmt="o", color=colour,
                            label=label if y == 0 else None,
                            xerr=[[interval["mean"] - interval["low"]], [interval["high"] - interval["mean"]]])
        ax.axvline(0.0, color="k", linewidth=0.8)
        ax.set_yticks(range(len(comparisons)), [f"{c['a']} − {c['b']}" for c in reversed(comparisons)], fontsize=8)
        ax.set_xlabel(f"paired difference in test {measure} (95% interval)")
        ax.legend(fontsize=7, loc="best")
    return _png(fig)


def cache_plot(runs: list[Run]) -> bytes | None:
    """Cache size against the test metric, when a method was run from more than one cache."""
    scored = [r for r in runs if r.test() is not None and r.cache_mib is not None]
    if not varied_caches(scored):
        return None
    fig, axes = _figure(6.0, 3.6)
    ax = axes[0][0]
    for method in sorted({r.method for r in scored}):
        group = [r for r in scored if r.method == method]
        ax.scatter([r.cache_mib for r in group], [r.test() for r in group], label=method)
    ax.set_xlabel("cache size (MiB)")
    ax.set_ylabel(f"test {scored[0].metric}")
    ax.legend(fontsize=8)
    return _png(fig)


def _image(name: str, data: bytes, out: Path, alt: str) -> str:
    (out / name).write_bytes(data)
    encoded = base64.b64encode(data).decode()
    return f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}"><figcaption>{name}</figcaption></figure>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}
th{background:#eef}td:first-child,th:first-child{text-align:left}img{max-width:100%}
figure{margin:1em 0}figcaption{font-size:80%;color:#666}"""


def build_report(run_dirs: list[str], out: str) -> Path:
    """Write `out`/index.html (self-contained) and the plots as PNG files; returns the page's path."""
    selections = [json.loads((Path(d) / SELECT_FILE).read_text()) for d in run_dirs if (Path(d) / SELECT_FILE).is_file()]
    runs = find_runs([str(Path(d) / "runs") if (Path(d) / SELECT_FILE).is_file() else d for d in run_dirs])
    if not runs:
        raise TedcacheError("no runs to report; pass run folders written by tedcache distill or compare")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    metric = runs[0].metric
    sections = [f"<h1>tedcache report</h1><p>{len(runs)} runs, task {html.escape(runs[0].task)}, "
                f"metric {html.escape(metric)}.</p>"]

    if summary["rows"]:
        header = ["model", "seeds", f"test {metric} mean", "std", f"validation {metric} mean", "share of teacher"]
        rows = [["teacher", "-", fmt(summary["teacher"]), "-", "-", "-"]] if summary["teacher"] is not None else []
        for row in summary["rows"]:
            name = row["label"]
            share = fmt(100 * row["share_of_teacher"], 1) + "%" if "share_of_teacher" in row else "-"
            rows.append([name, ",".join(map(str, row["seeds"])), fmt(row["test_mean"]), fmt(row["test_std"]),
                         fmt(row["validation_mean"]), share])
        sections.append("<h2>Methods compared</h2>" + _table(header, rows))
        if (plot := methods_plot(summary)) is not None:
            sections.append(_image("methods.png", plot, out_dir, "test metric per method"))
    if summary["comparisons"]:
        sentences = "".join(f"<li>{html.escape(c['verdict'])}</li>" for c in summary["comparisons"])
        sections.append("<h2>Paired comparisons</h2><p>Differences A − B in the test metric over the seeds both ran "
                        "(Student's t), and a paired bootstrap over test examples (classification: accuracy; "
                        "causal-lm: block loss in nats). A difference is called only where both 95% intervals "
                        "exclude zero.</p>" + _table(COMPARISON_HEADER, comparison_rows(summary))
                        + f"<ul>{sentences}</ul>")
        if (plot := paired_plot(summary)) is not None:
            sections.append(_image("paired.png", plot, out_dir, "paired differences with 95% intervals"))
    for selection in selections:  # tedcache select's decision
        sections.append(f"<h2>Selection</h2><p>{html.escape(selection['reason'])}; best student copied from "
                        f"{html.escape(selection['best_run'])}.</p>")
    if (plot := cache_plot(runs)) is not None:
        sections.append("<h2>Cache size and accuracy</h2>" + _image("cache-size.png", plot, out_dir, "cache size"))

    run_rows = [[r.name, r.method, str(r.seed), fmt(r.validation()), fmt(r.test()),
                 fmt(r.cache_mib, 1), fmt(r.metrics.get("seconds"), 0)] for r in runs]
    sections.append("<h2>Runs</h2>" + _table(
        ["run", "method", "seed", f"best validation {metric}", f"test {metric}", "cache MiB", "seconds"], run_rows))
    if (plot := eval_plot(runs)) is not None:
        sections.append("<h2>Validation during training</h2>" + _image("eval.png", plot, out_dir, "validation"))
    sections.append("<h2>Training curves</h2>")
    for run in runs:
        if (plot := curves_plot(run)) is not None:
            sections.append(_image(f"curves-{run.name}.png", plot, out_dir, f"training curves of {run.name}"))
    sources = "".join(f"<li>{html.escape(str(r.folder.resolve()))}</li>" for r in runs)
    sections.append(f"<h2>Sources</h2><ul>{sources}</ul>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>tedcache report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    index = out_dir / "index.html"
    index.write_text(page)
    return index
