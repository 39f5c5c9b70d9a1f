"""The extraction benchmark's reference: the teacher's bare forward over exactly the extraction's batches."""

from __future__ import annotations

import torch
from torch.nn.modules.module import register_module_forward_hook
from transformers.models.bert.modeling_bert import BertEmbeddings

from tedcache.bench import bare_forward_seconds
from tedcache.cache import Cache
from tedcache.config import DataConfig, ExtractConfig
from tedcache.extraction import extract


def test_bare_forward_batches_exactly_as_extraction(assets, tmp_path):
    shapes = []

    def record(module, args, output):
        if isinstance(module, BertEmbeddings):
            shapes.append((tuple(output.shape[:2]), torch.is_grad_enabled()))

    # raw states: no Stage I, so every teacher forward is the teacher pass (int8 calibration on unit 0 included)
    cfg = ExtractConfig(teacher=str(assets["teacher"]), states="raw", shard_tokens=256, batch_size=16,
                        data=DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], max_length=32),
                        cache_dir=str(tmp_path / "caches"))
    handle = register_module_forward_hook(record)
    try:
        cache = extract(cfg)
        extraction = list(shapes)
        shapes.clear()
        seconds = bare_forward_seconds(cfg, cache)
    finally:
        handle.remove()

    meta = Cache(cache).metadata
    assert meta.units["train"] > 2  # several units, so the calibration unit is one of many
    assert shapes == extraction and not any(grad for _, grad in shapes)
    assert sum(size for (size, _), _ in shapes) == sum(meta.splits.values())
    assert 0 < seconds and 0 < meta.timings["teacher_pass_s"] < meta.timings["total_s"]
