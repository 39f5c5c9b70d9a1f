"""HostCopies: a unit's results reach the host whole and in order. On a CPU they are there already; on a
GPU (examples/gpu/run.sh runs this file there) they are copied on a side stream into pinned memory, and
an extraction on the GPU writes the cache value for value whether the copies overlap the next unit or not."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tedcache import DataConfig, ExtractConfig, extract
from tedcache.cache import Cache
from tedcache.cache.codecs import EncodedStates
from tedcache.cache.host_copies import HostCopies

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _unit(device: str, unit: int):
    torch.manual_seed(unit)
    values = torch.randint(-127, 128, (50, 8), dtype=torch.int8, device=device)
    moments = [50, torch.randn(8, dtype=torch.float64, device=device), torch.tensor(3.5, device=device)]
    encoded = {0: EncodedStates(values, torch.rand(50, device=device).half(), moments)}
    return ("train", unit, torch.randn(4, 2, device=device), {"ids": torch.arange(5, device=device)}, encoded)


@pytest.mark.parametrize("device", DEVICES)
def test_every_unit_lands_whole_on_the_host_in_order(device):
    copies = HostCopies(torch.device(device))
    landed = []
    for unit in range(3):
        landed += copies.push(_unit(device, unit))
        # a GPU holds back the unit it is copying (its copy overlaps the next unit); a CPU holds nothing
        assert len(landed) == (unit if device == "cuda" else unit + 1)
    landed += copies.drain()
    assert [u for _, u, *_ in landed] == [0, 1, 2]
    for unit, (split, number, outputs, rows, encoded) in enumerate(landed):
        want = _unit(device, unit)
        assert split == "train" and number == unit and outputs.device.type == "cpu"
        assert torch.equal(outputs, want[2].cpu()) and torch.equal(rows["ids"], want[3]["ids"].cpu())
        got, expected = encoded[0], want[4][0]
        assert torch.equal(got.values, expected.values.cpu()) and got.values.is_pinned() == (device == "cuda")
        assert got.moments[0] == 50 and torch.equal(got.moments[1], expected.moments[1].cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the side stream exists only there")
def test_a_gpu_extraction_writes_the_same_cache_with_the_copies_overlapped_or_not(assets, tmp_path, monkeypatch):
    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], max_length=24)
    cfg = ExtractConfig(teacher=str(assets["teacher"]), data=data, cache_dir=str(tmp_path / "overlapped"),
                        states="raw", precision="int8", batch_size=16, shard_tokens=128, dtype="fp32", device="cuda")
    overlapped = Cache(extract(cfg))
    # the same extraction with every unit waited for at once: HostCopies as on a CPU
    monkeypatch.setattr(HostCopies, "push", lambda self, results: [torch.utils._pytree.tree_map(
        lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, results)])
    waited = Cache(extract(replace(cfg, cache_dir=str(tmp_path / "waited"))))
    assert overlapped.metadata.units["train"] > 2
    for layer in overlapped.metadata.layers:
        a, b = (c.split("train").states(layer, 0, 1 << 20)[0] for c in (overlapped, waited))
        np.testing.assert_array_equal(a, b)
