import numpy as np
import pytest
from helpers.builders import make_tokenizer, sentiment_rows, write_rows

from tedcache.config import DataConfig
from tedcache.data import load_examples
from tedcache.errors import TedcacheError
from tedcache.taps import parse_layers


def test_parse_layers_rules():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("every:2", 12) == [1, 3, 5, 7, 9, 11]  # TED: (i+1) % k == 0
    assert parse_layers("every:3", 6) == [2, 5]
    assert parse_layers("0,5", 6) == [0, 5]
    for bad in ("every:0", "every:x", "5,0", "0,9", "a,b", ""):
        with pytest.raises(TedcacheError):
            parse_layers(bad, 6)


def test_tokenized_examples_are_flat_and_reorder(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok")
    rows = sentiment_rows(20, seed=3)
    path = write_rows(tmp_path / "d.csv", rows)
    examples, names = load_examples([str(path)], DataConfig(train=[str(path)], max_length=8), tokenizer, None, "--data")
    assert names == ["0", "1"] and len(examples) == 20
    assert examples.num_tokens == len(examples.input_ids)
    direct = tokenizer(rows[4]["text"], truncation=True, max_length=8)["input_ids"]
    assert examples.input_ids[examples.offsets[4]:examples.offsets[5]].tolist() == direct
    order = np.array([4, 0, 19])
    sub = examples.reorder(order)
    assert sub.input_ids[: sub.offsets[1]].tolist() == direct
    assert sub.labels.tolist() == [rows[i]["label"] for i in order]


def test_string_labels_and_label_set_checks(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok")
    rows = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}]
    path = write_rows(tmp_path / "s.csv", rows)
    cfg = DataConfig(train=[str(path)])
    examples, names = load_examples([str(path)], cfg, tokenizer, None, "--data")
    assert names == ["neg", "pos"] and examples.labels.tolist() == [1, 0]
    other = write_rows(tmp_path / "o.csv", [{"text": "dull", "label": "meh"}])
    with pytest.raises(TedcacheError, match="outside the label set"):
        load_examples([str(other)], cfg, tokenizer, names, "--eval-data")


def test_fingerprint_follows_content(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok")
    a = write_rows(tmp_path / "a.csv", sentiment_rows(10, seed=1))
    b = write_rows(tmp_path / "b.csv", sentiment_rows(10, seed=2))
    cfg = DataConfig(train=[str(a)])
    fa = load_examples([str(a)], cfg, tokenizer, None, "x")[0].fingerprint
    assert fa == load_examples([str(a)], cfg, tokenizer, None, "x")[0].fingerprint
    assert fa != load_examples([str(b)], cfg, tokenizer, None, "x")[0].fingerprint
