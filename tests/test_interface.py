"""One source of truth: config fields <-> CLI flags <-> docs, config files, and the cache's schema page."""

from __future__ import annotations

import json
import re
import typing
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import run_cli
from test_cli import assert_one_line_error

from tedcache.cache.metadata import schema_markdown
from tedcache.cli.main import app
from tedcache.cli.options import flags_of
from tedcache.config import CompareConfig, DistillConfig, ExtractConfig, FinetuneConfig, OptimConfig, TuneConfig
from tedcache.configfile import read_config_file, resolve
from tedcache.errors import TedcacheError
from tedcache.schema import hints, is_record

ROOT = Path(__file__).resolve().parent.parent
CONFIG_COMMANDS = {"extract": ExtractConfig, "distill": DistillConfig, "compare": CompareConfig,
                   "finetune": FinetuneConfig, "tune": TuneConfig}
SET_PER_RUN = {"compare": {"base.method", "base.seed", "base.resume"},  # compare sets these for each run
               "tune": {"base.method", "base.resume"}}  # tune: for each trial


def leaf_fields(cls, path=(), defaults=None):
    """(dotted path, default where used) of every non-record field, recursively; an independent walk."""
    for field in fields(cls):
        if defaults is not None:
            default = getattr(defaults, field.name)
        elif field.default is not MISSING:
            default = field.default
        elif field.default_factory is not MISSING:
            default = field.default_factory()
        else:
            default = MISSING
        hint = hints(cls)[field.name]
        if is_record(hint):
            yield from leaf_fields(hint, path + (field.name,), None if default is MISSING else default)
        else:
            yield ".".join(path + (field.name,)), default


@pytest.mark.parametrize("command", sorted(CONFIG_COMMANDS))
def test_every_field_has_a_flag_with_its_default(command):
    cls = CONFIG_COMMANDS[command]
    click_command = app.commands[command]
    params = {p.name: p for p in click_command.params}
    expected = {key: default for key, default in leaf_fields(cls) if key not in SET_PER_RUN.get(command, set())}
    by_field = {key.replace(".", "__"): key for key in expected}
    assert set(params) - {"config_file"} == set(by_field), "a field without a flag, or a flag without a field"
    for param, key in by_field.items():
        default = expected[key]
        option = params[param]
        if default is MISSING:
            assert option.default in (None, []) and "required" in option.help
        elif isinstance(default, list):
            assert list(option.default) == default, key
        else:
            assert option.default == default, key
        assert option.help, f"{key} has no help text"


def test_flag_names_follow_fields():
    """Nested records are flattened under their prefix: stage1.lr is --stage1-lr, optim.lr is --lr."""
    names = {f.key: f.name for f in flags_of(DistillConfig)}
    assert names["optim.lr"] == "--lr" and names["stage1.lr"] == "--stage1-lr"
    assert names["teacher"] == "--teacher" and names["device"] == "--device" and names["autocast"] == "--autocast"
    names = {f.key: f.name for f in flags_of(ExtractConfig)}
    assert names["data.train"] == "--data" and names["filters.kind"] == "--filter" and names["seed"] == "--seed"


def _quoted_commands(text: str):
    """(command, flags) for every `tedcache COMMAND ...` line or inline span in markdown text."""
    spans = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text)
    for span in spans:
        joined = re.sub(r"\\\n\s*", " ", span)
        for line in joined.splitlines():
            for match in re.finditer(r"\btedcache ([a-z][a-z-]*)((?:\s+(?!#)[^\s|;&)]+)*)", line):
                command, rest = match.group(1), match.group(2)
                yield command, re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest.split("#")[0])


def test_docs_name_only_real_commands_and_flags():
    runner = CliRunner()
    helps: dict[str, str] = {}
    checked = 0
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for command, flags in _quoted_commands(doc.read_text()):
            if command not in app.commands:
                if command in {"cache", "distill's", "command"}:  # prose such as "tedcache cache ..." is not a call
                    continue
                pytest.fail(f"{doc.name} quotes `tedcache {command}`, which is not a command")
            if command not in helps:
                result = runner.invoke(app, [command, "--help"], terminal_width=200)
                assert result.exit_code == 0, result.output
                helps[command] = result.output
            for flag in flags:
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[command]), \
                    f"{doc.name}: `tedcache {command} ... {flag}` but {command} has no {flag}"
                checked += 1
    assert checked > 40  # the walk really found the documented commands


