"""Which transformer layers are tapped, and reading their output hidden states from any HF model."""

from __future__ import annotations

import functools

import torch

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


def final_norm(model) -> torch.nn.Module:
    """A decoder's final normalisation (Llama `norm`, GPT-2 `ln_f`, ...), found by its place, not its
    name: the last direct child of the base model that holds exactly one or two vectors of the hidden
    size (an RMSNorm's weight, a LayerNorm's weight and bias)."""
    width = hidden_size(model)
    found = None
    for module in model.base_model.children():  # a few modules: cheap enough for every forward
        if next(module.children(), None) is not None:
            continue  # not a leaf (the layer stack, embeddings with sub-modules)
        shapes = [tuple(p.shape) for p in module.parameters(recurse=False)]
        if shapes and len(shapes) <= 2 and all(shape == (width,) for shape in shapes):
            found = module
    if found is None:
        raise TedcacheError(f"cannot find the final norm of {type(model).__name__}: tedcache looks for the last "
                            f"module of its base model holding only {width}-wide vectors (a LayerNorm or RMSNorm)")
    return found


def output_logits(out) -> torch.Tensor:
    """A model output's logits; question-answering models' start and end logits stacked: (B, L, 2)."""
    if getattr(out, "start_logits", None) is not None:
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
    return out.logits


def forward_with_taps(model, batch: dict, layers: list[int]):
    """Run the model; return (logits (see output_logits), [hidden state after layer i for i in layers]).

    hidden_states[0] is the embedding output, so layer i's output is hidden_states[i + 1]. Decoder-only
    models are pre-norm: their residual stream is not normalised and its scale grows with depth, while
    HF's last hidden state already has the final norm applied. So for them (causal LMs and decoder
    sequence classifiers) every tapped layer reads final_norm(residual stream after layer i): the last
    layer's is exactly HF's last hidden state, and all layers are on the scale the head reads."""
    out = model(**model_inputs(batch), output_hidden_states=True)
    last = len(out.hidden_states) - 2
    if is_decoder_only(model):
        norm = final_norm(model)
        return output_logits(out), [out.hidden_states[i + 1] if i == last else norm(out.hidden_states[i + 1])
                                    for i in layers]
    return output_logits(out), [out.hidden_states[i + 1] for i in layers]

