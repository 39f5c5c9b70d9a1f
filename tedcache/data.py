"""Reading labelled text, turning labels into ids, tokenizing, and fingerprinting the result."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from .errors import TedcacheError
from .qa import NO_ANSWER, NOT_CONTEXT, answer_tokens, checked_answers, doc_stride, question_columns, read_squad_json

FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                 ".txt": "text",  # plain text: one row (document) per blank-line-separated paragraph
                 ".conll": "conll"}  # token classification: a word and its tag per line, sentences blank-separated
IGNORED = -100  # token-classification label of positions that are not a word's first sub-token
UNTAGGED = -1  # token-classification label of a word's first sub-token without a tag (unlabelled transfer text)


@dataclass
class Examples:
    """Tokenized examples stored flat (CSR): example i owns tokens offsets[i]:offsets[i+1]."""

    input_ids: np.ndarray  # (T,) int32
    offsets: np.ndarray  # (E+1,) int64
    token_type_ids: np.ndarray | None  # (T,) int8, when the tokenizer makes them
    labels: np.ndarray | None  # (E,) int64 class ids or float32 targets; None for causal-lm blocks
    fingerprint: str  # hash of the raw texts and labels that produced these examples
    token_labels: np.ndarray | None = None  # (T,) int16 token-classification tag ids, IGNORED off first sub-tokens
    # question-answering (see tedcache.qa): labels are (E, 2) answer start/end tokens of each window
    context_spans: np.ndarray | None = None  # (T, 2) int32 each token's character span in its context, or -1
    question_index: np.ndarray | None = None  # (E,) int64 the question each window belongs to
    questions: list[dict] | None = None  # per question: id, context, gold answer texts

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def reorder(self, order: np.ndarray) -> "Examples":
        """The examples in `order` (a permutation or subset of example indices), still flat."""
        lengths = np.diff(self.offsets)[order]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        token_index = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in order]) \
            if len(order) else np.zeros(0, dtype=np.int64)
        def per_token(values):
            return None if values is None else values[token_index]

        def per_example(values):
            return None if values is None else values[order]

        return Examples(self.input_ids[token_index], offsets, per_token(self.token_type_ids), per_example(self.labels),
                        self.fingerprint, per_token(self.token_labels), per_token(self.context_spans),
                        per_example(self.question_index), self.questions)


class TokenSpool:
    """A 1-D array built by appending, kept in an unlinked temporary file (under TMPDIR) and memory-mapped
    when read: tokenizing a corpus never holds its tokens in memory."""

    def __init__(self, dtype):
        self.file = tempfile.TemporaryFile(prefix="tedcache-tokens-")
        self.dtype, self.count = np.dtype(dtype), 0

    def extend(self, values) -> None:
        """Append an array, or the numbers an iterable yields."""
        data = values.astype(self.dtype) if isinstance(values, np.ndarray) else np.fromiter(values, dtype=self.dtype)
        self.file.write(data.tobytes())
        self.count += len(data)

    def array(self, count: int | None = None) -> np.ndarray:
        """The first `count` values (default: all), memory-mapped read-only."""
        count = self.count if count is None else count
        self.file.flush()
        return np.memmap(self.file, dtype=self.dtype, mode="r", shape=(count,)) if count else np.zeros(0, self.dtype)


HASHED_ROWS = 10_000  # rows per update of a data fingerprint (part of its value: changing it changes cache keys)


def _table_digest(columns: list[str | None]):
    """A running content hash of `columns` of a table, fed chunk by chunk with `_hash_rows`."""
    digest = hashlib.sha256()
    for col in columns:
        if col is not None:
            digest.update(col.encode())
    return digest


def _hash_rows(digest, rows: dict, columns: list[str | None]) -> None:
    for col in columns:
        if col is not None:
            digest.update(json.dumps(rows[col], default=str).encode())


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


def label_names_from_data(table, label_column: str) -> list[str]:
    """Label names for a classification set: ClassLabel names, sorted strings, or 0..max ints."""
    feature = table.features[label_column]
    if hasattr(feature, "names"):
        return list(feature.names)
    values = [v for v in table[label_column][:] if not _missing(v)]  # (empty labels: see encode_labels)
    if all(isinstance(v, str) for v in values):
        return sorted(set(values))
    ints = np.asarray(values)
    if not np.issubdtype(ints.dtype, np.integer) or ints.min() < 0:
        raise TedcacheError(f"column '{label_column}' holds {ints.dtype} values; classification labels "
                            "must be class names or integers 0..K-1 (use --task regression for numbers)")
    return [str(i) for i in range(int(ints.max()) + 1)]


def _missing(value) -> bool:
    return value is None or value == "" or (isinstance(value, float) and np.isnan(value))


def encode_labels(table, label_column: str, task: str, label_names: list[str] | None, source: str,
                  allow_missing: bool = False) -> np.ndarray:
    """Labels as class ids (classification) or float targets (regression), checked against the label set.
    With `allow_missing` (training data for a cache), an empty label marks an unlabelled example: -1
    (classification) or NaN (regression)."""
    values = table[label_column][:]
    missing = np.asarray([_missing(v) for v in values], dtype=bool)
    if missing.any() and not allow_missing:
        raise TedcacheError(f"{source}: column '{label_column}' has empty labels; drop those rows or fill them in")
    if missing.any():
        known = encode_labels(table.select(np.flatnonzero(~missing)), label_column, task, label_names, source) \
            if not missing.all() else np.zeros(0)
        filled = np.full(len(values), np.nan if task == "regression" else -1,
                         dtype=np.float32 if task == "regression" else np.int64)
        filled[~missing] = known
        return filled
    if task == "regression":
        try:
            return np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise TedcacheError(f"{source}: column '{label_column}' is not numeric; regression needs numbers") from exc
    assert label_names is not None
    if all(isinstance(v, str) for v in values):
        index = {name: i for i, name in enumerate(label_names)}
        unknown = sorted({v for v in values if v not in index})
        if unknown:
            raise TedcacheError(f"{source}: labels {unknown[:5]} are outside the label set {label_names}; "
                                "fix the labels or use a model trained on this label set")
        return np.asarray([index[v] for v in values], dtype=np.int64)
    ids = np.asarray(values)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TedcacheError(f"{source}: column '{label_column}' holds {ids.dtype} values; classification labels "
                            "must be class names or integers 0..K-1")
    bad = sorted({int(v) for v in ids if not 0 <= v < len(label_names)})
    if bad:
        raise TedcacheError(f"{source}: labels {bad[:5]} are outside the label set 0..{len(label_names) - 1}; "
                            "fix the labels or use a model with that many labels")
    return ids.astype(np.int64)


def tokenize(table, tokenizer, text_column: str, text_pair_column: str | None, max_length: int,
             labels: np.ndarray, source: str) -> Examples:
    """Tokenize (truncating, no padding) into flat CSR arrays, HASHED_ROWS rows at a time, in one pass
    that also fingerprints the texts; tokens go to memory-mapped spools (TokenSpool)."""
    columns = [text_column, text_pair_column]
    ids, types, lengths, digest = TokenSpool(np.int32), TokenSpool(np.int8), [], _table_digest(columns)
    for start in range(0, len(table), HASHED_ROWS):
        rows = table[start:start + HASHED_ROWS]
        _hash_rows(digest, rows, columns)
        texts, pairs = rows[text_column], rows[text_pair_column] if text_pair_column else None
        for name, col in ((text_column, texts), (text_pair_column, pairs)):
            if col is not None and any(not isinstance(t, str) for t in col):
                raise TedcacheError(f"{source}: column '{name}' has empty or non-text rows; drop or fill them")
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        lengths.append(np.fromiter(map(len, enc["input_ids"]), dtype=np.int64, count=len(texts)))
        ids.extend(t for row in enc["input_ids"] for t in row)
        if "token_type_ids" in enc:
            types.extend(t for row in enc["token_type_ids"] for t in row)
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return Examples(ids.array(), offsets, types.array() if types.count else None, labels,
                    fingerprint=digest.hexdigest() + _hash_array(labels))


def _hash_array(values: np.ndarray, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    for start in range(0, len(values), chunk):  # (a memory-mapped array is read a chunk at a time)
        digest.update(np.ascontiguousarray(values[start:start + chunk]).tobytes())
    return digest.hexdigest()[:16]


def resolve_label_names(table, label_column: str, model_config) -> list[str]:
    """The label set: the model's own names when the data uses them, else names from the data,
    checked against the model's number of labels."""
    num_labels = model_config.num_labels if model_config is not None else None
    model_names = [model_config.id2label[i] for i in range(num_labels)] if num_labels else None
    values = [v for v in table[label_column][:] if not _missing(v)]
    if model_names and (not values or all(isinstance(v, str) for v in values) and set(values) <= set(model_names)):
        return model_names
    names = label_names_from_data(table, label_column)
    if num_labels is None:
        return names
    if all(n.isdigit() for n in names):  # integer labels: encode_labels checks the range
        return model_names if not _generic(model_names) else [str(i) for i in range(num_labels)]
    if len(names) != num_labels:
        raise TedcacheError(f"the data has {len(names)} labels {names[:5]} but the model has {num_labels}; "
                            "fine-tune a model on this label set first (tedcache finetune)")
    return names


