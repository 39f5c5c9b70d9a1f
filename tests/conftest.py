"""Fixtures: tiny random-initialised BERTs and causal LMs with tokenizers made here, small labelled data
sets and text, a cache of them, and the fault battery's report. Helpers are in tests/helpers/."""

from __future__ import annotations

import os

import pytest
from helpers.builders import documents, make_lm, make_model, sentiment_rows, write_rows, write_text
from helpers.object_store import s3_server

from tedcache import DataConfig, ExtractConfig, OptimConfig, distillation, extract
from tedcache.config import StudentConfig
from tedcache.students import init_student


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("assets")
    return {
        "teacher": make_model(root / "teacher", layers=4, hidden=48),
        "student": make_model(root / "student", layers=2, hidden=32, seed=1),
        "train": write_rows(root / "train.csv", sentiment_rows(96, seed=0)),
        "eval": write_rows(root / "eval.csv", sentiment_rows(32, seed=1)),
        "test": write_rows(root / "test.csv", sentiment_rows(32, seed=2)),
        "root": root,
    }


@pytest.fixture(scope="session")
def lm_assets(tmp_path_factory) -> dict:
    """Tiny GPT-2 and Llama teachers, their 2-layer students (layers 0 and 3), and text to train on."""
    root = tmp_path_factory.mktemp("lm")
    found = {"root": root,
             "train": write_text(root / "train.txt", documents(160, 0)),
             "eval": write_text(root / "eval.txt", documents(30, 1)),
             "test": write_text(root / "test.txt", documents(30, 2))}
    for family in ("gpt2", "llama"):
        found[family] = make_lm(root / family, family)
        made = StudentConfig(source=str(found[family]), layers=[0, 3], out=str(root / f"{family}-student"))
        found[f"{family}_student"] = init_student(made)
    return found


@pytest.fixture(scope="session")
def labelled_cache(assets, tmp_path_factory) -> str:
    """The tiny teacher's filtered cache with eval and test splits (what tune and select read)."""
    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], test=[str(assets["test"])],
                      max_length=24)
    return extract(ExtractConfig(teacher=str(assets["teacher"]), data=data,
                                 cache_dir=str(tmp_path_factory.mktemp("labelled") / "c"),
                                 stage1=OptimConfig(epochs=1, batch_size=16)))


@pytest.fixture(autouse=True, scope="session")
def student_filters_store(tmp_path_factory):
    """Students' kept Stage I filters (distill --reuse-stage1) go to a folder of this test run, in this process
    and in the processes it starts, never to ~/.cache."""
    folder = tmp_path_factory.mktemp("student-filters")
    os.environ["TEDCACHE_STAGE1_STORE"] = str(folder)
    distillation.STAGE1_STORE = folder
    return folder


@pytest.fixture
def fault_log():
    """fault_log(line): one line for `make faults`' summary (what was done, how often, what was lost), written
    to $TEDCACHE_FAULTS_REPORT when set; call it once every check of the test has passed."""
    def log(line: str) -> None:
        report = os.environ.get("TEDCACHE_FAULTS_REPORT")
        if report:
            with open(report, "a") as f:
                f.write(line + "\n")

    return log


@pytest.fixture(scope="module")
def s3_env():
    """A real S3-compatible server (moto) on loopback for the module's tests (helpers/object_store.py)."""
    with s3_server() as env:
        yield env
