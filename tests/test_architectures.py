"""The architecture matrix: a tiny random-initialised model of each family goes through extract ->
init-student -> distill, for sequence classification (decoders pool their last real token, as their HF
heads do) and, for decoders, causal-lm. The code is generic: nothing here names a family's modules."""

import json
from dataclasses import replace

import pytest
import torch
import transformers
from helpers.builders import documents, make_lm_tokenizer, make_tokenizer, write_questions, write_text
from helpers.commands import assert_one_line_error, run_cli

from tedcache import DataConfig, DistillConfig, ExtractConfig, OptimConfig, distill, extract
from tedcache.cache import Cache, load_metadata
from tedcache.config import FilterConfig, StudentConfig
from tedcache.students import init_student
from tedcache.taps import final_norm, is_decoder_only

SIZE = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)
DECODER = dict(SIZE, num_key_value_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=2)
FAMILIES = {
    "bert": (transformers.BertConfig, SIZE),
    "roberta": (transformers.RobertaConfig, dict(SIZE, pad_token_id=0)),
    "deberta-v2": (transformers.DebertaV2Config, SIZE),
    "distilbert": (transformers.DistilBertConfig, dict(dim=32, n_layers=4, n_heads=4, hidden_dim=64,
                                                       max_position_embeddings=64)),
    "electra": (transformers.ElectraConfig, dict(SIZE, embedding_size=32)),
    "gpt2": (transformers.GPT2Config, dict(n_embd=32, n_layer=4, n_head=4, n_positions=64, pad_token_id=0,
                                           bos_token_id=2, eos_token_id=2)),
    "llama": (transformers.LlamaConfig, DECODER),
    "qwen2": (transformers.Qwen2Config, DECODER),
    "mistral": (transformers.MistralConfig, DECODER),
    "phi3": (transformers.Phi3Config, DECODER),
    # OPT declares its final norm before its layers (it runs after them): the parts are found by running
    "opt": (transformers.OPTConfig, dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, ffn_dim=64,
                                         word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=0,
                                         bos_token_id=2, eos_token_id=2)),
}
TOKENS = dict(pad_token_id=0, bos_token_id=2, eos_token_id=2)
# decoders of other block kinds (causal LMs only): state-space, recurrent, hybrid attention + state-space + MoE
BLOCK_KINDS = {
    "mamba": (transformers.MambaConfig, dict(hidden_size=32, num_hidden_layers=4, state_size=8, expand=2,
                                             conv_kernel=4, time_step_rank=4, **TOKENS)),
    "mamba2": (transformers.Mamba2Config, dict(hidden_size=32, num_hidden_layers=4, state_size=8, expand=2,
                                               num_heads=4, head_dim=16, n_groups=1, conv_kernel=4, chunk_size=16,
                                               **TOKENS)),
    "rwkv": (transformers.RwkvConfig, dict(hidden_size=32, num_hidden_layers=4, attention_hidden_size=32,
                                           intermediate_size=64, context_length=64, **TOKENS)),
    "jamba": (transformers.JambaConfig, dict(DECODER, num_experts=2, num_experts_per_tok=1, expert_layer_period=2,
                                             expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1,
                                             mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
                                             use_mamba_kernels=False)),
}
CLASSIFIERS = list(FAMILIES)
FAMILIES.update(BLOCK_KINDS)
DECODERS = ["gpt2", "llama", "qwen2", "mistral", "phi3", "opt", *BLOCK_KINDS]
QUICK = OptimConfig(epochs=1, batch_size=16)


def _teacher(family: str, folder, auto, tokenizer, **extra):
    config_class, settings = FAMILIES[family]
    torch.manual_seed(0)
    model = auto.from_config(config_class(vocab_size=len(tokenizer), **settings, **extra))
    model.save_pretrained(folder)
    return str(folder)


