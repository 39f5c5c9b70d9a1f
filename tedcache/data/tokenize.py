"""One tokenizer per task: text (pairs), pre-split words with tags, and packed causal-LM blocks;
`load_examples` reads, checks and tokenizes one split."""

from __future__ import annotations

import numpy as np

from ..errors import TedcacheError
from .examples import IGNORED, UNTAGGED, Examples, TokenSpool
from .files import check_columns, load_table
from .fingerprint import HASHED_ROWS, hash_array, hash_rows, table_digest
from .labels import encode_labels, resolve_label_names, tag_names
from .questions import load_questions


def tokenize(table, tokenizer, text_column: str, text_pair_column: str | None, max_length: int,
             labels: np.ndarray, source: str) -> Examples:
    """Tokenize (truncating, no padding) into flat CSR arrays, HASHED_ROWS rows at a time, in one pass
    that also fingerprints the texts; tokens go to memory-mapped spools (TokenSpool)."""
    columns = [text_column, text_pair_column]
    ids, types, lengths, digest = TokenSpool(np.int32), TokenSpool(np.int8), [], table_digest(columns)
    for start in range(0, len(table), HASHED_ROWS):
        rows = table[start:start + HASHED_ROWS]
        hash_rows(digest, rows, columns)
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
                    fingerprint=digest.hexdigest() + hash_array(labels))


def load_examples(paths: list[str], cfg, tokenizer, label_names: list[str] | None, source: str,
                  limit: int | None = None, model_config=None,
                  unlabelled: str = "refuse") -> tuple[Examples, list[str] | None]:
    """Read one split, check it, encode labels and tokenize. With label_names=None (classification)
    the label set is resolved from the data and model_config; returns (examples, label_names).
    `unlabelled`: "refuse" empty labels, "allow" them (see encode_labels), or "all": the files are
    unlabelled text and need no label column."""
    table = load_table(paths, (cfg.text_column, cfg.label_column))
    label_column = None if unlabelled == "all" else cfg.label_column
    if cfg.task != "question-answering":  # (its columns are checked by load_questions)
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


def tokenize_words(table, tokenizer, word_column: str, tag_column: str | None, label_names: list[str],
                   max_length: int, source: str) -> Examples:
    """Pre-split words -> sub-tokens (truncated at `max_length`); each word's tag id on its first
    sub-token, IGNORED on the others and on special tokens (as HF's token-classification examples do).
    Without `tag_column` (unlabelled transfer rows) first sub-tokens are UNTAGGED."""
    index = {name: i for i, name in enumerate(label_names)}
    ids, types, tags, lengths = TokenSpool(np.int32), TokenSpool(np.int8), TokenSpool(np.int16), []
    digest = table_digest([word_column, tag_column])
    for start in range(0, len(table), HASHED_ROWS):
        rows = table[start:start + HASHED_ROWS]
        hash_rows(digest, rows, [word_column, tag_column])
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
    fingerprint = digest.hexdigest() + hash_array(token_labels)
    return Examples(ids.array(), offsets, types.array() if types.count else None, None, fingerprint, token_labels)


def _first_subtoken_tags(word_ids: list[int | None], sentence_tags: list[str] | None, index: dict[str, int]):
    """Per sub-token: its word's tag id on the word's first sub-token (UNTAGGED without tags), IGNORED
    elsewhere and on special tokens."""
    previous = None
    for word in word_ids:
        first = word is not None and word != previous
        yield IGNORED if not first else UNTAGGED if sentence_tags is None else index[sentence_tags[word]]
        previous = word


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
    ids, digest = TokenSpool(np.int32), table_digest([cfg.text_column])
    for start in range(0, len(table), HASHED_ROWS):
        texts = table[start:start + HASHED_ROWS][cfg.text_column]
        hash_rows(digest, {cfg.text_column: texts}, [cfg.text_column])  # every row, --limit or not
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
