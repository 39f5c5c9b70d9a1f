"""Loading HF models and tokenizers, their identity hashes, and making shallower students."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from .errors import TedcacheError
from .taps import is_causal_lm_class, model_parts, num_layers, parse_layers


def _check_source(name: str, what: str) -> None:
    path = Path(name)
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if looks_local and not path.is_dir():
        raise TedcacheError(f"{what} folder {name} does not exist; give a model folder or a hub name")


def load_tokenizer(name: str, what: str = "model", trust_remote_code: bool = False):
    _check_source(name, what)
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise TedcacheError(f"cannot load a tokenizer from {what} {name} ({type(exc).__name__}); "
                            "give a folder with tokenizer files, or a hub name when online") from exc


HEAD_CLASSES = {"token-classification": (AutoModelForTokenClassification, "a token classifier"),
                "question-answering": (AutoModelForQuestionAnswering, "an extractive question-answering model")}


def load_classifier(name: str, what: str = "model", task: str | None = None,
                    label_names: list[str] | None = None, trust_remote_code: bool = False):
    """An AutoModelForSequenceClassification (token-classification: AutoModelForTokenClassification,
    question-answering: AutoModelForQuestionAnswering); with label_names/task given, its head is sized
    to them."""
    _check_source(name, what)
    kwargs = {}
    if task == "regression":
        kwargs = {"num_labels": 1, "problem_type": "regression"}
    elif task == "question-answering":
        kwargs = {"num_labels": 2}  # start and end (a head copied from a classifier may have another width)
    elif label_names is not None:
        kwargs = {"num_labels": len(label_names), "problem_type": "single_label_classification",
                  "id2label": dict(enumerate(label_names)),
                  "label2id": {n: i for i, n in enumerate(label_names)}}
    auto, kind = HEAD_CLASSES.get(task, (AutoModelForSequenceClassification, "a sequence classifier"))
    return _from_pretrained(auto, name, what, kind, ignore_mismatched_sizes=bool(kwargs),
                            trust_remote_code=trust_remote_code, **kwargs)


def load_causal_lm(name: str, what: str = "model", trust_remote_code: bool = False):
    """An AutoModelForCausalLM (GPT-2, Llama, SmolLM, ...)."""
    _check_source(name, what)
    return _from_pretrained(AutoModelForCausalLM, name, what, "a causal language model",
                            trust_remote_code=trust_remote_code)


def _from_pretrained(auto_class, name: str, what: str, kind: str, **kwargs):
    """auto_class.from_pretrained, its failures turned into one line; the model's parts found (model_parts)."""
    try:
        model = auto_class.from_pretrained(name, **kwargs)
    except Exception as exc:
        if "trust_remote_code" in str(exc):
            raise TedcacheError(f"{what} {name} ships its own model code; pass --trust-remote-code to run it "
                                "(only for code you have read or trust)") from exc
        raise TedcacheError(f"cannot load {what} {name} as {kind} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from exc
    model_parts(model)  # its parts found now, so a model tedcache cannot read is refused at load time
    return model


def load_for_task(name: str, what: str, task: str, label_names: list[str] | None = None, resize: bool = True,
                  trust_remote_code: bool = False):
    """The model class a task trains: a causal LM, or a sequence classifier (its head resized to the
    task's labels when `resize`). Code shipped with a model runs only with `trust_remote_code`."""
    if task == "causal-lm":
        return load_causal_lm(name, what, trust_remote_code)
    if not resize:
        return load_classifier(name, what, task if task in HEAD_CLASSES else None, trust_remote_code=trust_remote_code)
    return load_classifier(name, what, task, label_names, trust_remote_code)


def weights_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer, in name order: the model's identity in a cache."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def vocab_hash(tokenizer) -> str:
    """sha256 of the token -> id map plus the special tokens: equal hashes mean interchangeable ids."""
    payload = {"vocab": sorted(tokenizer.get_vocab().items()),
               "special": sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else 0 (padding is masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def tokenizer_hash(tokenizer) -> str:
    """sha256 of everything that decides how text becomes ids: the tokenizer backend's whole definition
    (normaliser, pre-tokeniser, model and vocabulary, post-processor, added tokens) when it has one, else
    its vocabulary; its special tokens; and the side it truncates. Two tokenizers with one vocabulary but
    different normalisation (lower-casing, accents) hash differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        for per_call in ("truncation", "padding"):  # set by each call's arguments, not part of the definition
            definition.pop(per_call, None)
    else:
        definition = sorted(tokenizer.get_vocab().items())
    payload = {"backend": definition,
               "special": sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items()),
               "truncation_side": getattr(tokenizer, "truncation_side", None)}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


COPIED_FROM = "tedcache_copied_from"  # config.json key: the teacher layer each student layer copies


def copied_from(model) -> list[int] | None:
    """Which source layer each layer of a student made by init_student copies (None for other models)."""
    return getattr(model.config, COPIED_FROM, None)


def init_student(source: str, layers: list[int], out: str, trust_remote_code: bool = False) -> Path:
    """A shallower copy of `source` keeping the given 0-based layers (DistilBERT-style), saved to `out`;
    its config records the kept layers (see copied_from: distill's copy layer map reads them)."""
    _check_source(source, "source model")
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    architectures = config.architectures or []
    auto = AutoModel
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        auto = AutoModelForSequenceClassification
    elif any(a.endswith("ForTokenClassification") for a in architectures):
        auto = AutoModelForTokenClassification
    elif any(a.endswith("ForQuestionAnswering") for a in architectures):
        auto = AutoModelForQuestionAnswering
    elif any(is_causal_lm_class(a) for a in architectures):
        auto = AutoModelForCausalLM
    model = auto.from_pretrained(source, trust_remote_code=trust_remote_code)
    keep = parse_layers(",".join(map(str, layers)), num_layers(model))
    stack = model_parts(model).layers
    kept = [stack[i] for i in keep]
    for new_index, layer in enumerate(kept):
        for module in layer.modules():  # decoders index their KV cache by layer_idx
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    stack._modules.clear()
    for i, layer in enumerate(kept):
        stack.add_module(str(i), layer)
    total = model.config.num_hidden_layers
    for name, value in vars(model.config).items():  # per-layer lists (layer_types, ...) keep the kept entries
        if isinstance(value, list) and len(value) == total > 1 and name != "architectures":
            setattr(model.config, name, [value[i] for i in keep])
    model.config.num_hidden_layers = len(kept)
    setattr(model.config, COPIED_FROM, keep)
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_path)
    load_tokenizer(source, "source model", trust_remote_code).save_pretrained(out_path)
    return out_path
