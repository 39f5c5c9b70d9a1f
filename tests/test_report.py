"""compare (methods x seeds from one cache, resumable) and report (HTML + PNGs, every number from the runs)."""

from __future__ import annotations

import html
import json
import re
import shutil
import statistics
import subprocess
from dataclasses import replace

import pytest
from helpers.commands import run_cli
from scipy import stats as scipy_stats

from tedcache import DataConfig, DistillConfig, ExtractConfig, OptimConfig, extract
from tedcache.config import CompareConfig
from tedcache.experiments.compare import compare
from tedcache.experiments.results import summarize
from tedcache.run_folder import find_runs

CHROMIUM = shutil.which("chromium-headless-shell") or shutil.which("chromium")


@pytest.fixture(scope="module")
def compared(assets, tmp_path_factory):
    """finetune, kd, lwd and ted, two seeds each, on tiny models: filtered and raw caches."""
    root = tmp_path_factory.mktemp("compare")
    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], test=[str(assets["test"])])
    caches = {states: extract(ExtractConfig(teacher=str(assets["teacher"]), data=data, cache_dir=str(root / "c"),
                                            states=states, stage1=OptimConfig(epochs=1, batch_size=16)))
              for states in ("filtered", "raw")}
    base = DistillConfig(cache=caches["filtered"], student=str(assets["student"]), out=str(root / "runs"),
                         optim=OptimConfig(epochs=2, batch_size=16, lr=1e-3), log_every=1)
    cfg = CompareConfig(base=base, methods=["finetune", "kd", "lwd", "ted"], seeds=[1, 2], raw_cache=caches["raw"])
    return cfg, compare(cfg, log=lambda *_: None), root


def test_compare_summarises_every_method_over_seeds(compared):
    cfg, summary, root = compared
    rows = {row["method"]: row for row in summary["rows"]}
    assert set(rows) == {"finetune", "kd", "lwd", "ted"}
    for method, row in rows.items():
        tests = [json.loads((root / "runs" / f"{method}-seed{s}" / "metrics.json").read_text())["test"]["accuracy"]
                 for s in (1, 2)]
        assert row["seeds"] == [1, 2]
        assert row["test_mean"] == pytest.approx(statistics.mean(tests))
        assert row["test_std"] == pytest.approx(statistics.stdev(tests))
        assert row["share_of_teacher"] == pytest.approx(row["test_mean"] / summary["teacher"])
    lwd = json.loads((root / "runs" / "lwd-seed1" / "metrics.json").read_text())
    assert lwd["cache"] == cfg.raw_cache and "mse/0" in lwd["history"][-1]
    assert json.loads((root / "runs" / "compare.json").read_text())["rows"] == summary["rows"]


def test_compare_keeps_finished_runs(compared):
    cfg, _, root = compared
    before = {p: p.stat().st_mtime_ns for p in (root / "runs").glob("*/metrics.json")}
    messages = []
    compare(cfg, log=messages.append)
    assert sum("done earlier" in m for m in messages) == 8
    assert {p: p.stat().st_mtime_ns for p in (root / "runs").glob("*/metrics.json")} == before


def test_compare_refuses_lwd_without_a_raw_cache(compared, tmp_path):
    cfg, _, _ = compared
    result = run_cli("compare", "--cache", cfg.base.cache, "--student", cfg.base.student, "--out", tmp_path / "x",
                     "--methods", "kd,lwd")
    assert result.returncode == 2 and "--raw-cache" in result.stderr and "Traceback" not in result.stderr


def test_variants_get_their_own_rows_and_paired_comparisons(compared, tmp_path):
    """Two compare folders that differ only in the layer map: two ted rows, not one of four seeds."""
    cfg, _, root = compared
    variant = CompareConfig(base=replace(cfg.base, out=str(tmp_path / "map"), layer_map="0:0,1:3"),
                            methods=["kd", "ted"], seeds=[1, 2])
    compare(variant, log=lambda *_: None)
    summary = summarize(find_runs([str(root / "runs"), str(tmp_path / "map")]))
    labels = [row["label"] for row in summary["rows"]]
    assert labels == ["ted (layer_map=0:0,1:3)", "ted (layer_map=auto)", "lwd", "kd", "finetune"]
    assert all(row["seeds"] == [1, 2] for row in summary["rows"])
    kd = summary["rows"][3]
    assert len(kd["runs"]) == 4  # kd does not read the layer map: the two folders' kd runs are one variant
    pair = next(c for c in summary["comparisons"] if c["a"] == labels[0] and c["b"] == labels[1])
    tests = {row["label"]: row for row in summary["rows"]}
    assert pair["by_seed"]["mean"] == pytest.approx(tests[labels[0]]["test_mean"] - tests[labels[1]]["test_mean"])
    assert pair["by_example"]["n"] == 32 and pair["seeds"] == [1, 2]
    assert ("beats" in pair["verdict"]) != ("not resolved" in pair["verdict"])


