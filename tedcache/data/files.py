"""Reading data files (csv, tsv, json, jsonl, parquet, txt, CoNLL, SQuAD json), datasets folders and hub data
sets into a table."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import datasets

from ..errors import TedcacheError

FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                 ".txt": "text",  # plain text: one row (document) per blank-line-separated paragraph
                 ".conll": "conll"}  # token classification: a word and its tag per line, sentences blank-separated


def load_table(paths: list[str], conll_columns: tuple[str, str] = ("tokens", "tags")):
    """Load csv/json/jsonl/parquet/txt/conll files, a folder saved by `datasets`, or (online) a hub
    dataset. CoNLL files become one row per sentence: its words and tags in `conll_columns`."""
    if len(paths) == 1 and Path(paths[0]).is_dir():
        folder = Path(paths[0])
        if not ((folder / "dataset_info.json").exists() or (folder / "dataset_dict.json").exists()):
            raise TedcacheError(f"{folder} is a folder but not one saved by datasets.save_to_disk; "
                                "pass the data files themselves (csv, json, jsonl, parquet)")
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise TedcacheError(f"{folder} holds splits {list(loaded)} but no 'train'; "
                                    "save the split you want with Dataset.save_to_disk")
            loaded = loaded["train"]
        return loaded
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        if len(paths) == 1 and "/" in paths[0] and not paths[0].startswith((".", "/")) \
                and Path(paths[0]).suffix == "":
            return _load_from_hub(paths[0])
        raise TedcacheError(f"data file {missing[0]} does not exist; check the path")
    builders = {FILE_BUILDERS.get(Path(p).suffix.lower()) for p in paths}
    if None in builders or len(builders) != 1:
        raise TedcacheError(f"cannot read {paths}: give files of one kind among "
                            f"{', '.join(sorted(FILE_BUILDERS))}")
    builder = builders.pop()
    if builder == "conll":
        return read_conll(paths, conll_columns)
    if builder == "json" and len(paths) == 1:
        squad = read_squad_json(paths[0])
        if squad is not None:
            return squad
    kwargs = {"delimiter": "\t"} if builder == "csv" and paths[0].endswith(".tsv") else {}
    if builder == "text":
        kwargs = {"sample_by": "paragraph"}
    try:
        return datasets.load_dataset(builder, data_files=list(paths), split="train", **kwargs)
    except Exception as exc:  # datasets raises many types for unreadable files
        if any(s in str(exc).lower() for s in ("empty", "no columns", "corresponds to no data")):
            raise TedcacheError(f"{paths[0]} holds no examples; give a file with at least one row") from exc
        raise TedcacheError(f"cannot read {paths[0]} as {builder}: {str(exc).splitlines()[0]}") from exc


def read_conll(paths: list[str], columns: tuple[str, str]):
    """CoNLL-style files: one word per line, its tag in the last whitespace-separated column, a blank line
    between sentences, -DOCSTART- lines skipped."""
    sentences, words, tags = [], [], []
    for path in paths:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            parts = line.split()
            if not parts or parts[0] == "-DOCSTART-":
                if words:
                    sentences.append((words, tags))
                words, tags = [], []
                continue
            if len(parts) < 2:
                raise TedcacheError(f"{path}:{number}: '{line.strip()}' has no tag; CoNLL lines are "
                                    "'word ... tag' (whitespace-separated)")
            words.append(parts[0])
            tags.append(parts[-1])
        if words:
            sentences.append((words, tags))
            words, tags = [], []
    if not sentences:
        raise TedcacheError(f"{paths[0]} holds no sentences; give CoNLL lines 'word ... tag'")
    return datasets.Dataset.from_dict({columns[0]: [w for w, _ in sentences], columns[1]: [t for _, t in sentences]})


def _load_from_hub(name: str):
    try:
        return datasets.load_dataset(name, split="train")
    except Exception as exc:
        raise TedcacheError(f"{name} is neither a local path nor a reachable hub dataset "
                            f"({type(exc).__name__}); check the path or go online") from exc


def check_columns(table, columns: list[str | None], source: str) -> None:
    """Fail with one line when the table is empty or lacks a needed column."""
    if len(table) == 0:
        raise TedcacheError(f"{source} holds no examples; give a data set with at least one row")
    for col in columns:
        if col is not None and col not in table.column_names:
            raise TedcacheError(f"{source} has no column '{col}' (columns: {', '.join(table.column_names)}); "
                                "name the right one with --text-column / --text-pair-column / --label-column")


def read_squad_json(path: str) -> datasets.Dataset | None:
    """A SQuAD 1.1/2.0 json file ({"data": [{"paragraphs": [{"context", "qas": [...]}]}]}) as one row per
    question (id, question, context, answers {text, answer_start}); None for other json files."""
    with open(path) as handle:
        head = handle.read(64).lstrip()
    if not head.startswith("{"):
        return None
    try:
        loaded = json.loads(Path(path).read_text())
    except json.JSONDecodeError:
        return None  # json lines, read as a table
    if not isinstance(loaded, dict) or not isinstance(loaded.get("data"), list):
        return None
    rows = collections.defaultdict(list)
    for article in loaded["data"]:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                rows["id"].append(str(qa.get("id", len(rows["id"]))))
                rows["question"].append(qa["question"])
                rows["context"].append(paragraph["context"])
                rows["answers"].append({"text": [a["text"] for a in answers],
                                        "answer_start": [int(a["answer_start"]) for a in answers]})
    if not rows:
        raise TedcacheError(f"{path} is SQuAD json without questions; give a file with at least one question")
    return datasets.Dataset.from_dict(dict(rows))