def _generic(names: list[str]) -> bool:
    return all(n == f"LABEL_{i}" for i, n in enumerate(names))


def load_examples(paths: list[str], cfg, tokenizer, label_names: list[str] | None, source: str,
                  limit: int | None = None, model_config=None,
                  unlabelled: str = "refuse") -> tuple[Examples, list[str] | None]:
    """Read one split, check it, encode labels and tokenize. With label_names=None (classification)
    the label set is resolved from the data and model_config; returns (examples, label_names).
    `unlabelled`: "refuse" empty labels, "allow" them (see encode_labels), or "all": the files are
    unlabelled text and need no label column."""
    table = load_table(paths, (cfg.text_column, cfg.label_column))
    label_column = None if unlabelled == "all" else cfg.label_column
    if cfg.task != "question-answering":  # (its columns are checked by tedcache.qa)
        check_columns(table, [cfg.text_column, cfg.text_pair_column, label_column], source)
    if limit is not None and limit < len(table):
        table = table.select(range(limit))
    if cfg.task == "question-answering":
        if unlabelled == "all":
            raise TedcacheError(f"{source}: question-answering takes no unlabelled transfer data; give questions "
                                "with answers (an empty answer list marks an unanswerable one)")
        return load_questions(table, cfg, tokenizer, source), None
    if cfg.task == "token-classification":
        if label_names is None:
            label_names = tag_names(table, label_column, model_config, source)
        return tokenize_words(table, tokenizer, cfg.text_column, label_column, label_names, cfg.max_length,
                              source), label_names
    if label_column is None:
        labels = np.full(len(table), np.nan if cfg.task == "regression" else -1,
                         dtype=np.float32 if cfg.task == "regression" else np.int64)
        examples = tokenize(table, tokenizer, cfg.text_column, cfg.text_pair_column, cfg.max_length, labels, source)
        return examples, label_names
    if cfg.task == "classification" and label_names is None:
        label_names = resolve_label_names(table, cfg.label_column, model_config)
    labels = encode_labels(table, cfg.label_column, cfg.task, label_names, source, allow_missing=unlabelled == "allow")
    examples = tokenize(table, tokenizer, cfg.text_column, cfg.text_pair_column, cfg.max_length, labels, source)
    return examples, label_names