LAUNCHER_FLAGS = {"--multi_gpu", "--num_processes", "--num_machines", "--machine_rank", "--main_process_ip",
                  "--main_process_port", "--standalone", "--nproc_per_node", "--cpu"}  # accelerate / torchrun


def test_every_quoted_flag_exists_somewhere():
    """Flags quoted on their own (`--grad-accum`) name a flag of some command, or a launcher's."""
    runner = CliRunner()
    helps = " ".join(runner.invoke(app, [c, "--help"], terminal_width=200).output for c in app.commands)
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for span in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text):
            for flag in set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", span)) - LAUNCHER_FLAGS:
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps), f"{doc.name} quotes {flag}: no such flag"


def test_readme_layout_lists_the_real_modules():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```")[1]
    package_part = block.split("\ntedcache/", 1)[1].split("\ncli/", 1)[0]  # the lines about tedcache/
    listed = set(re.findall(r"\b(\w+\.py|cache/)", package_part))
    real = {p.name for p in (ROOT / "tedcache").glob("*.py")} | {p.name for p in (ROOT / "tedcache" / "cache").glob("*.py")}
    real = (real - {"__init__.py"}) | {"cache/"}
    assert listed == real, f"README layout lists {sorted(listed - real)} that do not exist and misses {sorted(real - listed)}"
    assert "options.py" in block and (ROOT / "cli" / "options.py").is_file()


def test_cache_format_page_is_generated_from_the_schema():
    page = (ROOT / "docs" / "cache-format.md").read_text()
    assert page == schema_markdown(), "docs/cache-format.md is stale: python -m tedcache.cache.metadata > docs/cache-format.md"


# ---------------------------------------------------------------- config files


def test_config_file_errors_name_the_key(tmp_path):
    def resolved(values: dict | str):
        path = tmp_path / "c.yaml"
        path.write_text(values if isinstance(values, str) else yaml.safe_dump(values))
        return resolve(DistillConfig, read_config_file(str(path)))

    required = {"cache": "c", "student": "s", "out": "o"}
    assert resolved({**required, "optim": {"lr": "1e-4"}}).optim.lr == 1e-4  # YAML 1.1 reads 1e-4 as text
    for values, needles in (({**required, "optim": {"epochs": "many"}}, ["optim.epochs", "float"]),
                            ({**required, "method": "magic"}, ["method", "magic", "ted"]),
                            ({**required, "seed": 1.5}, ["seed", "int"]),
                            ("optim: [1, 2\n", ["not valid YAML", "line"]),
                            ("- a list\n", ["mapping"])):
        with pytest.raises(TedcacheError) as error:
            resolved(values)
        assert all(needle in str(error.value) for needle in needles), str(error.value)
    with pytest.raises(TedcacheError, match="does not exist"):
        read_config_file(str(tmp_path / "missing.yaml"))


def test_config_file_errors_are_one_line_through_the_cli(tmp_path):
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text(yaml.safe_dump({"cache": "c", "student": "s", "out": "o", "optim": {"learning_rate": 1}}))
    assert_one_line_error(run_cli("distill", "--config", bad_key), "optim.learning_rate")
    assert_one_line_error(run_cli("distill", "--cache", "c", "--student", "s"), "--out")


def test_shipped_example_configs_resolve():
    configs = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        command = path.stem.split("-")[-1]
        given_by_flag = {"cache": "CACHE"} if command == "distill" else {}  # the files say: --cache $CACHE
        record = resolve(CONFIG_COMMANDS[command], given_by_flag, read_config_file(str(path)))
        assert isinstance(record, CONFIG_COMMANDS[command])


@pytest.fixture(scope="module")
def small_cache(assets, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("iface-caches")
    config = cache_dir / "extract.yaml"
    config.write_text(yaml.safe_dump({"teacher": str(assets["teacher"]),
                                      "data": {"train": [str(assets["train"])], "eval": [str(assets["eval"])],
                                               "max_length": 24},
                                      "stage1": {"epochs": 0.5}, "cache_dir": str(cache_dir), "precision": "fp32"}))
    made = run_cli("extract", "--config", config, "--shard-tokens", "256")  # a flag beside the file
    assert made.returncode == 0, made.stderr
    path = made.stdout.strip().splitlines()[-1]
    meta = json.loads((Path(path) / "zarr.json").read_text())["attributes"]["tedcache"]
    assert meta["config"]["shard_tokens"] == 256 and meta["config"]["stage1"]["epochs"] == 0.5
    assert meta["config"]["stage1"]["lr"] == 1e-3  # a partial mapping keeps the record's other defaults
    return path


def test_run_config_reproduces_the_run_and_flags_override_it(assets, small_cache, tmp_path):
    first = tmp_path / "first"
    result = run_cli("distill", "--cache", small_cache, "--student", assets["student"], "--out", first,
                     "--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--method", "kd", "--device", "cpu",
                     "--log-every", "1", "--no-autocast")
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 1e-3 and saved["device"] == "cpu" and saved["autocast"] is False
    saved["out"] = str(tmp_path / "again")
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(saved))
    again = run_cli("distill", "--config", tmp_path / "again.yaml")
    assert again.returncode == 0, again.stderr
    a, b = (json.loads((p / "metrics.json").read_text()) for p in (first, tmp_path / "again"))
    assert a["history"] == b["history"] and a["best"] == b["best"]  # the same run, value for value
    assert len(a["history"]) == a["eval"][-1]["step"]  # --log-every 1: a record per step
    override = run_cli("distill", "--config", tmp_path / "again.yaml", "--out", tmp_path / "other", "--seed", "7")
    assert override.returncode == 0, override.stderr
    c = json.loads((tmp_path / "other" / "metrics.json").read_text())
    assert c["config"]["seed"] == 7 and c["config"]["optim"]["lr"] == 1e-3 and c["history"] != a["history"]


def test_online_mode_through_the_cli(assets, small_cache, tmp_path):
    """distill --teacher: targets computed live; with an fp32 cache the first step's losses equal offline ones."""
    runs = {}
    for mode, extra in (("offline", []), ("online", ["--teacher", assets["teacher"]])):
        out = tmp_path / mode
        result = run_cli("distill", "--cache", small_cache, "--student", assets["student"], "--out", out,
                         "--max-steps", "2", "--batch-size", "16", "--log-every", "1", "--device", "cpu", *extra)
        assert result.returncode == 0, result.stderr
        runs[mode] = json.loads((out / "metrics.json").read_text())
    assert runs["online"]["config"]["teacher"] == str(assets["teacher"])
    first_offline, first_online = runs["offline"]["history"][0], runs["online"]["history"][0]
    for term in ("task", "kl", "mse"):
        assert first_online[term] == pytest.approx(first_offline[term], rel=1e-4, abs=1e-6), term
    wrong = run_cli("distill", "--cache", small_cache, "--student", assets["student"], "--out", tmp_path / "w",
                    "--teacher", assets["student"], "--max-steps", "1")
    assert_one_line_error(wrong, "not the teacher this cache was extracted from")


def test_optim_config_is_one_phase():
    assert {f.name for f in fields(OptimConfig)} == {"epochs", "lr", "batch_size", "grad_accum", "weight_decay",
                                                     "warmup_ratio", "patience"}
    assert typing.get_type_hints(DistillConfig)["stage1"] is OptimConfig


def test_runs_saved_before_a_setting_existed_still_match():
    """compare and --resume reuse a run whose saved settings lack a newer setting (it ran at the default);
    read-ahead changes only how the cache is read."""
    from dataclasses import asdict

    from tedcache.config import DistillConfig, what_it_computes

    new = asdict(DistillConfig(cache="c", student="s", out="o", read_ahead=8))
    old = {k: v for k, v in new.items() if k not in ("shard_reads", "read_ahead")}
    assert what_it_computes(old) == what_it_computes(new)
    assert what_it_computes(old) != what_it_computes({**new, "shard_reads": True})
