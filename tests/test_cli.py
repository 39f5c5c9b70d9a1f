"""The `tedcache` command itself: the happy path and every bad input, through the console entry point's own
function in this process (run_cli); one test runs the installed entry point in a real subprocess."""

import json
import shutil
from pathlib import Path

import pytest
import zarr
from helpers.builders import make_model, write_rows
from helpers.commands import assert_one_line_error, extract_args, run_cli, run_cli_process


@pytest.mark.process
def test_the_console_entry_point_in_a_process_of_its_own(assets, tmp_path):
    """`python -m tedcache.cli.main` as a user's shell starts it: its version, a result on stdout, and a bad
    input as one line on stderr with exit status 2."""
    version = run_cli_process("--version")
    assert version.returncode == 0 and "version" in version.stdout
    made = run_cli_process("init-student", "--from", assets["teacher"], "--layers", "0", "--layers", "3", "--out",
                           tmp_path / "student")
    assert made.returncode == 0 and made.stdout.strip() == str(tmp_path / "student"), made.stderr
    bad = run_cli_process("distill", "--cache", tmp_path / "nothing", "--student", tmp_path / "student", "--out",
                          tmp_path / "o")
    assert bad.returncode == 2
    assert_one_line_error(bad, str(tmp_path / "nothing"))


@pytest.fixture(scope="module")
def cache(assets, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cli-caches")
    args = ["extract", "--teacher", assets["teacher"], "--data", assets["train"], "--eval-data", assets["eval"],
            "--max-length", "24", "--stage1-epochs", "1", "--cache-dir", cache_dir]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    path = first.stdout.strip().splitlines()[-1]
    second = run_cli(*args)
    assert second.returncode == 0 and second.stdout.strip().splitlines()[-1] == path
    assert "reusing" in second.stderr
    return Path(path)


def test_extract_init_student_distill(assets, cache, tmp_path):
    student = tmp_path / "student"
    made = run_cli("init-student", "--from", assets["teacher"], "--layers", "0,3", "--out", student)
    assert made.returncode == 0, made.stderr
    config = json.loads((student / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["tedcache_copied_from"] == [0, 3]
    out = tmp_path / "run"
    result = run_cli("distill", "--cache", cache, "--student", student, "--out", out, "--epochs", "1",
                     "--batch-size", "16", "--kl-alpha", "2", "--mse-alpha", "3", "--method", "ted")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "ted" and metrics["layer_map"] == {"0": 1, "1": 3}
    assert metrics["layer_map_rule"] == "interval"
    assert metrics["config"]["kl_alpha"] == 2.0 and "accuracy" in metrics["best"]
    # the copy map pairs student layer 0 (teacher 0) with teacher layer 2, the input of the copied layer 3
    copy = run_cli("distill", "--cache", cache, "--student", student, "--out", tmp_path / "copy", "--epochs", "0.5",
                   "--layer-map", "copy", "--method", "ted")
    assert copy.returncode == 0, copy.stderr
    metrics = json.loads((tmp_path / "copy" / "metrics.json").read_text())
    assert metrics["layer_map"] == {"0": 2, "1": 3} and metrics["layer_map_rule"] == "copy"


def test_finetune_command(assets, tmp_path):
    out = tmp_path / "ft"
    result = run_cli("finetune", "--model", assets["student"], "--data", assets["train"], "--eval-data",
                     assets["eval"], "--out", out, "--epochs", "1", "--batch-size", "16")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "metrics.json").read_text())["best"]["accuracy"] >= 0


def _extract_args(assets, tmp_path, **overrides):
    return extract_args(assets, tmp_path / "caches", **{"stage1_epochs": 0.1, **overrides})


@pytest.mark.parametrize("overrides,needles", [
    ({"data": "no/such/file.csv"}, ["does not exist"]),
    ({"teacher": "./no-such-teacher"}, ["does not exist"]),
    ({"text_column": "review"}, ["no column 'review'", "--text-column"]),
    ({"label_column": "stars"}, ["no column 'stars'"]),
    ({"task": "translation"}, ["unknown task 'translation'"]),
    ({"layers": "7"}, ["layers '7'"]),
    ({"precision": "fp8"}, ["unknown precision"]),
])
def test_extract_bad_input(assets, tmp_path, overrides, needles):
    result = run_cli(*_extract_args(assets, tmp_path, **overrides))
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "caches").exists() or not any((tmp_path / "caches").iterdir())


def test_extract_labels_outside_label_set_and_empty_data(assets, tmp_path):
    bad = write_rows(tmp_path / "bad.csv", [{"text": "good film", "label": 0}, {"text": "dull", "label": 4}])
    assert_one_line_error(run_cli(*_extract_args(assets, tmp_path, **{"data": bad})), "outside the label set")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    assert_one_line_error(run_cli(*_extract_args(assets, tmp_path, **{"data": empty})), "no examples")
    eval_bad = write_rows(tmp_path / "eval_bad.csv", [{"text": "good", "label": "maybe"}])
    assert_one_line_error(run_cli(*_extract_args(assets, tmp_path, **{"eval_data": eval_bad})),
                          "--eval-data", "outside the label set")


def test_distill_refuses_foreign_vocabulary(cache, tmp_path):
    other = make_model(tmp_path / "other", layers=2, hidden=32, extra_vocab=["zebra"])
    result = run_cli("distill", "--cache", cache, "--student", other, "--out", tmp_path / "o")
    assert_one_line_error(result, "tokenizer vocabulary differs")
    assert not (tmp_path / "o").exists()


def test_distill_refuses_unmappable_layers(assets, cache, tmp_path):
    three = make_model(tmp_path / "three", layers=3, hidden=32)
    assert_one_line_error(run_cli("distill", "--cache", cache, "--student", three, "--out", tmp_path / "o",
                                  "--method", "ted"), "cannot map 3 student layers")
    assert_one_line_error(run_cli("distill", "--cache", cache, "--student", assets["student"], "--out",
                                  tmp_path / "o", "--layer-map", "0:9", "--method", "ted"), "--layer-map")


def _copy_with_metadata(cache, tmp_path, **changes) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    group = zarr.open_group(str(copy), mode="r+", zarr_format=3)
    group.attrs["tedcache"] = {**group.attrs["tedcache"], **changes}
    return copy


def test_distill_refuses_incomplete_and_other_format(assets, cache, tmp_path):
    incomplete = _copy_with_metadata(cache, tmp_path, complete=False)
    assert_one_line_error(run_cli("distill", "--cache", incomplete, "--student", assets["student"], "--out",
                                  tmp_path / "o"), "incomplete", "re-run")
    shutil.rmtree(incomplete)
    old = _copy_with_metadata(cache, tmp_path, format_version=0)
    assert_one_line_error(run_cli("distill", "--cache", old, "--student", assets["student"], "--out",
                                  tmp_path / "o"), "format 0", "--force")
    for missing in (tmp_path / "nowhere", assets["train"]):
        assert_one_line_error(run_cli("distill", "--cache", missing, "--student", assets["student"], "--out",
                                      tmp_path / "o"), "cache")


def test_unknown_method_and_missing_flag(assets, cache, tmp_path):
    assert_one_line_error(run_cli("distill", "--cache", cache, "--student", assets["student"], "--out",
                                  tmp_path / "o", "--method", "magic"), "unknown method")
    assert_one_line_error(run_cli("distill", "--cache", cache), "--student")