def tag_names(table, tag_column: str | None, model_config, source: str) -> list[str]:
    """Token-classification label set: the model's names when the data's tags are among them, else the
    data's tags sorted (an untrained head's generic LABEL_i names are not a label set)."""
    num_labels = model_config.num_labels if model_config is not None else None
    model_names = [model_config.id2label[i] for i in range(num_labels)] if num_labels else None
    if tag_column is None:
        if model_names is None or _generic(model_names):
            raise TedcacheError(f"{source} has no tags and the model names no labels; give tagged training data")
        return model_names
    seen = sorted({t for row in table[tag_column] for t in row or []})
    if any(not isinstance(t, str) for t in seen):
        raise TedcacheError(f"{source}: column '{tag_column}' must hold lists of tag names (strings)")
    if model_names and not _generic(model_names) and set(seen) <= set(model_names):
        return model_names
    if model_names and not _generic(model_names):
        raise TedcacheError(f"{source}: tags {sorted(set(seen) - set(model_names))[:5]} are outside the model's "
                            f"label set {model_names[:8]}; fix the tags or fine-tune a model on them")
    return seen


def tokenize_words(table, tokenizer, word_column: str, tag_column: str | None, label_names: list[str],
                   max_length: int, source: str) -> Examples:
    """Pre-split words -> sub-tokens (truncated at `max_length`); each word's tag id on its first
    sub-token, IGNORED on the others and on special tokens (as HF's token-classification examples do).
    Without `tag_column` (unlabelled transfer rows) first sub-tokens are UNTAGGED."""
    index = {name: i for i, name in enumerate(label_names)}
    ids, types, tags, lengths = TokenSpool(np.int32), TokenSpool(np.int8), TokenSpool(np.int16), []
    digest = _table_digest([word_column, tag_column])
    for start in range(0, len(table), HASHED_ROWS):
        rows = table[start:start + HASHED_ROWS]
        _hash_rows(digest, rows, [word_column, tag_column])
        words = rows[word_column]
        if any(not isinstance(w, list) or not all(isinstance(x, str) for x in w) for w in words):
            raise TedcacheError(f"{source}: column '{word_column}' must hold lists of words (strings) for "
                                "--task token-classification")
        row_tags = rows[tag_column] if tag_column else [None] * len(words)
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
        for row, (sentence, sentence_tags) in enumerate(zip(words, row_tags)):
            if sentence_tags is not None and len(sentence_tags) != len(sentence):
                raise TedcacheError(f"{source}: row {start + row} has {len(sentence)} words but "
                                    f"{len(sentence_tags)} tags; give one tag per word")
            unknown = sorted({t for t in sentence_tags or [] if t not in index})
            if unknown:
                raise TedcacheError(f"{source}: tags {unknown[:5]} are outside the label set {label_names[:8]}; "
                                    "fix the tags or use a model trained on this label set")
            tags.extend(_first_subtoken_tags(enc.word_ids(row), sentence_tags, index))
            lengths.append(len(enc["input_ids"][row]))
        ids.extend(t for row in enc["input_ids"] for t in row)
        if "token_type_ids" in enc:
            types.extend(t for row in enc["token_type_ids"] for t in row)
    token_labels = tags.array()
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    fingerprint = digest.hexdigest() + _hash_array(token_labels)
    return Examples(ids.array(), offsets, types.array() if types.count else None, None, fingerprint, token_labels)