def _pipeline(teacher: str, data: DataConfig, tmp_path) -> dict:
    cache = extract(ExtractConfig(teacher=teacher, data=data, filters=FilterConfig(layers="all"), stage1=QUICK,
                                  cache_dir=str(tmp_path / "caches"), logits="full"))
    student = init_student(StudentConfig(source=teacher, layers=[0, 3], out=str(tmp_path / "student")))
    assert json.loads((student / "config.json").read_text())["tedcache_copied_from"] == [0, 3]
    return distill(DistillConfig(cache=cache, student=str(student), out=str(tmp_path / "ted"), method="ted",
                                 optim=QUICK, stage1=QUICK, layer_map="copy", max_steps=3))


@pytest.mark.parametrize("family", CLASSIFIERS)
def test_sequence_classification(family, assets, tmp_path):
    tokenizer = make_tokenizer(tmp_path / "teacher")
    teacher = _teacher(family, tmp_path / "teacher", transformers.AutoModelForSequenceClassification, tokenizer,
                       num_labels=2)
    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], test=[str(assets["test"])],
                      max_length=32)
    metrics = _pipeline(teacher, data, tmp_path)
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert metrics["layer_map"] == {0: 2, 1: 3}  # the copy map: student layer 1 is teacher 3, which reads 2


ENCODERS = [f for f in CLASSIFIERS if f not in DECODERS]


@pytest.mark.parametrize("family", ENCODERS)
def test_question_answering(family, tmp_path):
    """Extractive QA on each encoder family: windows of question + context (the word tokenizer made here
    marks the context with token type 1, so RoBERTa gets a second type embedding, as a BERT-style
    tokenizer would need), start/end logits per token, the QA head of a copied student."""
    tokenizer = make_tokenizer(tmp_path / "teacher", extra=["which"])
    extra = {"type_vocab_size": 2} if family == "roberta" else {}
    teacher = _teacher(family, tmp_path / "teacher", transformers.AutoModelForQuestionAnswering, tokenizer, **extra)
    files = {name: write_questions(tmp_path / f"{name}.jsonl", n, seed)
             for name, n, seed in (("train", 48, 0), ("eval", 16, 1), ("test", 16, 2))}
    data = DataConfig(train=[str(files["train"])], eval=[str(files["eval"])], test=[str(files["test"])],
                      task="question-answering", max_length=24, doc_stride=6)
    metrics = _pipeline(teacher, data, tmp_path)
    assert {"f1", "exact"} <= set(metrics["test"]) and 0.0 <= metrics["test"]["f1"] <= 1.0
    assert metrics["layer_map"] == {0: 2, 1: 3}


@pytest.mark.parametrize("family", DECODERS)
def test_causal_lm(family, tmp_path):
    tokenizer = make_lm_tokenizer(tmp_path / "teacher")
    teacher = _teacher(family, tmp_path / "teacher", transformers.AutoModelForCausalLM, tokenizer)
    model = transformers.AutoModelForCausalLM.from_pretrained(teacher)
    assert is_decoder_only(model)
    # the final norm is the module HF's last hidden state comes out of
    seen = {}
    handle = final_norm(model).register_forward_hook(lambda module, args, output: seen.update(output=output))
    last = model.base_model(input_ids=torch.tensor([[3, 4, 5, 6]])).last_hidden_state
    handle.remove()
    assert torch.equal(seen["output"], last)
    texts = {name: str(write_text(tmp_path / f"{name}.txt", documents(n, seed)))
             for name, n, seed in (("train", 60, 0), ("eval", 20, 1), ("test", 20, 2))}
    data = DataConfig(train=[texts["train"]], eval=[texts["eval"]], test=[texts["test"]], task="causal-lm",
                      block_size=16)
    metrics = _pipeline(teacher, data, tmp_path)
    assert metrics["test"]["perplexity"] > 1.0


CUSTOM_CONFIG = '''from transformers import BertConfig


class TinyCustomConfig(BertConfig):
    model_type = "tiny-custom"
'''
CUSTOM_MODEL = '''from transformers import BertForSequenceClassification

from .configuration_tiny import TinyCustomConfig


class TinyCustomClassifier(BertForSequenceClassification):
    config_class = TinyCustomConfig
'''
# a model that keeps its layers in a Sequential, not a list: tedcache cannot tap them
SEQUENTIAL_LAYERS = CUSTOM_MODEL + '''

    def __init__(self, config):
        super().__init__(config)
        import torch
        self.bert.encoder.layer = torch.nn.Sequential(*self.bert.encoder.layer)
'''


