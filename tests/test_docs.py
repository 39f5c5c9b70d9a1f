"""The evidence study's figures are stated once: docs/evidence.md's decision table is the one
`evidence.py report` writes from tedcache/demos/evidence.json, and the intervals the README and the demos
print are that file's."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

from tedcache.demos import evidence

ROOT = Path(__file__).resolve().parent.parent
INTERVAL = re.compile(r"[-+]\d+\.\d+ \[[-+]\d+\.\d+, [-+]\d+\.\d+\]")


def _study():
    spec = importlib.util.spec_from_file_location("evidence_study", ROOT / "examples" / "evidence" / "evidence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def _shipped_intervals() -> set[str]:
    summaries = json.loads(evidence.SUMMARY.read_text())
    return {evidence.format_interval(c["by_seed"]) for found in summaries.values() for c in found["comparisons"]}


def test_the_decision_table_in_the_docs_is_the_one_report_writes_from_the_shipped_summary():
    study = _study()
    lines = study.decision_lines(json.loads(evidence.SUMMARY.read_text()))
    page = (ROOT / "docs" / "evidence.md").read_text()
    block = page.split(study.DECISION_START, 1)[1].split(study.DECISION_END, 1)[0]
    assert block.strip().splitlines() == lines
    assert (ROOT / "docs" / "evidence" / "decision.md").read_text().splitlines() == lines
    assert {cell for line in lines for cell in INTERVAL.findall(line)} <= _shipped_intervals()


def test_the_study_intervals_the_readme_and_the_demos_print_are_the_shipped_ones():
    shipped = _shipped_intervals()
    readme = INTERVAL.findall((ROOT / "README.md").read_text())
    assert set(readme) <= shipped, set(readme) - shipped
    for setting, found in json.loads(evidence.SUMMARY.read_text()).items():
        printed = "\n".join(evidence.study_lines(setting, 1))
        for comparison in found["comparisons"]:
            assert evidence.format_interval(comparison["by_seed"]) in printed
        assert set(INTERVAL.findall(printed)) <= shipped
