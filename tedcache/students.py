"""Students made from a model (`tedcache init-student`): a copy of some of its layers (DistilBERT-style), a
randomly initialised model of its kind and vocabulary at another shape, or a width-pruned copy keeping the
attention heads, FFN neurons and hidden channels most active on a calibration sample (Minitron, arXiv
2407.14679). Every student's config records how it was made (`tedcache_student`) and, where its layers carry
the source's weights, which source layer each carries (`tedcache_copied_from`, read by distill's layer maps)."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .config import StudentConfig
from .data import load_blocks, load_examples
from .errors import TedcacheError
from .models import check_source, load_tokenizer, pad_id
from .reader import ExamplesSource, iterate_batches
from .schema import check_choices
from .taps import holds_only_vectors, is_causal_lm_class, model_inputs, model_parts
from .tasks import TASK

COPIED_FROM = "tedcache_copied_from"  # config.json key: the source layer each student layer carries
ORIGIN = "tedcache_student"  # config.json key: how the student was made
FFN_NAMES = ("intermediate_size", "ffn_dim", "n_inner")  # the FFN width's name in BERT/Llama, OPT, GPT-2 configs

# Width pruning finds each linear map's role inside a layer by its name (BERT-style and Llama/OPT-style layers).
ROLES = (("attention_out", ("attention.output.dense", "o_proj", "out_proj")),
         ("attention_in", ("query", "key", "value", "q_proj", "k_proj", "v_proj")),
         ("ffn_in", ("intermediate.dense", "gate_proj", "up_proj", "fc1")),
         ("ffn_out", ("output.dense", "down_proj", "fc2")))


def copied_from(model) -> list[int] | None:
    """Which source layer each layer of a copied or pruned student carries (None for other models)."""
    return getattr(model.config, COPIED_FROM, None)


@dataclass(frozen=True)
class Shape:
    """A transformer's shape: layers, hidden size, query and key/value heads, head size, FFN width."""

    depth: int
    width: int
    heads: int
    kv_heads: int
    head_size: int
    ffn: int


def init_student(cfg: StudentConfig) -> Path:
    """Make the student `cfg` asks for from `cfg.source` and save it, with the source's tokenizer, to
    `cfg.out`; returns that folder."""
    check_choices(cfg)
    source = _load_source(cfg.source, cfg.trust_remote_code)
    have = source_shape(source.config)
    own_head_size = getattr(source.config, "head_dim", None) is not None
    if cfg.init != "random" and model_parts(source).shared:
        raise TedcacheError(f"--init {cfg.init} takes layers out of the source's stack, and {type(source).__name__} "
                            f"applies one shared layer at each of its {have.depth} depths: use --init random --depth K "
                            "(a model of its kind that applies its layer K times)")
    if cfg.init == "copy":
        if not cfg.layers:
            raise TedcacheError("--init copy needs --layers: the source's 0-based layers to keep (e.g. 0,5)")
        keep = _kept_layers(cfg.layers, have.depth)
        student, origin = _cut(source, keep), {"layers": keep}
    elif cfg.init == "random":
        shape = _wanted_shape(cfg, have, own_head_size) if have.heads else _attention_free_shape(cfg, have, source)
        student = _random(source, shape, cfg.embeddings, cfg.seed, own_head_size)
        origin = {"embeddings": cfg.embeddings, "seed": cfg.seed}
    else:
        keep = _kept_layers(cfg.layers, have.depth) if cfg.layers else list(range(have.depth))
        if not have.heads:
            _attention_free_shape(cfg, have, source)
        shape = _wanted_shape(cfg, have, own_head_size, depth=len(keep))
        _check_prunable(source)
        student, kept = _prune(source, shape, keep, _calibration_batches(cfg, source))
        origin = {"layers": keep, "kept": kept, "calibration_examples": cfg.calibration_examples, "seed": cfg.seed}
    if cfg.init != "random":
        setattr(student.config, COPIED_FROM, origin["layers"])
    setattr(student.config, ORIGIN, {"init": cfg.init, "source": cfg.source, **asdict(source_shape(student.config)),
                                     **origin})
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    load_tokenizer(cfg.source, "source model", cfg.trust_remote_code).save_pretrained(out)
    return out


def _load_source(source: str, trust_remote_code: bool):
    """The source model with its task head (sequence or token classifier, QA model, causal LM, else bare)."""
    check_source(source, "source model")
    names = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code).architectures or []
    heads = {"ForSequenceClassification": AutoModelForSequenceClassification,
             "ForTokenClassification": AutoModelForTokenClassification,
             "ForQuestionAnswering": AutoModelForQuestionAnswering}
    auto = next((auto for suffix, auto in heads.items() if any(n.endswith(suffix) for n in names)),
                AutoModelForCausalLM if any(is_causal_lm_class(n) for n in names) else AutoModel)
    return auto.from_pretrained(source, trust_remote_code=trust_remote_code)