def _custom_model(folder, model_code: str, module: str) -> None:
    """A BERT classifier folder that ships its own model code (auto_map) in modeling_<module>.py (one name per
    code: Python keeps a module it has imported)."""
    tokenizer = make_tokenizer(folder)
    (folder / "configuration_tiny.py").write_text(CUSTOM_CONFIG)
    (folder / f"modeling_{module}.py").write_text(model_code)
    config = transformers.BertConfig(vocab_size=len(tokenizer), num_labels=2, **SIZE)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    settings = json.loads((folder / "config.json").read_text())
    settings.update(model_type="tiny-custom", auto_map={
        "AutoConfig": "configuration_tiny.TinyCustomConfig",
        "AutoModelForSequenceClassification": f"modeling_{module}.TinyCustomClassifier"})
    (folder / "config.json").write_text(json.dumps(settings))


def test_model_code_runs_only_with_trust_remote_code(assets, tmp_path):
    """A model folder that ships its own architecture (auto_map) is refused with one line unless
    --trust-remote-code is given; the cache records the choice."""
    folder = tmp_path / "custom"
    _custom_model(folder, CUSTOM_MODEL, "tiny")
    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], max_length=32)
    base = ExtractConfig(teacher=str(folder), data=data, stage1=QUICK, cache_dir=str(tmp_path / "caches"))
    result = run_cli("extract", "--teacher", folder, "--data", assets["train"], "--cache-dir", tmp_path / "caches")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "ships its own model code; pass --trust-remote-code" in result.stderr
    cache = extract(replace(base, trust_remote_code=True))
    assert load_metadata(cache).trust_remote_code is True


def test_a_model_whose_layers_cannot_be_found_is_one_line(assets, tmp_path):
    """Its layers run, but from no list as long as config.num_hidden_layers: refused when the teacher is
    loaded, with one line, and no cache folder is left behind."""
    folder = tmp_path / "sequential"  # (HF keeps loaded model code by folder name: not the other test's "custom")
    _custom_model(folder, SEQUENTIAL_LAYERS, "tiny_sequential")
    result = run_cli("extract", "--teacher", folder, "--data", assets["train"], "--cache-dir", tmp_path / "caches",
                     "--trust-remote-code")
    assert_one_line_error(result, "cannot find the transformer layer stack of TinyCustomClassifier")
    assert not (tmp_path / "caches").exists() or not any((tmp_path / "caches").iterdir())


@pytest.mark.parametrize("teacher_rows, student_rows", [(8, 0), (0, 8)])
def test_classifiers_with_padded_embeddings(teacher_rows, student_rows, assets, tmp_path):
    """Teacher and student share a tokenizer but one has embedding rows no token id reaches: only the
    vocabulary decides whether they fit; the widths do not matter to a classification cache."""
    models = {}
    for name, extra, layers in (("teacher", teacher_rows, 4), ("student", student_rows, 2)):
        tokenizer = make_tokenizer(tmp_path / name)
        config = transformers.BertConfig(vocab_size=len(tokenizer) + extra, num_labels=2,
                                         **{**SIZE, "num_hidden_layers": layers})
        transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / name)
        models[name] = str(tmp_path / name)
    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], test=[str(assets["test"])],
                      max_length=32)
    cache = extract(ExtractConfig(teacher=models["teacher"], data=data, stage1=QUICK, cache_dir=str(tmp_path / "c")))
    report = distill(DistillConfig(cache=cache, student=models["student"], out=str(tmp_path / "kd"), method="kd",
                                   optim=QUICK, max_steps=2))
    assert 0.0 <= report["test"]["accuracy"] <= 1.0


