"""init-student's three constructions (copy, random, prune) on tiny BERT and Llama models, the layer maps
that follow a student's provenance, and the refusals of shapes a model cannot take."""

import json

import pytest
import torch
from helpers.builders import documents, make_lm
from helpers.caches import extract_classifier
from helpers.commands import run_cli
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

from tedcache import DataConfig, DistillConfig, OptimConfig, TedcacheError, distill
from tedcache.config import FilterConfig, StudentConfig
from tedcache.layer_maps import map_layers
from tedcache.models import load_tokenizer
from tedcache.students import COPIED_FROM, ORIGIN, init_student


def _batch(assets, texts=("the movie was good", "a dull and boring plot was bad")):
    tokenizer = load_tokenizer(str(assets["teacher"]))
    return tokenizer(list(texts), padding=True, return_tensors="pt")


def _logits(folder, batch, auto=AutoModelForSequenceClassification, hooks=()):
    model = auto.from_pretrained(folder).eval()
    handles = [module.register_forward_pre_hook(hook) for name, module in model.named_modules()
               for suffix, hook in hooks if name.endswith(suffix)]
    with torch.no_grad():
        logits = model(**batch).logits
    for handle in handles:
        handle.remove()
    return logits


def test_a_random_student_takes_the_source_kind_vocabulary_and_projected_embeddings(assets, tmp_path):
    cfg = StudentConfig(source=str(assets["teacher"]), out=str(tmp_path / "r"), init="random", depth=2, width=16,
                        heads=2, ffn=40, seed=3)
    student = AutoModelForSequenceClassification.from_pretrained(init_student(cfg))
    teacher = AutoModelForSequenceClassification.from_pretrained(assets["teacher"])
    config = student.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size) == \
        (2, 16, 2, 40)
    assert config.vocab_size == teacher.config.vocab_size and not hasattr(config, COPIED_FROM)
    assert getattr(config, ORIGIN) == {"init": "random", "source": cfg.source, "depth": 2, "width": 16, "heads": 2,
                                       "kv_heads": 2, "head_size": 8, "ffn": 40, "embeddings": "teacher", "seed": 3}
    # the projection onto the top 16 principal directions keeps exactly their share of the variance
    tokens = teacher.get_input_embeddings().weight.detach()
    projected = student.get_input_embeddings().weight.detach()
    top = torch.linalg.svdvals(tokens - tokens.mean(0))[:16]
    assert torch.allclose((projected - projected.mean(0)).pow(2).sum(), top.pow(2).sum(), rtol=1e-4)
    assert student.bert.embeddings.position_embeddings.weight.shape == (64, 16)
    # the same seed makes the same student; --embeddings random leaves the tables random
    again = AutoModelForSequenceClassification.from_pretrained(init_student(
        StudentConfig(**{**cfg.__dict__, "out": str(tmp_path / "r2")})))
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values()))
    fresh = AutoModelForSequenceClassification.from_pretrained(init_student(
        StudentConfig(**{**cfg.__dict__, "out": str(tmp_path / "r3"), "embeddings": "random"})))
    assert not torch.allclose(fresh.get_input_embeddings().weight, projected)
    full_width = AutoModelForSequenceClassification.from_pretrained(init_student(
        StudentConfig(source=str(assets["teacher"]), out=str(tmp_path / "r4"), init="random", depth=1)))
    assert torch.equal(full_width.get_input_embeddings().weight, tokens)


def silence(kept_channels: list[int]):
    """A forward pre-hook zeroing every input channel of a linear map but `kept_channels`."""
    def hook(module, args):
        mask = torch.zeros(args[0].shape[-1])
        mask[kept_channels] = 1
        return (args[0] * mask,)
    return hook


