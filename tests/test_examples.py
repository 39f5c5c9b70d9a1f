"""The measurement scripts under examples/ are not run in CI (each takes minutes to hours), but each must at
least load against the current package: a module moved or renamed breaks them at import, as the layout move
once did to the evidence study's `extract`."""

import runpy
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parent.parent / "examples").rglob("*.py"))


def test_there_are_scripts_to_check():
    assert len(SCRIPTS) >= 5


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_example_script_loads(script):
    names = runpy.run_path(str(script), run_name="loaded_by_test")  # not "__main__": nothing runs
    assert "main" in names or any(callable(v) for k, v in names.items() if not k.startswith("_"))