def source_shape(config) -> Shape:
    """The shape a model config describes (no heads, of size 0, for an attention-free model: Mamba, RWKV)."""
    heads = getattr(config, "num_attention_heads", None) or 0
    head_size = (getattr(config, "head_dim", None) or config.hidden_size // heads) if heads else 0
    ffn = next((getattr(config, n) for n in FFN_NAMES if getattr(config, n, None)), 4 * config.hidden_size)
    return Shape(config.num_hidden_layers, config.hidden_size, heads,
                 getattr(config, "num_key_value_heads", None) or heads, head_size, ffn)


def _kept_layers(layers: list[int], total: int) -> list[int]:
    bad = [i for i in layers if not 0 <= i < total]
    if bad or len(set(layers)) != len(layers):
        raise TedcacheError(f"--layers {','.join(map(str, layers))}: the source's layers are 0..{total - 1}, "
                            "each named once")
    return sorted(layers)


def _wanted_shape(cfg: StudentConfig, have: Shape, own_head_size: bool, depth: int | None = None) -> Shape:
    """The student's shape from the flags, each default following the source (see StudentConfig); a shape
    the model cannot take is refused in one line. `own_head_size`: the config sets the head size itself
    (Llama's head_dim) instead of deriving it as width / heads (BERT)."""
    depth = depth or cfg.depth or have.depth
    width = cfg.width or have.width
    if depth < 1 or depth > have.depth:
        raise TedcacheError(f"--depth {depth}: the source has {have.depth} layers; give 1 to {have.depth}")
    heads = cfg.heads or max(1, width // have.head_size)
    group = have.heads // have.kv_heads  # query heads per key/value head (1 without grouped-query attention)
    if heads % group:
        raise TedcacheError(f"--heads {heads}: the source shares each key/value head among {group} query heads; "
                            f"give a multiple of {group}")
    ffn = cfg.ffn or width * have.ffn // have.width
    if cfg.init == "random":
        if width % heads:
            raise TedcacheError(f"--width {width} is not divisible by --heads {heads}: choose a width that is a "
                                "multiple of the heads")
        return Shape(depth, width, heads, heads // group, width // heads, ffn)
    for flag, value, limit in (("--width", width, have.width), ("--heads", heads, have.heads), ("--ffn", ffn, have.ffn)):
        if value > limit:
            raise TedcacheError(f"{flag} {value} is more than the source's {limit}: pruning only narrows; use "
                                "--init random for a wider student")
    if not own_head_size and heads * have.head_size != width:
        raise TedcacheError(f"--width {width} with --heads {heads}: the source derives its head "
                            f"size from width / heads, and pruning keeps whole heads of {have.head_size} "
                            f"channels: give --heads {width // have.head_size} (and a --width that is a multiple "
                            f"of {have.head_size})")
    return Shape(depth, width, heads, heads // group, have.head_size, ffn)


def _attention_free_shape(cfg: StudentConfig, have: Shape, source) -> Shape:
    """An attention-free model (state-space, recurrent) sets its width with fields of its own kind: of its
    shape, tedcache changes only the depth (--init random), and prunes nothing."""
    family = type(source.config).__name__
    if cfg.init == "prune":
        raise TedcacheError(f"--init prune ranks attention heads and FFN neurons, and {family} has no attention "
                            "(an attention-free model): use --init copy (--layers) or --init random (--depth)")
    given = [flag for flag, value in (("--width", cfg.width), ("--heads", cfg.heads), ("--ffn", cfg.ffn)) if value]
    if given:
        raise TedcacheError(f"{', '.join(given)}: {family} has no attention and sets its width with fields of its "
                            "own, so --init random changes only its --depth; leave the others out, or use --init copy")
    depth = cfg.depth or have.depth
    if not 1 <= depth <= have.depth:
        raise TedcacheError(f"--depth {depth}: the source has {have.depth} layers; give 1 to {have.depth}")
    return replace(have, depth=depth)


def _keep_per_layer_entries(config, keep: list[int]) -> None:
    """Per-layer config lists (layer_types, ...) keep the kept layers' entries."""
    total = config.num_hidden_layers
    for name, value in vars(config).items():
        if isinstance(value, list) and len(value) == total > 1 and name != "architectures":
            setattr(config, name, [value[i] for i in keep])


def _cut(model, keep: list[int]):
    """`model` with only its layers `keep` (in place)."""
    stack = model_parts(model).layers
    kept = [stack[i] for i in keep]
    for new_index, layer in enumerate(kept):
        for module in layer.modules():  # decoders index their KV cache by layer_idx
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    stack._modules.clear()
    for i, layer in enumerate(kept):
        stack.add_module(str(i), layer)
    _keep_per_layer_entries(model.config, keep)
    model.config.num_hidden_layers = len(kept)
    return model


def _student_config(config, shape: Shape, keep: list[int], own_head_size: bool):
    """The source's config at the student's shape, without the source's own origin records."""
    config = copy.deepcopy(config)
    for key in (COPIED_FROM, ORIGIN):
        if hasattr(config, key):
            delattr(config, key)
    _keep_per_layer_entries(config, keep)
    config.num_hidden_layers = shape.depth
    if not shape.heads:  # attention-free: only the depth changes
        return config
    config.hidden_size, config.num_attention_heads = shape.width, shape.heads
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = shape.kv_heads
    if own_head_size:
        config.head_dim = shape.head_size
    ffn_name = next((name for name in FFN_NAMES if hasattr(config, name)), None)
    if ffn_name is None and shape.ffn != source_shape(config).ffn:
        raise TedcacheError(f"cannot set the FFN width of {type(config).__name__}: its config names none of "
                            f"{', '.join(FFN_NAMES)}; leave --ffn out")
    if ffn_name is not None:
        setattr(config, ffn_name, shape.ffn)
    return config


def _random(source, shape: Shape, embeddings: str, seed: int, own_head_size: bool):
    """A randomly initialised model of the source's class at `shape`; with embeddings "teacher", the
    source's embedding tables (see _take_embeddings)."""
    config = _student_config(source.config, shape, list(range(shape.depth)), own_head_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = type(source)(config)
    if embeddings == "teacher":
        _take_embeddings(source, student)
    return student


@torch.no_grad()
def _take_embeddings(source, student) -> None:
    """The source's embedding tables (tokens, positions, token types; an untied output embedding) in the
    student: as they are at the source's width, else projected onto the top principal directions of the
    source's token embeddings (the projection that keeps most of their variance)."""
    have, width = source.config.hidden_size, student.config.hidden_size
    if width > have:
        raise TedcacheError(f"--embeddings teacher needs --width at most the source's {have}; "
                            "use --embeddings random for a wider student")
    tokens = source.get_input_embeddings().weight.float()
    project = torch.eye(have)
    if width < have:
        project = torch.linalg.svd(tokens - tokens.mean(0), full_matrices=False)[2][:width].T
    targets = dict(student.named_modules())
    for name, module in source.named_modules():
        if not isinstance(module, nn.Embedding) or name not in targets:
            continue
        if module.embedding_dim == have:
            targets[name].weight.copy_(module.weight.float() @ project)
        elif targets[name].weight.shape == module.weight.shape:  # factorised tables of their own width (ALBERT's)
            targets[name].weight.copy_(module.weight)
    output, target = source.get_output_embeddings(), student.get_output_embeddings()
    if target is not None and output is not None and target.weight is not student.get_input_embeddings().weight:
        target.weight.copy_(output.weight.float() @ project)


def _calibration_batches(cfg: StudentConfig, source):
    """Padded batches of `cfg.calibration_examples` training examples drawn with `cfg.seed`, tokenized as
    extract tokenizes them (labels not needed)."""
    data = cfg.data
    if not data.train:
        raise TedcacheError("--init prune needs --data: training examples whose activations rank the heads, FFN "
                            "neurons and hidden channels to keep")
    tokenizer = load_tokenizer(cfg.source, "source model", cfg.trust_remote_code)
    if TASK[data.task].causal:
        examples = load_blocks(data.train, data, tokenizer, "--data")
    else:
        examples = load_examples(data.train, data, tokenizer, None, "--data", model_config=source.config,
                                 unlabelled="refuse" if data.task == "question-answering" else "all")[0]
    count = min(cfg.calibration_examples, len(examples))
    sample = np.sort(np.random.default_rng(cfg.seed).choice(len(examples), count, replace=False))
    return iterate_batches(ExamplesSource(examples.reorder(sample)), 16, pad_id(tokenizer))


def _role(name: str) -> str | None:
    """A linear map's role in a layer, from its name there (see ROLES)."""
    for role, names in ROLES:
        if any(name == n or name.endswith("." + n) for n in names):
            return role
    return None


def _check_prunable(model) -> None:
    """Refuse a model with a layer whose matrices pruning cannot place (a hybrid's state-space blocks)."""
    for name, module in (item for layer in model_parts(model).layers for item in layer.named_modules()):
        matrices = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
        if matrices and (not isinstance(module, nn.Linear) or _role(name) is None):
            raise TedcacheError(f"--init prune reads BERT-style (query, key, value, intermediate, output) and "
                                f"Llama/OPT-style (q_proj ... o_proj, gate/up/down_proj, fc1/fc2) layers; "
                                f"{type(model).__name__} has '{name}' ({type(module).__name__}): use --init copy or random")


@torch.no_grad()
def _importance(model, batches) -> dict:
    """Minitron's activation-based importance: of each attention head (the norm of its output), FFN neuron
    (its activation's magnitude) and hidden channel (its magnitude in every norm's output), each averaged
    over a sequence's real tokens, then the L2 norm over sequences (and, for channels, over norms)."""
    shape, width = source_shape(model.config), model.config.hidden_size
    squares: dict = {}
    real: list[torch.Tensor] = []

    def add(key, per_token: torch.Tensor) -> None:  # per_token: (batch, tokens, units)
        mask = real[0].to(per_token.dtype)[..., None]
        per_sequence = (per_token * mask).sum(1) / mask.sum(1)
        squares[key] = squares.get(key, 0) + (per_sequence.float() ** 2).sum(0)

    def heads(i):
        return lambda module, args: add(("heads", i), args[0].unflatten(-1, (-1, shape.head_size)).norm(dim=-1))

    def neurons(i):
        return lambda module, args: add(("ffn", i), args[0].abs())

    hooks = [module.register_forward_hook(lambda module, args, out: add("hidden", out.abs()))
             for module in model.modules() if holds_only_vectors(module, width)]
    for i, layer in enumerate(model_parts(model).layers):
        for name, module in layer.named_modules():
            role = _role(name)
            if role in ("attention_out", "ffn_out"):
                hooks.append(module.register_forward_pre_hook(heads(i) if role == "attention_out" else neurons(i)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            real[:] = [batch["attention_mask"]]
            model(**model_inputs(batch))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return {key: value.sqrt() for key, value in squares.items()}


def _top(scores: torch.Tensor, count: int) -> list[int]:
    """The indices of the `count` largest scores, in their original order."""
    return sorted(torch.topk(scores, count).indices.tolist())


def _prune(source, shape: Shape, keep: list[int], batches):
    """The source narrowed to `shape` on the layers `keep`: per layer the most important key/value head
    groups (a group: a key/value head and the query heads sharing it) and FFN neurons, and everywhere the
    most important hidden channels. Returns (student, what was kept)."""
    have = source_shape(source.config)
    score = _importance(source, batches)
    group = have.heads // have.kv_heads
    hidden = _top(score["hidden"], shape.width)
    groups = [_top(score[("heads", i)].view(have.kv_heads, group).sum(1), shape.kv_heads) for i in keep]
    ffn = [_top(score[("ffn", i)], shape.ffn) for i in keep]
    config = _student_config(source.config, shape, keep, getattr(source.config, "head_dim", None) is not None)
    student = type(source)(config)
    student.load_state_dict(_sliced_state(source, student, keep, hidden, groups, ffn))
    heads = [[g * group + k for g in kept for k in range(group)] for kept in groups]
    return student, {"hidden": hidden, "heads": heads, "ffn": ffn}


def _sliced_state(source, student, keep: list[int], hidden: list[int], groups: list[list[int]],
                  ffn: list[list[int]]) -> dict:
    """The student's state dict cut out of the source's: each tensor indexed along each of its dimensions by
    what was kept there (hidden channels; a layer's heads' channels or FFN neurons, by the map's role)."""
    have = source_shape(source.config)
    group, size = have.heads // have.kv_heads, have.head_size
    layers = model_parts(source).layers
    stack = next(name for name, module in source.named_modules() if module is layers)
    weights, state = source.state_dict(), {}
    for name, target in student.state_dict().items():
        kept: dict[int, list[int]] = {}
        source_name, role = name, None
        if name.startswith(stack + "."):
            j, inner = name[len(stack) + 1:].split(".", 1)
            j = int(j)
            source_name, role = f"{stack}.{keep[j]}.{inner}", _role(inner.rsplit(".", 1)[0])
            kv = [g * size + c for g in groups[j] for c in range(size)]
            query = [(g * group + k) * size + c for g in groups[j] for k in range(group) for c in range(size)]
        tensor = weights[source_name]
        if role == "attention_in":
            kept = {0: query if tensor.shape[0] == have.heads * size else kv, 1: hidden}
        elif role == "attention_out":
            kept = {0: hidden, 1: query}
        elif role == "ffn_in":
            kept = {0: ffn[j], 1: hidden}
        elif role == "ffn_out":
            kept = {0: hidden, 1: ffn[j]}
        else:
            kept = {d: hidden for d in range(tensor.dim())
                    if tensor.shape[d] == have.width and target.shape[d] == len(hidden) != have.width}
        for dim, index in kept.items():
            if dim < tensor.dim():
                tensor = tensor.index_select(dim, torch.tensor(index))
        if tensor.shape != target.shape:
            raise TedcacheError(f"cannot prune {type(source).__name__}: {name} would be {tuple(tensor.shape)}, "
                                f"the student needs {tuple(target.shape)}")
        state[name] = tensor.clone()
    return state