def test_pruning_nothing_gives_the_source_and_pruning_neurons_equals_silencing_them(assets, tmp_path):
    data = DataConfig(train=[str(assets["train"])], max_length=24)
    batch = _batch(assets)
    whole = init_student(StudentConfig(source=str(assets["teacher"]), out=str(tmp_path / "all"), init="prune",
                                       data=data))
    assert torch.allclose(_logits(whole, batch), _logits(assets["teacher"], batch), atol=1e-6)

    # the same width and heads, half of the FFN neurons per layer: the teacher with the dropped neurons'
    # outputs set to zero computes the same logits
    narrow = init_student(StudentConfig(source=str(assets["teacher"]), out=str(tmp_path / "narrow"), init="prune",
                                        ffn=48, data=data, calibration_examples=32))
    origin = getattr(AutoModelForSequenceClassification.from_pretrained(narrow).config, ORIGIN)
    assert origin["init"] == "prune" and origin["layers"] == [0, 1, 2, 3] and origin["calibration_examples"] == 32
    kept = origin["kept"]
    assert kept["hidden"] == list(range(48)) and kept["heads"] == [[0, 1]] * 4 and [len(f) for f in kept["ffn"]] == [48] * 4
    hooks = [(f"layer.{i}.output.dense", silence(kept["ffn"][i])) for i in range(4)]
    assert torch.allclose(_logits(narrow, batch), _logits(assets["teacher"], batch, hooks=hooks), atol=1e-5)


def test_pruning_drops_what_is_silent_on_the_calibration_sample(assets, tmp_path):
    """Zeroed weights make a head, FFN neurons and hidden channels silent: their importance is zero, so
    pruning drops exactly them; the kept weights are the source's rows and columns."""
    teacher = AutoModelForSequenceClassification.from_pretrained(assets["teacher"])
    with torch.no_grad():
        for layer in teacher.bert.encoder.layer:
            layer.attention.self.value.weight[:24] = 0  # head 0 outputs nothing
            layer.attention.self.value.bias[:24] = 0
            layer.intermediate.dense.weight[:48] = 0  # neurons 0..47: GELU(0) = 0
            layer.intermediate.dense.bias[:48] = 0
        for module in teacher.modules():
            if isinstance(module, torch.nn.LayerNorm):  # channels 0..23 are zero after every norm
                module.weight[:24] = 0
                module.bias[:24] = 0
    teacher.save_pretrained(tmp_path / "silent")
    load_tokenizer(str(assets["teacher"])).save_pretrained(tmp_path / "silent")
    out = init_student(StudentConfig(source=str(tmp_path / "silent"), out=str(tmp_path / "s"), init="prune",
                                     width=24, heads=1, ffn=48, layers=[1, 3],
                                     data=DataConfig(train=[str(assets["train"])], max_length=24)))
    student = AutoModelForSequenceClassification.from_pretrained(out)
    kept = getattr(student.config, ORIGIN)["kept"]
    assert kept == {"hidden": list(range(24, 48)), "heads": [[1], [1]], "ffn": [list(range(48, 96))] * 2}
    assert getattr(student.config, COPIED_FROM) == [1, 3] and student.config.num_hidden_layers == 2
    source, pruned = teacher.bert.encoder.layer[3], student.bert.encoder.layer[1]
    assert torch.equal(pruned.attention.self.query.weight, source.attention.self.query.weight[24:, 24:])
    assert torch.equal(pruned.attention.output.dense.weight, source.attention.output.dense.weight[24:, 24:])
    assert torch.equal(pruned.intermediate.dense.weight, source.intermediate.dense.weight[48:, 24:])
    assert torch.equal(pruned.output.dense.weight, source.output.dense.weight[24:, 48:])
    assert torch.equal(student.classifier.weight, teacher.classifier.weight[:, 24:])
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight[:, 24:])


