"""tedcache select: tune each method with one budget, run each best configuration on paired seeds, name
the verdict (ties settled for the cheapest method, and said so), keep the best seed of the winner, resume
after an interruption, and render in report."""

from __future__ import annotations

import json

from helpers.commands import run_cli

from tedcache.experiments.selection import decide
from tedcache.run_folder import find_runs


def _summary(methods: list[str], better: dict[tuple[str, str], str | None]) -> dict:
    return {"rows": [{"method": m} for m in methods],
            "comparisons": [{"a": a, "b": b, "better": winner} for (a, b), winner in better.items()]}


def test_the_winner_is_what_no_method_beats_and_a_tie_goes_to_the_cheapest():
    assert decide(_summary(["ted", "kd", "finetune"], {("ted", "kd"): "ted", ("ted", "finetune"): "ted",
                                                       ("kd", "finetune"): None}))[0] == "ted"
    winner, reason = decide(_summary(["ted", "kd", "finetune"], {("ted", "kd"): None, ("ted", "finetune"): "ted",
                                                                 ("kd", "finetune"): "kd"}))
    assert winner == "kd" and "not resolved between ted, kd" in reason and "cheapest" in reason
    assert decide(_summary(["ted", "kd"], {("ted", "kd"): "kd"}))[0] == "kd"


def test_select_tunes_runs_judges_keeps_the_best_seed_and_resumes(assets, labelled_cache, tmp_path):
    args = ["select", "--cache", labelled_cache, "--student", assets["student"], "--out", tmp_path / "select",
            "--methods", "kd,finetune", "--trials", "2", "--seeds", "1,2", "--batch-size", "16", "--stage1-epochs", "1",
            "--stage1-batch-size", "16", "--max-steps", "6"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    result = json.loads((tmp_path / "select" / "select.json").read_text())
    assert result["winner"] in ("kd", "finetune") and result["config"]["trials"] == 2
    assert "| A − B |" in first.stdout and result["reason"] in first.stdout
    runs = find_runs([str(tmp_path / "select" / "runs")])
    assert sorted((r.method, r.seed) for r in runs) == [("finetune", 1), ("finetune", 2), ("kd", 1), ("kd", 2)]
    tune_trials = {m: r["finished"] for m, r in result["tune"]["methods"].items()}
    assert tune_trials == {"kd": 2, "finetune": 2}
    mine = [r for r in runs if r.method == result["winner"]]
    best = max(mine, key=lambda r: r.validation())
    kept = find_runs([str(tmp_path / "select" / "best")])[0]
    assert kept.metrics["best"] == best.metrics["best"] and (tmp_path / "select" / "best" / "config.yaml").is_file()
    assert (tmp_path / "select" / "best" / "model.safetensors").is_file()

    again = run_cli(*args)  # everything was done: kept, nothing retrained
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("done earlier, kept") == 4
    assert json.loads((tmp_path / "select" / "select.json").read_text())["winner"] == result["winner"]
    report = run_cli("report", tmp_path / "select", "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr
    assert result["reason"].split(":")[0] in (tmp_path / "report" / "index.html").read_text()