def _first_subtoken_tags(word_ids: list[int | None], sentence_tags: list[str] | None, index: dict[str, int]):
    """Per sub-token: its word's tag id on the word's first sub-token (UNTAGGED without tags), IGNORED
    elsewhere and on special tokens."""
    previous = None
    for word in word_ids:
        first = word is not None and word != previous
        yield IGNORED if not first else UNTAGGED if sentence_tags is None else index[sentence_tags[word]]
        previous = word


def load_questions(table, cfg, tokenizer, source: str):
    """Rows of question / context / answers -> an Examples of windows (see tedcache.qa), with
    per token its character span in the context (`context_spans`), per window its question
    (`question_index`), and per question its id, context and gold answer texts (`questions`)."""
    question_col, context_col, answer_col = question_columns(cfg)
    id_col = "id" if "id" in table.column_names else None
    check_columns(table, [question_col, context_col, answer_col], source)
    if not tokenizer.is_fast:
        raise TedcacheError("question-answering needs a fast tokenizer (it maps tokens to characters); "
                            "save the model with its tokenizer.json")
    stride = doc_stride(cfg)
    if stride >= cfg.max_length // 2:
        raise TedcacheError(f"--doc-stride ({stride}) must be below half of --max-length "
                            f"({cfg.max_length}); e.g. --doc-stride {cfg.max_length // 3}")
    columns = [id_col, question_col, context_col, answer_col]
    ids, types, spans = TokenSpool(np.int32), TokenSpool(np.int8), TokenSpool(np.int32)  # spans: 2 a token
    lengths, labels, owner, questions, digest = [], [], [], [], _table_digest(columns)
    for first in range(0, len(table), HASHED_ROWS):
        rows = table[first:first + HASHED_ROWS]
        _hash_rows(digest, rows, columns)
        for name in (question_col, context_col):
            if any(not isinstance(t, str) or not t for t in rows[name]):
                raise TedcacheError(f"{source}: column '{name}' has empty or non-text rows; drop or fill them")
        try:
            enc = tokenizer(rows[question_col], rows[context_col], truncation="only_second",
                            max_length=cfg.max_length, stride=stride, return_overflowing_tokens=True,
                            return_offsets_mapping=True)
        except Exception as exc:  # the tokenizers library raises a bare Exception when a question leaves no room
            raise TedcacheError(f"{source}: a question leaves no room for its context in --max-length "
                                f"{cfg.max_length} with --doc-stride {stride}; raise --max-length or "
                                f"lower --doc-stride ({str(exc).splitlines()[0][:80]})") from exc
        answers = [checked_answers(value, first + i, context, source)
                   for i, (value, context) in enumerate(zip(rows[answer_col], rows[context_col]))]
        for i, (context, (texts, _)) in enumerate(zip(rows[context_col], answers)):
            row_id = str(rows[id_col][i]) if id_col else str(first + i)
            questions.append({"id": row_id, "context": context, "answers": texts})
        for window, row in enumerate(enc["overflow_to_sample_mapping"]):
            in_context = np.asarray([s == 1 for s in enc.sequence_ids(window)])
            offsets = np.asarray(enc["offset_mapping"][window], dtype=np.int32).reshape(-1, 2)
            window_spans = np.where(in_context[:, None], offsets, NOT_CONTEXT).astype(np.int32)
            texts, starts = answers[row]
            labels.append(answer_tokens(window_spans, starts[0], starts[0] + len(texts[0])) if texts
                          else (NO_ANSWER, NO_ANSWER))
            ids.extend(np.asarray(enc["input_ids"][window]))
            if "token_type_ids" in enc:
                types.extend(np.asarray(enc["token_type_ids"][window]))
            spans.extend(window_spans.ravel())
            lengths.append(len(enc["input_ids"][window]))
            owner.append(first + row)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1, 2)
    fingerprint = digest.hexdigest() + f"-stride{stride}" + _hash_array(labels)
    return Examples(ids.array(), np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
                    types.array() if types.count else None, labels, fingerprint,
                    context_spans=spans.array().reshape(-1, 2), question_index=np.asarray(owner, dtype=np.int64),
                    questions=questions)


