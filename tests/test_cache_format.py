"""The cache package's seams: the writer takes computed tensors, the reader gives them back, the metadata
is a checked schema, and a cache's identity covers the tokenizer's whole definition."""

from __future__ import annotations

import json
import shutil
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertTokenizerFast

from tedcache import DataConfig, ExtractConfig, OptimConfig, extract
from tedcache.cache import Cache, CacheMetadata, CacheWriter, Location, UnitStates, load_metadata, verify
from tedcache.data import Examples
from tedcache.errors import TedcacheError
from tedcache.models import tokenizer_hash, vocab_hash


def _metadata(**changes) -> CacheMetadata:
    base = CacheMetadata(format_version=0, identity={"by": "hand"}, created_by="test", task="classification",
                         states="filtered", layers=[0, 2], filter_dim=3, teacher="none", teacher_weights_sha256="w",
                         tokenizer_vocab_sha256="v", pad_token_id=0, precision="fp32", seed=5, shard_tokens=8,
                         chunk_tokens=0, label_names=["a", "b"], num_outputs=2)
    return replace(base, **changes)


def test_writer_takes_tensors_and_the_reader_gives_them_back(tmp_path):
    # three examples of 5, 2 and 4 tokens; shards of 8 tokens: the third cannot join the first shard
    examples = Examples(np.arange(1, 12, dtype=np.int32), np.array([0, 5, 7, 11]), None, np.array([1, 0, 1]), "fp")
    location = Location(str(tmp_path / "c"))
    writer = CacheWriter.create(location, _metadata())
    writer.write_inputs("train", examples)
    writer.create_state_arrays(3)
    writer.finish_inputs()
    stored = writer.in_storage_order("train", examples)
    bounds = writer.unit_bounds("train")
    assert writer.missing_units() == {"train": list(range(len(bounds) - 1))}
    expected = {}
    for unit in range(len(bounds) - 1):
        first, last = bounds[unit], bounds[unit + 1]
        tokens = int(stored.offsets[last] - stored.offsets[first])
        states = {layer: torch.randn(tokens, 3) for layer in (0, 2)}
        expected[unit] = states
        encoded = {}
        for layer, values in states.items():
            unit_states = UnitStates("fp32", None, torch.device("cpu"))
            unit_states.add(values)
            encoded[layer] = unit_states.finish()
        writer.write_unit("train", unit, {"logits": [[float(unit), 1.0]] * int(last - first)}, encoded)
    writer.complete(timings={"total_s": 1.0})
    cache = Cache(location.url)
    split = cache.split("train")
    assert cache.metadata.complete and cache.metadata.timings == {"total_s": 1.0} and verify(location.url) == []
    np.testing.assert_array_equal(split.example_ids, np.argsort(np.argsort(split.example_ids)))  # a permutation
    for unit, states in expected.items():
        first, last = bounds[unit], bounds[unit + 1]
        start = int(split.starts[first])
        stop = int(split.starts[last - 1] + split.lengths[last - 1])
        for layer, values in states.items():
            stored_values, scales = split.states(layer, start, stop)
            assert scales is None
            torch.testing.assert_close(torch.from_numpy(stored_values), values)
        np.testing.assert_array_equal(split.teacher_logits[first:last, 0], unit)
    # tokens come back in storage order: example i of the split is source row example_ids[i]
    for i, row in enumerate(split.example_ids):
        a, b = int(split.starts[i]), int(split.starts[i] + split.lengths[i])
        np.testing.assert_array_equal(split.tokens("input_ids", a, b), examples.input_ids[examples.offsets[row]:
                                                                                          examples.offsets[row + 1]])


def _rewrite_metadata(path: Path, **changes) -> None:
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["tedcache"].update(changes)
    meta_file.write_text(json.dumps(meta))


@pytest.fixture()
def hand_cache(tmp_path) -> Path:
    location = Location(str(tmp_path / "c"))
    writer = CacheWriter.create(location, _metadata(layers=[]))
    writer.write_inputs("train", Examples(np.arange(4, dtype=np.int32), np.array([0, 2, 4]), None, np.array([0, 1]), "f"))
    writer.finish_inputs()
    for unit in range(len(writer.unit_bounds("train")) - 1):
        writer.write_unit("train", unit, {"logits": [[0.0, 1.0]] * 2})
    writer.complete()
    return Path(location.url)


@pytest.mark.parametrize("change, needles", [
    ({"layers": "0,2"}, ["layers", "list", "rebuild"]),
    ({"surprise": 1}, ["surprise", "rebuild"]),
    ({"format_version": 2}, ["format 2", "extract --force"]),
])
def test_metadata_is_checked_when_read(hand_cache, change, needles):
    assert Cache(str(hand_cache)).metadata.layers == []
    _rewrite_metadata(hand_cache, **change)
    with pytest.raises(TedcacheError) as error:
        Cache(str(hand_cache))
    for needle in needles:
        assert needle in str(error.value)


def test_metadata_round_trips_through_its_dict(hand_cache):
    meta = load_metadata(str(hand_cache))
    stored = json.loads((hand_cache / "zarr.json").read_text())["attributes"]["tedcache"]
    assert meta.to_dict() == stored and CacheMetadata.from_dict(stored) == meta
    with pytest.raises(FrozenInstanceError):  # frozen: a reader cannot change what the cache says about itself
        meta.complete = False


def test_same_vocabulary_other_normalisation_is_another_cache(assets, tmp_path):
    """Two tokenizers with one vocabulary, one lower-casing and one not, turn the same text into other ids."""
    cased = tmp_path / "teacher-cased"
    shutil.copytree(assets["teacher"], cased)
    lowercase = AutoTokenizer.from_pretrained(assets["teacher"])
    BertTokenizerFast(vocab=lowercase.get_vocab(), do_lower_case=False).save_pretrained(cased)
    reloaded = AutoTokenizer.from_pretrained(cased)
    assert vocab_hash(reloaded) == vocab_hash(lowercase)  # a student of either may read either cache...
    assert tokenizer_hash(reloaded) != tokenizer_hash(lowercase)  # ...but they are not the same cache
    assert tokenizer_hash(AutoTokenizer.from_pretrained(assets["teacher"])) == tokenizer_hash(lowercase)
    data = DataConfig(train=[str(assets["train"])], max_length=24)
    paths = [extract(ExtractConfig(teacher=str(teacher), data=data, cache_dir=str(tmp_path / "caches"),
                                   stage1=OptimConfig(epochs=0.2, batch_size=16), precision="fp16"))
             for teacher in (assets["teacher"], cased)]
    assert paths[0].rsplit("-", 1)[1] != paths[1].rsplit("-", 1)[1]
    saved = load_metadata(paths[1])
    assert saved.tokenizer_sha256 == tokenizer_hash(reloaded) and saved.config["precision"] == "fp16"
