"""One source of truth: config fields <-> CLI flags <-> docs, config files, and the cache's schema page."""

from __future__ import annotations

import json
import re
import typing
from dataclasses import MISSING, fields
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner
from helpers.commands import assert_one_line_error, run_cli

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
    assert names["teacher"] == "--teacher" and names["device"] == "--device" and names["train_precision"] == "--train-precision"
    names = {f.key: f.name for f in flags_of(ExtractConfig)}
    assert names["data.train"] == "--data" and names["filters.kind"] == "--filter" and names["seed"] == "--seed"


SHELL_FENCES = ("", "bash", "sh", "shell", "console")
PROSE = {"cache", "distill's", "command"}  # "tedcache cache ..." in prose is not a call
PLACEHOLDER_VALUES = {"method": "ted"}  # <method> in a quoted command


def quoted_commands(text: str):
    """(line number, command, arguments) for every `tedcache COMMAND ...` in a shell code block (lines joined
    at a trailing backslash) or an inline code span of markdown text; `in_block` says which."""
    fence = None
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line.strip()[3:].strip()
            continue
        if fence is not None:
            if fence not in SHELL_FENCES:
                continue
            if not pending:
                start = number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            spans, pending, at, in_block = [pending + line], "", start, True
        else:
            spans, at, in_block = re.findall(r"`([^`]+)`", line), number, False
        for span in spans:
            for match in re.finditer(r"\btedcache ([a-z][a-z-]*)((?:[ \t]+(?!#)[^\s|;&)]+)*)", span):
                yield at, match.group(1), match.group(2).split(), in_block


def plausible(token: str) -> str:
    """A quoted argument with its placeholder filled in: $CACHE -> CACHE, best-<method>.yaml -> best-ted.yaml,
    [--json] -> --json, CACHE... -> CACHE."""
    token = token.strip("[]").removesuffix("...")
    token = re.sub(r"\$\{?(\w+)\}?", r"\1", token)
    return re.sub(r"<(\w+)>", lambda m: PLACEHOLDER_VALUES.get(m.group(1), m.group(1)), token)


def parse_problems(name: str, text: str) -> tuple[list[str], int]:
    """Each quoted command of a markdown page through its command's real click parser (make_context, which
    converts every value but runs nothing): (the problems, each naming the page and line; how many parsed).
    An inline span may leave out required arguments (`tedcache verify` in prose); a code block may not."""
    problems, parsed = [], 0
    for line, command, args, in_block in quoted_commands(text):
        if command not in app.commands:
            if command not in PROSE:
                problems.append(f"{name}:{line}: `tedcache {command}` is not a command")
            continue
        try:
            app.commands[command].make_context(command, [plausible(arg) for arg in args])
        except click.exceptions.Exit:
            pass  # --help, --version
        except click.MissingParameter as error:
            if in_block:
                problems.append(f"{name}:{line}: `{' '.join(['tedcache', command, *args])}`: {error.format_message()}")
                continue
        except click.UsageError as error:
            problems.append(f"{name}:{line}: `{' '.join(['tedcache', command, *args])}`: {error.format_message()}")
            continue
        parsed += 1
    return problems, parsed


def test_every_quoted_command_parses():
    problems, parsed = [], 0
    for doc in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]:
        found, count = parse_problems(str(doc.relative_to(ROOT)), doc.read_text())
        problems += found
        parsed += count
    assert not problems, "\n".join(problems)
    assert parsed > 40  # the walk really found the documented commands


def test_the_parse_check_catches_a_command_that_would_not_parse():
    page = ("Some prose, then `tedcache compare --seeds one,two`.\n\n```bash\ntedcache distill --cache C \\\n"
            "    --no-such-flag 1\ntedcache report\ntedcache compare --seeds 1,2,3 --seeds 4 --methods kd,ted\n```\n"
            "`tedcache verify` alone in prose is a mention.\n")
    problems, parsed = parse_problems("page.md", page)
    assert len(problems) == 3 and parsed == 2, problems
    assert problems[0].startswith("page.md:1: `tedcache compare --seeds one,two`") and "not a list of int" in problems[0]
    assert problems[1].startswith("page.md:4: `tedcache distill") and "--no-such-flag" in problems[1]
    assert problems[2].startswith("page.md:6: `tedcache report`")


def test_list_flags_take_commas_and_repetition():
    context = app.commands["compare"].make_context("compare", ["--seeds", "1,2", "--seeds", "3", "--methods", "kd,ted"])
    assert context.params["seeds"] == ([1, 2], [3]) and context.params["methods"] == (["kd", "ted"],)
    result = CliRunner().invoke(app, ["compare", "--help"], terminal_width=200)
    assert "--seeds INT[,...]" in result.output and "(--seeds 1,2), or the flag repeated (--seeds 1 --seeds 2)" in \
        " ".join(result.output.split())


LAUNCHER_FLAGS = {"--multi_gpu", "--num_processes", "--num_machines", "--machine_rank", "--main_process_ip",
                  "--main_process_port", "--standalone", "--nproc_per_node", "--cpu", "--nnodes", "--node_rank",
                  "--rdzv_backend", "--rdzv_endpoint"}  # accelerate / torchrun


def test_every_quoted_flag_exists_somewhere():
    """Flags quoted on their own (`--grad-accum`) name a flag of some command, or a launcher's."""
    runner = CliRunner()
    helps = " ".join(runner.invoke(app, [c, "--help"], terminal_width=200).output for c in app.commands)
    for doc in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for span in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text):
            for flag in set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", span)) - LAUNCHER_FLAGS:
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps), f"{doc.name} quotes {flag}: no such flag"


def test_contributing_layout_lists_the_real_modules():
    """CONTRIBUTING.md's layout names every module of tedcache/ (sub-folders' ones on their folder's lines),
    and nothing else."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    block = text.split("## Layout", 1)[1].split("```")[1]
    package_part = block.split("\ntedcache/", 1)[1].split("\ncli/", 1)[0]
    listed, folder = set(), ""
    for line in package_part.splitlines()[1:]:
        label = re.match(r"  (\S[^ ]*(?: I)?)\s", line)  # a line's label: "data/", "settings", "stage I"
        if label:
            folder = label.group(1) if label.group(1).endswith("/") else ""
        listed |= {folder + name for name in re.findall(r"\b(\w+\.py)\b", line)}
    real = {str(p.relative_to(ROOT / "tedcache")) for p in (ROOT / "tedcache").rglob("*.py") if p.name != "__init__.py"}
    assert listed == real, f"CONTRIBUTING.md lists {sorted(listed - real)} (no such file), misses {sorted(real - listed)}"
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
                     "--log-every", "1", "--train-precision", "fp32")
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 1e-3 and saved["device"] == "cpu" and saved["train_precision"] == "fp32"
    saved["out"] = str(tmp_path / "again")
    saved["autocast"] = saved.pop("train_precision") == "bf16-mixed"  # a run folder written before --train-precision
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(saved))
    again = run_cli("distill", "--config", tmp_path / "again.yaml")
    assert again.returncode == 0, again.stderr
    a, b = (json.loads((p / "metrics.json").read_text()) for p in (first, tmp_path / "again"))
    assert a["history"] == b["history"] and a["best"] == b["best"]  # the same run, value for value
    assert b["config"]["train_precision"] == "fp32"
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
                         "--max-steps", "2", "--batch-size", "16", "--log-every", "1", "--device", "cpu", "--method", "ted",
                         *extra)
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