def _page_numbers(page: str) -> list[str]:
    text = re.sub(r'src="data:[^"]*"', "", page)
    text = html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<style>.*?</style>", "", text, flags=re.S)))
    text = re.sub(r"\S*/\S*", " ", text)  # paths (folder names hold seeds, hashes)
    return re.findall(r"(?<![\w.-])-?\d+(?:\.\d+)?", text)


def test_report_numbers_all_come_from_the_run_folders(compared, tmp_path):
    _, _, root = compared
    result = run_cli("report", root / "runs", "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "report" / "index.html").read_text()
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert "methods.png" in pngs and "eval.png" in pngs and "curves-ted-seed1.png" in pngs and "paired.png" in pngs
    assert page.count("data:image/png;base64,") == len(pngs)  # self-contained: every plot embedded

    # every number the page shows, recomputed here from the metrics.json files
    allowed = set()
    runs = [json.loads(p.read_text()) for p in sorted((root / "runs").glob("*/metrics.json"))]
    teacher = statistics.mean(r["teacher"]["test"]["accuracy"] for r in runs)
    allowed |= {f"{teacher:.4f}", "100"}
    for method in ("finetune", "kd", "lwd", "ted"):
        group = [r for r in runs if r["method"] == method]
        tests = [r["test"]["accuracy"] for r in group]
        valid = [r["best"]["accuracy"] for r in group]
        allowed |= {f"{statistics.mean(tests):.4f}", f"{statistics.stdev(tests):.4f}",
                    f"{statistics.mean(valid):.4f}", f"{100 * statistics.mean(tests) / teacher:.1f}"}
    for r in runs:
        allowed |= {str(r["config"]["seed"]), f"{r['best']['accuracy']:.4f}", f"{r['test']['accuracy']:.4f}",
                    f"{r['cache_bytes'] / 2**20:.1f}", f"{r['seconds']:.0f}"}
    allowed |= {str(len(runs)), "1", "2", "95"}  # "8 runs", the seed lists "1,2", "95% interval"
    # paired comparisons: the seed intervals recomputed here (mean ± t * sd / sqrt(n)); the bootstrap's
    # bounds and the verdicts' counts are read from summary.json (tests/test_stats.py checks both)
    by = {(r["method"], r["config"]["seed"]): r["test"]["accuracy"] for r in runs}
    order = ("ted", "lwd", "kd", "finetune")
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            d = [by[a, s] - by[b, s] for s in (1, 2)]
            half = scipy_stats.t.ppf(0.975, 1) * statistics.stdev(d) / 2 ** 0.5
            allowed |= {f"{abs(v):.4f}" for v in (statistics.mean(d), statistics.mean(d) - half,
                                                  statistics.mean(d) + half)}
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert len(summary["comparisons"]) == 6
    for c in summary["comparisons"]:
        e = c["by_example"]
        allowed |= {f"{abs(v):.4f}" for v in (e["mean"], e["low"], e["high"])}
        allowed |= set(re.findall(r"\d+", c["verdict"]))
    shown = _page_numbers(page)
    assert len(shown) > 40
    assert not [n for n in shown if n not in allowed]


@pytest.mark.process
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium-headless-shell (make test installs it as root)")
def test_report_renders_in_a_browser(compared, tmp_path):
    _, _, root = compared
    page = run_cli("report", root / "runs", "--out", tmp_path / "report").stdout.strip().splitlines()[-1]
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,1600", f"file://{page}"], capture_output=True, timeout=120, check=True)
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1200, 1600)
    histogram = image.histogram()
    dark = sum(histogram[:128]) / sum(histogram)
    assert 0.005 < dark < 0.5  # text, tables and plots drawn on a white page (a blank or broken page fails)
    assert len(set(image.getdata())) > 20  # plot colours and anti-aliased text, not a single flat colour


