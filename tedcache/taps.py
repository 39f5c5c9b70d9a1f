"""Which transformer layers are tapped, and reading their output hidden states from any HF model."""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .errors import TedcacheError


def num_layers(model) -> int:
    config = model.config
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)


def hidden_size(model) -> int:
    config = model.config
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def parse_layers(spec: str, total: int) -> list[int]:
    """0-based layer indices from "all", "every:K" (TED's rule: layer i when (i+1) % K == 0) or "0,5"."""
    spec = spec.strip()
    if spec == "all":
        return list(range(total))
    if spec.startswith("every:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            k = 0
        if not 1 <= k <= total:
            raise TedcacheError(f"layers '{spec}': K must be an integer in 1..{total}; e.g. every:2")
        return [i for i in range(total) if (i + 1) % k == 0]
    try:
        layers = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise TedcacheError(f"layers '{spec}' is not 'all', 'every:K' or a list like 0,5") from None
    bad = [i for i in layers if not 0 <= i < total]
    if not layers or bad or len(set(layers)) != len(layers) or layers != sorted(layers):
        raise TedcacheError(f"layers '{spec}': give distinct increasing indices in 0..{total - 1} "
                            "(0-based transformer layers)")
    return layers


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # the batch keys a model's forward takes


def model_inputs(batch: dict) -> dict:
    """The part of a batch a model's forward takes (targets and bookkeeping left out)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def is_causal_lm_class(name: str) -> bool:
    """Whether an HF class name is a causal LM (GPT2LMHeadModel, LlamaForCausalLM, ...)."""
    return name.endswith(("ForCausalLM", "LMHeadModel"))


def is_decoder_only(model) -> bool:
    """Whether the model is a decoder-only transformer (GPT-2, Llama, Qwen...; as a causal LM or as a
    sequence classifier): its model type has a causal-LM class and no masked-LM class (BERT has both)."""
    return _decoder_only_type(model.config.model_type)


@functools.cache  # asked on every forward: answered once per model type
def _decoder_only_type(kind: str) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def pooled(states: torch.Tensor, mask: torch.Tensor, last: bool) -> torch.Tensor:
    """The one position a sequence head reads: the last real token (decoder-only models, whose own
    classification heads read it: only it has seen the whole text) or the first ([CLS], encoders)."""
    if not last:
        return states[:, 0]
    positions = torch.arange(mask.shape[1], device=mask.device)
    return states[torch.arange(len(states), device=states.device), (mask * positions).argmax(1)]


@dataclass(frozen=True)
class ModelParts:
    """The parts of a model tedcache reads, found by running it (see model_parts)."""

    layers: torch.nn.ModuleList  # the layer stack, in the order the layers run (ALBERT: one per application)
    final_norm: torch.nn.Module | None  # the first norm the base model runs after its last layer (None: none)
    head: torch.nn.Module | None  # the module that produces the output logits (None: a bare base model)

    @property
    def shared(self) -> bool:
        """Whether one layer is applied at several depths (ALBERT), so that depths are not separate modules."""
        return len({id(layer) for layer in self.layers}) < len(self.layers)


_PARTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
PROBE_TOKENS = 4  # the dummy input model_parts runs: one sequence of this many tokens


def model_parts(model) -> ModelParts:
    """The layer stack, final norm and output head of any HF model, found from the order in which its modules
    run on one tiny dummy forward pass (declaration order differs: OPT declares its final norm before its
    layers). Run once per model and remembered; the loaders call it, so a model whose parts cannot be found
    is refused when it is loaded."""
    if model not in _PARTS:
        _PARTS[model] = _find_parts(model)
    return _PARTS[model]


def _find_parts(model) -> ModelParts:
    name = type(model).__name__
    finished: list[torch.nn.Module] = []  # modules in the order their forward returned
    outputs: dict[torch.nn.Module, object] = {}

    def record(module, args, output):
        finished.append(module)
        outputs.setdefault(module, output)

    handles = [m.register_forward_hook(record) for m in model.modules()]
    vocab = int(getattr(model.config, "vocab_size", 0) or 0) or 8
    ids = (torch.arange(PROBE_TOKENS, device=model.device) % vocab + min(3, vocab - 1)) % vocab
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None])
    except Exception as exc:
        raise TedcacheError(f"cannot run {name} on a dummy input to find its layers ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from exc
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    order = {}
    for index, module in enumerate(finished):
        order.setdefault(module, index)  # first return of each module
    total = num_layers(model)
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == total
              and all(child in order for child in m)
              and [order[c] for c in m] == sorted(order[c] for c in m)]
    largest = max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)
    layers = largest if largest is not None else _applications(model, finished, total)
    if layers is None:
        raise TedcacheError(f"cannot find the transformer layer stack of {name}: no list of {total} layers "
                            "(config.num_hidden_layers) ran one after another on a dummy input, nor a list of "
                            f"shared layers applied {total} times")
    width = hidden_size(model)
    inside_base = set(model.base_model.modules())
    last = max(i for i, module in enumerate(finished) if module is layers[-1])
    after_last = [m for m in finished[last + 1:] if m in inside_base]
    norms = [m for m in after_last if holds_only_vectors(m, width)]
    head = None
    if getattr(out, "logits", None) is not None or getattr(out, "start_logits", None) is not None:
        classes = output_logits(out).shape[-1]
        heads = [m for m in finished if next(m.children(), None) is None
                 and isinstance(outputs[m], torch.Tensor) and outputs[m].shape[-1] == classes]
        if not heads:
            raise TedcacheError(f"cannot find the output head of {name}: no module's output is as wide as its logits")
        head = heads[-1]
    return ModelParts(layers=layers, final_norm=norms[0] if norms else None, head=head)


def _applications(model, finished: list[torch.nn.Module], total: int) -> torch.nn.ModuleList | None:
    """A model that applies shared layers (ALBERT: one layer group, run `total` times): the list of shared
    layers whose runs number `total`, as one entry per application, in the order they ran (None: none)."""
    for candidate in model.modules():
        if not isinstance(candidate, torch.nn.ModuleList) or len(candidate) >= total:
            continue
        members = set(candidate)
        runs = [m for m in finished if m in members]
        if len(runs) == total and members <= set(runs):
            return torch.nn.ModuleList(runs)
    return None


def holds_only_vectors(module, width: int) -> bool:
    """A LayerNorm or RMSNorm by its parameters: a leaf holding one or two vectors of the hidden size."""
    if next(module.children(), None) is not None:
        return False
    shapes = [tuple(p.shape) for p in module.parameters(recurse=False)]
    return bool(shapes) and len(shapes) <= 2 and all(shape == (width,) for shape in shapes)


def final_norm(model) -> torch.nn.Module:
    """A decoder's final normalisation (Llama `norm`, GPT-2 `ln_f`, OPT `final_layer_norm`...): the first
    module run after the last layer that holds only hidden-size vectors (see model_parts)."""
    norm = model_parts(model).final_norm
    if norm is None:
        raise TedcacheError(f"cannot find the final norm of {type(model).__name__}: no module holding only "
                            f"{hidden_size(model)}-wide vectors (a LayerNorm or RMSNorm) runs after its last layer")
    return norm


def in_own_dtype(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer` (a frozen output layer) on float32 `x`, computed in the layer's own precision (a bf16 or fp16
    teacher's), the result in float32."""
    return layer(x.to(layer.weight.dtype)).float()


def output_logits(out) -> torch.Tensor:
    """A model output's logits; question-answering models' start and end logits stacked: (B, L, 2)."""
    if getattr(out, "start_logits", None) is not None:
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
    return out.logits


def forward_with_taps(model, batch: dict, layers: list[int], **options):
    """Run the model (with `options` passed on: logits_to_keep); return (logits (see output_logits),
    [hidden state after layer i for i in layers]).

    hidden_states[0] is the embedding output, so layer i's output is hidden_states[i + 1]. Decoder-only
    models are pre-norm: their residual stream is not normalised and its scale grows with depth, while
    HF's last hidden state already has the final norm applied. So for them (causal LMs and decoder
    sequence classifiers) every tapped layer reads final_norm(residual stream after layer i): the last
    layer's is exactly HF's last hidden state, and all layers are on the scale the head reads."""
    out = model(**model_inputs(batch), output_hidden_states=True, **options)
    last = len(out.hidden_states) - 2
    if is_decoder_only(model):
        norm = final_norm(model)
        return output_logits(out), [out.hidden_states[i + 1] if i == last else norm(out.hidden_states[i + 1])
                                    for i in layers]
    return output_logits(out), [out.hidden_states[i + 1] for i in layers]