def test_a_llama_with_grouped_query_attention_is_pruned_by_whole_groups(tmp_path):
    source = make_lm(tmp_path / "llama", "llama", layers=4, hidden=32)  # 4 query heads sharing 2 key/value heads
    (tmp_path / "docs.txt").write_text("\n".join(documents(40, seed=1)))
    data = DataConfig(train=[str(tmp_path / "docs.txt")], task="causal-lm", block_size=16)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    whole = init_student(StudentConfig(source=str(source), out=str(tmp_path / "all"), init="prune", data=data))
    assert torch.allclose(_logits(whole, {"input_ids": ids}, AutoModelForCausalLM),
                          _logits(source, {"input_ids": ids}, AutoModelForCausalLM), atol=1e-5)
    # Llama sets its head size itself: one of two head groups and half the neurons, at the same width, is
    # the source with the dropped heads' and neurons' outputs set to zero
    narrow = init_student(StudentConfig(source=str(source), out=str(tmp_path / "narrow"), init="prune", heads=2,
                                        ffn=32, data=data))
    kept = getattr(AutoModelForCausalLM.from_pretrained(narrow).config, ORIGIN)["kept"]
    hooks = [hook for i in range(4) for hook in (
        (f"layers.{i}.self_attn.o_proj", silence([h * 8 + c for h in kept["heads"][i] for c in range(8)])),
        (f"layers.{i}.mlp.down_proj", silence(kept["ffn"][i])))]
    assert torch.allclose(_logits(narrow, {"input_ids": ids}, AutoModelForCausalLM),
                          _logits(source, {"input_ids": ids}, AutoModelForCausalLM, hooks), atol=1e-5)
    out = init_student(StudentConfig(source=str(source), out=str(tmp_path / "half"), init="prune", width=16, heads=2,
                                     ffn=32, layers=[0, 3], data=data))
    student = AutoModelForCausalLM.from_pretrained(out)
    config = student.config
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            config.intermediate_size, config.num_hidden_layers) == (16, 2, 1, 8, 32, 2)
    heads = getattr(config, ORIGIN)["kept"]["heads"]
    assert all(h in ([0, 1], [2, 3]) for h in heads)  # a key/value head goes with its two query heads
    assert student(input_ids=ids).logits.shape == (1, 6, config.vocab_size)
    with pytest.raises(TedcacheError, match="multiple of 2"):
        init_student(StudentConfig(source=str(source), out=str(tmp_path / "x"), init="prune", heads=3, data=data))


@pytest.mark.parametrize("flags, message", [
    (["--init", "random", "--width", "50", "--heads", "4"], "not divisible by --heads 4"),
    (["--init", "random", "--depth", "5"], "the source has 4 layers"),
    (["--init", "random", "--width", "64"], "--embeddings teacher needs --width at most the source's 48"),
    (["--init", "prune", "--width", "64", "--heads", "2"], "pruning only narrows"),
    (["--init", "prune", "--width", "24", "--heads", "2"], "give --heads 1"),
    (["--init", "prune", "--width", "24"], "needs --data"),
    (["--init", "copy"], "needs --layers"),
    (["--layers", "0,7"], "the source's layers are 0..3"),
    (["--init", "grow"], "unknown init 'grow'"),
])
def test_a_shape_the_model_cannot_take_is_one_line_and_no_folder(assets, tmp_path, flags, message):
    result = run_cli("init-student", "--from", assets["teacher"], "--out", tmp_path / "s", *flags)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "s").exists()