def test_demo_prints_the_studys_paired_intervals(compared, tmp_path, monkeypatch):
    """The demos' note under a one-seed table: the shipped summary's intervals when the study has the
    setting, and that it has not finished otherwise."""
    from tedcache.demos import evidence

    _, summary, _ = compared
    monkeypatch.setattr(evidence, "SUMMARY", tmp_path / "evidence.json")
    assert "has not finished yet" in "\n".join(evidence.study_lines("A", seeds_here=1))
    evidence.SUMMARY.write_text(json.dumps({"A": evidence.compact(summary, "the demo pair", {})}, default=str))
    lines = evidence.study_lines("A", seeds_here=1)
    ted_kd = next(c for c in summary["comparisons"] if (c["a"], c["b"]) == ("ted", "kd"))
    row = next(line for line in lines if line.startswith("| ted − kd |"))
    assert f"{ted_kd['by_seed']['mean']:+.4f} [{ted_kd['by_seed']['low']:+.4f}" in row and ted_kd["verdict"] in row
    assert lines[0].startswith("Seeds behind each row above: 1") and "paired seeds" in "\n".join(lines)
    assert "not tuned" in lines[1]  # no tuning results shipped with the setting (the study's LM scenario)
    tuned = {"kd": {"best_validation": 0.77, "params": {"optim.lr": 3.3e-4}}}
    evidence.SUMMARY.write_text(json.dumps({"A": evidence.compact(summary, "the demo pair", tuned)}, default=str))
    assert "each method tuned on validation with the same budget" in evidence.study_lines("A", seeds_here=1)[1]
    assert not any(line.startswith("- ") for line in lines)  # no other setting has finished

    evidence.SUMMARY.write_text(json.dumps({"A": evidence.compact(summary, "the demo pair", {}),
                                            "C": evidence.compact(summary, "an independent student", {})}, default=str))
    others = [line for line in evidence.study_lines("A", seeds_here=1) if line.startswith("- ")]
    assert others == [f"- C (an independent student): ted − kd in {summary['metric']} {ted_kd['by_seed']['mean']:+.4f} "
                      f"[{ted_kd['by_seed']['low']:+.4f}, {ted_kd['by_seed']['high']:+.4f}] over "
                      f"{len(ted_kd['seeds'])} seeds, {ted_kd['verdict']}"]


def test_per_example_intervals_in_another_unit_get_their_own_panel(compared):
    """causal-lm: the bootstrap over test blocks is in nats of loss, the seeds' interval in perplexity; one
    axis for both would draw the nats as dots at zero."""
    from tedcache.experiments.report import paired_plot

    _, summary, _ = compared
    in_nats = {**summary, "comparisons": [{**c, "by_example": {**c["by_example"], "unit": "loss (nats)"}}
                                          for c in summary["comparisons"]]}

    def width(png: bytes) -> int:
        return int.from_bytes(png[16:20], "big")  # the PNG header's IHDR width

    assert all(c["by_example"]["unit"] is None for c in summary["comparisons"])
    assert width(paired_plot(in_nats)) == 2 * width(paired_plot(summary))


def test_demo_runs_each_method_with_the_studys_tuned_configuration(tmp_path, monkeypatch):
    """The demo's students take the study's best configuration per method (dotted names reach optim);
    a method or setting the study has not tuned keeps the demo's base settings."""
    from tedcache.config import DistillConfig, OptimConfig
    from tedcache.demos import evidence
    from tedcache.experiments.tune import apply

    monkeypatch.setattr(evidence, "SUMMARY", tmp_path / "evidence.json")
    assert evidence.tuned_params("A", "ted") == {}
    tuned = {"ted": {"best_validation": 0.77, "params": {"optim.lr": 2.6e-4, "kl_alpha": 0.5, "mse_alpha": 7.7}}}
    evidence.SUMMARY.write_text(json.dumps({"A": {"title": "the demo pair", "metric": "accuracy",
                                                  "comparisons": [], "tuned": tuned}}))
    base = DistillConfig(cache="c", student="s", out="o", optim=OptimConfig(epochs=3, lr=1e-4, batch_size=32))
    run = apply(base, evidence.tuned_params("A", "ted"))
    assert (run.optim.lr, run.kl_alpha, run.mse_alpha, run.optim.epochs) == (2.6e-4, 0.5, 7.7, 3)
    assert evidence.describe(evidence.tuned_params("A", "ted")) == "optim.lr 0.00026, kl_alpha 0.5, mse_alpha 7.7"
    assert evidence.tuned_params("A", "kd") == {} and evidence.tuned_params("C", "ted") == {}
