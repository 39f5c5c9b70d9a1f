"""A teacher rebuilt from the same recipe on another machine differs in its last bits, so its caches have
other content keys. It is the same teacher when it predicts the same: tuning journals and finished runs
continue on its caches, and a block of final runs never pairs runs of two builds. A teacher made another
way (another learning rate), or one that predicts otherwise, is refused in one line."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from helpers.commands import run_cli
from transformers import AutoModelForSequenceClassification

from tedcache import (
    CompareConfig,
    DataConfig,
    DistillConfig,
    ExtractConfig,
    FinetuneConfig,
    OptimConfig,
    TuneConfig,
    compare,
    extract,
    finetune,
    tune,
)
from tedcache.cache import load_metadata
from tedcache.errors import TedcacheError
from tedcache.experiments.same_teacher import TEACHER_FILE
from tedcache.experiments.tune import STUDY_FILE


def _rebuilt(teacher, folder, change):
    """A copy of `teacher` (its metrics.json, so its recipe, kept) whose weights `change` alters."""
    shutil.copytree(teacher, folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(change(parameter))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teachers(assets, tmp_path_factory):
    """Caches of: a fine-tuned teacher; the same teacher one float step off in every weight (a rebuild on
    another CPU); one with the same recipe whose classifier was redrawn (it predicts otherwise); one
    fine-tuned with another learning rate."""
    root = tmp_path_factory.mktemp("rebuilt")
    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], test=[str(assets["test"])],
                      max_length=24)
    made = FinetuneConfig(model=str(assets["teacher"]), data=data, out=str(root / "teacher"),
                          optim=OptimConfig(epochs=2, lr=1e-3, batch_size=16))
    finetune(made, log=lambda *_: None)
    finetune(replace(made, out=str(root / "other-lr"), optim=replace(made.optim, lr=5e-4)), log=lambda *_: None)
    _rebuilt(root / "teacher", root / "last-bits", lambda p: torch.nextafter(p, torch.full_like(p, math.inf)))
    generator = torch.Generator().manual_seed(0)
    _rebuilt(root / "teacher", root / "redrawn", lambda p: p + 0.5 * torch.randn(p.shape, generator=generator))
    base = ExtractConfig(teacher="", data=data, cache_dir=str(root / "caches"), stage1=OptimConfig(epochs=1, batch_size=16))
    return {name: extract(replace(base, teacher=str(root / name))) for name in ("teacher", "last-bits", "redrawn",
                                                                                 "other-lr")}


def _base(assets, cache, out) -> DistillConfig:
    return DistillConfig(cache=cache, student=str(assets["student"]), out=str(out), seed=3,
                         optim=OptimConfig(batch_size=16), max_steps=6)


def test_caches_of_a_rebuilt_teacher_share_the_recipe_not_the_content(teachers):
    first, rebuilt, other = (load_metadata(teachers[n]) for n in ("teacher", "last-bits", "other-lr"))
    assert first.teacher_weights_sha256 != rebuilt.teacher_weights_sha256
    assert first.content_key != rebuilt.content_key and first.recipe_key == rebuilt.recipe_key
    assert first.teacher_recipe == rebuilt.teacher_recipe != other.teacher_recipe
    assert other.recipe_key != first.recipe_key


def test_a_tuning_journal_continues_on_a_rebuilt_teacher_and_refuses_another(assets, teachers, tmp_path):
    out = tmp_path / "tune"
    cfg = TuneConfig(base=_base(assets, teachers["teacher"], out), methods=["kd"], trials=2, pruner="none")
    tune(cfg, log=lambda *_: None)
    messages = []
    tune(replace(cfg, base=replace(cfg.base, cache=teachers["last-bits"]), trials=3), log=messages.append)
    assert any("is a rebuild of the one" in m and "agree with the kept teacher's on 100.00%" in m for m in messages)
    trials = [json.loads(line) for line in (out / STUDY_FILE).read_text().splitlines() if '"cache"' in line]
    assert [t["user_attr"]["cache"] for t in trials] == [load_metadata(teachers[n]).content_key
                                                         for n in ("teacher", "teacher", "last-bits")]
    assert sum("trial" in m and "finished" in m for m in messages) == 1  # only the third trial ran
    with pytest.raises(TedcacheError, match="another teacher recipe"):
        tune(replace(cfg, base=replace(cfg.base, cache=teachers["other-lr"])), log=lambda *_: None)
    with pytest.raises(TedcacheError, match=r"is not the one .* agree with the kept teacher's on \d+\.\d+% of examples "
                                            r"\(at least 99.5% needed\) and its validation accuracy is"):
        tune(replace(cfg, base=replace(cfg.base, cache=teachers["redrawn"])), log=lambda *_: None)
    result = run_cli("tune", "--cache", teachers["other-lr"], "--student", assets["student"], "--out", out,
                     "--methods", "kd", "--trials", "2", "--pruner", "none", "--seed", "3", "--batch-size", "16",
                     "--max-steps", "6")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "another teacher recipe" in errors[0]


def test_compare_keeps_finished_blocks_and_reruns_a_block_that_would_mix_two_builds(assets, teachers, tmp_path):
    out = tmp_path / "runs"
    cfg = CompareConfig(base=_base(assets, teachers["teacher"], out), methods=["kd", "finetune"], seeds=[1, 2])
    compare(cfg, log=lambda *_: None)
    first = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/metrics.json")}
    shutil.rmtree(out / "kd-seed2")  # block 2 left unfinished on the first machine
    messages = []
    summary = compare(replace(cfg, base=replace(cfg.base, cache=teachers["last-bits"]), seeds=[1, 2, 3]),
                      log=messages.append)
    now = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/metrics.json")}
    keys = {n: load_metadata(teachers[n]).content_key for n in ("teacher", "last-bits")}
    # block 1 finished on the first build: kept as it was
    assert [now[f"{m}-seed1"] == first[f"{m}-seed1"] for m in ("kd", "finetune")] == [True, True]
    # block 2 was unfinished: its finished run read the other build, so both run again on this one; block 3 is new
    assert {now[f"{m}-seed{s}"]["cache_identity"] for m in ("kd", "finetune") for s in (2, 3)} == {keys["last-bits"]}
    assert any("finetune seed 2: run again" in m for m in messages)
    assert sorted(len(row["seeds"]) for row in summary["rows"]) == [3, 3]  # one variant per method, not per build
    assert json.loads((out / TEACHER_FILE).read_text())["cache"] == keys["teacher"]
    with pytest.raises(TedcacheError, match="another teacher recipe"):
        compare(replace(cfg, base=replace(cfg.base, cache=teachers["other-lr"])), log=lambda *_: None)