@pytest.mark.parametrize("family", list(BLOCK_KINDS))
def test_each_construction_of_other_block_kinds_works_or_is_one_line(family, tmp_path):
    """init-student on state-space, recurrent and hybrid models: copy and random (depth) work; width pruning,
    which ranks attention heads and FFN neurons, is refused in one line naming what applies."""
    tokenizer = make_lm_tokenizer(tmp_path / "teacher")
    teacher = _teacher(family, tmp_path / "teacher", transformers.AutoModelForCausalLM, tokenizer)
    copied = run_cli("init-student", "--from", teacher, "--layers", "1,2", "--out", tmp_path / "copy")
    assert copied.returncode == 0, copied.stderr
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["tedcache_copied_from"] == [1, 2]
    shallow = run_cli("init-student", "--from", teacher, "--init", "random", "--depth", "2", "--out", tmp_path / "rnd")
    assert shallow.returncode == 0, shallow.stderr
    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rnd")
    assert student.config.num_hidden_layers == 2 and student(torch.tensor([[3, 4, 5]])).logits.shape[-1] > 3
    pruned = run_cli("init-student", "--from", teacher, "--init", "prune", "--width", "16", "--data",
                     write_text(tmp_path / "t.txt", documents(8, 0)), "--task", "causal-lm", "--out", tmp_path / "p")
    assert_one_line_error(pruned, "use --init copy", "random")
    if family != "jamba":  # attention-free: their width is set by fields of their own kind
        wider = run_cli("init-student", "--from", teacher, "--init", "random", "--width", "16", "--out", tmp_path / "w")
        assert_one_line_error(wider, "--width", "has no attention", "--depth")


def test_a_shared_layer_encoder_is_tapped_per_application(assets, tmp_path):
    """ALBERT applies one layer at each of its 4 depths: the cache holds the state after each application (the
    model's own hidden state of that depth), a random student of 2 applications distils from it on TED's interval
    map, and the constructions that cut layers out of a stack are refused in one line."""
    tokenizer = make_tokenizer(tmp_path / "teacher")
    config = transformers.AlbertConfig(vocab_size=len(tokenizer), embedding_size=16, num_labels=2, **SIZE)
    torch.manual_seed(0)
    transformers.AlbertForSequenceClassification(config).save_pretrained(tmp_path / "teacher")
    teacher = str(tmp_path / "teacher")
    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], test=[str(assets["test"])],
                      max_length=32)
    raw = extract(ExtractConfig(teacher=teacher, data=data, filters=FilterConfig(layers="all"), states="raw",
                                precision="fp32", cache_dir=str(tmp_path / "caches")))
    split = Cache(raw).split("train")
    length = int(split.lengths[0])
    ids = torch.from_numpy(split.tokens("input_ids", 0, length).astype("int64"))[None]
    model = transformers.AlbertForSequenceClassification.from_pretrained(teacher).eval()
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    for depth in range(4):
        stored = torch.from_numpy(split.states(depth, 0, length)[0])
        torch.testing.assert_close(stored, hidden[depth + 1][0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(hidden[2], hidden[3])  # the same layer, applied again, moves the state
    copied = run_cli("init-student", "--from", teacher, "--layers", "0,3", "--out", tmp_path / "copy")
    assert_one_line_error(copied, "applies one shared layer", "--init random --depth")
    student = init_student(StudentConfig(source=teacher, init="random", depth=2, out=str(tmp_path / "student")))
    assert transformers.AutoConfig.from_pretrained(student).num_hidden_layers == 2
    cache = extract(ExtractConfig(teacher=teacher, data=data, filters=FilterConfig(layers="all"), stage1=QUICK,
                                  cache_dir=str(tmp_path / "caches")))
    metrics = distill(DistillConfig(cache=cache, student=str(student), out=str(tmp_path / "ted"), method="ted",
                                    optim=QUICK, stage1=QUICK, max_steps=3))
    assert metrics["layer_map"] == {0: 1, 1: 3} and 0.0 <= metrics["test"]["accuracy"] <= 1.0