def concatenate(first: Examples, second: Examples) -> Examples:
    """`first`'s examples followed by `second`'s (a training split and its unlabelled transfer text)."""
    if (first.token_type_ids is None) != (second.token_type_ids is None):
        raise TedcacheError("the training and transfer data were tokenized differently (token types); "
                            "give both the same columns")
    def joined(a, b):  # per-token arrays, joined in a spool (they may be memory-mapped)
        if a is None:
            return None
        spool = TokenSpool(a.dtype)
        for part in (a, b):
            for begin in range(0, len(part), 1 << 20):
                spool.extend(part[begin:begin + (1 << 20)])
        return spool.array()

    labels = None if first.labels is None else np.concatenate([first.labels, second.labels.astype(first.labels.dtype)])
    types, tags = joined(first.token_type_ids, second.token_type_ids), joined(first.token_labels, second.token_labels)
    return Examples(joined(first.input_ids, second.input_ids),
                    np.concatenate([first.offsets, first.offsets[-1] + second.offsets[1:]]), types, labels,
                    hashlib.sha256((first.fingerprint + second.fingerprint).encode()).hexdigest(), tags)


def load_blocks(paths: list[str], cfg, tokenizer, source: str, limit: int | None = None) -> Examples:
    """Causal-LM data: every row of the text column is a document; documents are tokenized without
    special tokens, each followed by the EOS token, concatenated, and cut into blocks of
    `cfg.block_size` tokens (the last, partial block is dropped). A block may span a document boundary:
    attention crosses it, as in the usual packed pre-training, and the EOS token marks it."""
    table = load_table(paths)
    check_columns(table, [cfg.text_column], source)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TedcacheError("the tokenizer has no EOS token to mark document boundaries; set one "
                            "(tokenizer.eos_token) in the teacher folder")
    size = cfg.block_size
    ids, digest = TokenSpool(np.int32), _table_digest([cfg.text_column])
    for start in range(0, len(table), HASHED_ROWS):
        texts = table[start:start + HASHED_ROWS][cfg.text_column]
        _hash_rows(digest, {cfg.text_column: texts}, [cfg.text_column])  # every row, --limit or not
        if limit is not None and ids.count >= limit * size:
            continue
        if any(not isinstance(t, str) for t in texts):
            raise TedcacheError(f"{source}: column '{cfg.text_column}' has empty or non-text rows; drop or fill them")
        ids.extend(t for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in (*row, eos))
    blocks = ids.count // size
    if limit is not None:
        blocks = min(blocks, limit)
    if blocks == 0:
        raise TedcacheError(f"{source} holds {ids.count} tokens, fewer than one block of {size}; "
                            "lower --block-size or give more text")
    input_ids = ids.array(blocks * size)
    offsets = np.arange(0, blocks * size + 1, size, dtype=np.int64)
    fingerprint = digest.hexdigest() + f"-{blocks}x{size}-eos{eos}"
    return Examples(input_ids, offsets, None, None, fingerprint)