def test_a_model_whose_layers_prune_cannot_read_is_refused(tmp_path):
    config = GPT2Config(vocab_size=16, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(TedcacheError, match="'attn.c_attn' \\(Conv1D\\): use --init copy or random"):
        init_student(StudentConfig(source=str(tmp_path / "gpt2"), out=str(tmp_path / "s"), init="prune",
                                   data=DataConfig(train=["unused.txt"], task="causal-lm")))


def test_maps_that_follow_the_copy():
    # a 2-of-6 copy of layers 1 and 4: provenance pairs each student layer with the layer it carries
    assert map_layers([0, 1], [1, 4, 5], "provenance", 2, copied_from=[1, 4], teacher_total=6) == ([0, 1], [1, 4])
    assert map_layers([0, 1, 2], list(range(30)), "last:2", 3, teacher_total=30) == ([1, 2], [28, 29])
    assert map_layers([0], list(range(6)), "last:3", 15, teacher_total=6) == ([12, 13, 14], [3, 4, 5])
    with pytest.raises(TedcacheError, match="extract one with --layers 1,4,5"):
        map_layers([0, 1], [5], "provenance", 2, copied_from=[1, 4], teacher_total=6)
    # a cache of some of the carried layers: provenance pairs those (the rest are left out, and the log says so)
    assert map_layers([0, 1, 2, 3], [1, 3], "provenance", 4, copied_from=[0, 1, 2, 3], teacher_total=4) == ([1, 3],
                                                                                                          [1, 3])
    # auto: interval wherever it pairs every chosen student layer; else provenance for a student of recorded origin
    assert map_layers([0, 1], [2, 5], "auto", 2, copied_from=[0, 5], teacher_total=6) == ([0, 1], [2, 5])
    assert map_layers([0, 1, 2, 3], [1, 3], "auto", 4, copied_from=[0, 1, 2, 3], teacher_total=4) == ([1, 3], [1, 3])
    with pytest.raises(TedcacheError, match="cannot map 4 student layers"):
        map_layers([0, 1, 2, 3], [1, 3, 5], "auto", 4)
    with pytest.raises(TedcacheError, match="extract one with --layers 2,3,4,5"):
        map_layers([0, 1, 2], [2, 5], "last:3", 3, teacher_total=6)
    with pytest.raises(TedcacheError, match="init-student --init copy or prune"):
        map_layers([0, 1], [0, 1], "provenance", 2)
    for bad in ("last:0", "last:x", "last:4"):
        with pytest.raises(TedcacheError, match="K from 1 to 3"):
            map_layers([0, 1, 2], list(range(6)), bad, 3, teacher_total=6)


def test_a_narrow_random_student_distils_from_a_wide_teacher_cache(assets, tmp_path):
    """Filters handle any student width: a 16-wide random student learns from the 48-wide teacher's cache."""

    _, cache = extract_classifier(assets, tmp_path)
    student = init_student(StudentConfig(source=str(assets["teacher"]), out=str(tmp_path / "r"), init="random",
                                         depth=2, width=16, heads=2))
    report = distill(DistillConfig(cache=str(cache), student=str(student), out=str(tmp_path / "run"), method="ted",
                                   optim=OptimConfig(epochs=1, batch_size=16), stage1=OptimConfig(epochs=1),
                                   max_steps=2, layer_map="last:2"))
    assert report["layer_map"] == {0: 2, 1: 3} and report["layer_map_rule"] == "last:2"
    with pytest.raises(TedcacheError, match="carry the teacher's"):
        distill(DistillConfig(cache=str(cache), student=str(student), out=str(tmp_path / "run2"), method="ted",
                              layer_map="provenance", max_steps=1))
    assert json.loads((tmp_path / "r" / "config.json").read_text())[ORIGIN]["init"] == "random"


def test_a_pruned_full_depth_student_distils_from_a_partial_cache_with_no_map_flag(assets, tmp_path):
    """A width-pruned student of all four teacher layers against a cache of layers 1 and 3: with no --layer-map
    the run pairs the two student layers that carry them, and its log line says so and names the others."""
    _, cache = extract_classifier(assets, tmp_path, filters=FilterConfig(layers="1,3"))
    student = init_student(StudentConfig(source=str(assets["teacher"]), out=str(tmp_path / "p"), init="prune",
                                         ffn=48, data=DataConfig(train=[str(assets["train"])], max_length=24),
                                         calibration_examples=32))
    result = run_cli("distill", "--cache", cache, "--student", student, "--out", tmp_path / "run", "--method", "ted",
                     "--epochs", "1", "--max-steps", "2", "--stage1-epochs", "1")
    assert result.returncode == 0, result.stderr
    assert ("layer map provenance (auto: the student records the teacher layer each of its layers carries), "
            "student -> teacher: {1: 1, 3: 3}; left out student layers [0, 2] (they carry teacher layers [0, 2]"
            in result.stderr)
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert report["layer_map"] == {"1": 1, "3": 3} and report["layer_map_rule"] == "provenance"
