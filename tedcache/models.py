"""Loading HF models and tokenizers, and their identity hashes."""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from .errors import TedcacheError, size_text
from .taps import model_parts
from .tasks import TASK


def check_source(name: str, what: str) -> None:
    path = Path(name)
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if looks_local and not path.is_dir():
        raise TedcacheError(f"{what} folder {name} does not exist; give a model folder or a hub name")


def load_tokenizer(name: str, what: str = "model", trust_remote_code: bool = False):
    check_source(name, what)
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise TedcacheError(f"cannot load a tokenizer from {what} {name} ({type(exc).__name__}); "
                            "give a folder with tokenizer files, or a hub name when online") from exc


HEAD_CLASSES = {"token-classification": (AutoModelForTokenClassification, "a token classifier"),
                "question-answering": (AutoModelForQuestionAnswering, "an extractive question-answering model")}


def load_classifier(name: str, what: str = "model", task: str | None = None,
                    label_names: list[str] | None = None, trust_remote_code: bool = False,
                    dtype: torch.dtype | None = None, placement: dict | None = None):
    """An AutoModelForSequenceClassification (token-classification: AutoModelForTokenClassification,
    question-answering: AutoModelForQuestionAnswering); with label_names/task given, its head is sized
    to them. `placement`: from_pretrained's device_map and offload_folder (see load_for_task)."""
    check_source(name, what)
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
    return _from_pretrained(auto, name, what, kind, dtype, ignore_mismatched_sizes=bool(kwargs),
                            trust_remote_code=trust_remote_code, **kwargs, **(placement or {}))


def load_causal_lm(name: str, what: str = "model", trust_remote_code: bool = False, dtype: torch.dtype | None = None,
                   placement: dict | None = None):
    """An AutoModelForCausalLM (GPT-2, Llama, SmolLM, ...); in `dtype` when given (else as HF loads it: fp32)."""
    check_source(name, what)
    return _from_pretrained(AutoModelForCausalLM, name, what, "a causal language model", dtype,
                            trust_remote_code=trust_remote_code, **(placement or {}))


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def teacher_dtype(name: str, device: torch.device) -> str:
    """--dtype resolved: auto is bf16 on a GPU that supports it and fp32 elsewhere (CPU bf16 matmuls are
    slower than fp32 ones on most CPUs)."""
    if name != "auto":
        return name
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def _from_pretrained(auto_class, name: str, what: str, kind: str, dtype: torch.dtype | None, **kwargs):
    """auto_class.from_pretrained (in `dtype` when given, else HF's default, fp32), its failures turned into
    one line; the model's parts found (model_parts)."""
    try:
        if kwargs.get("device_map") is not None:
            kwargs["device_map"] = _fitted_map(auto_class, name, dtype, kwargs)
        model = auto_class.from_pretrained(name, **kwargs, **({"dtype": dtype} if dtype is not None else {}))
    except TedcacheError:
        raise
    except Exception as exc:
        if "trust_remote_code" in str(exc):
            raise TedcacheError(f"{what} {name} ships its own model code; pass --trust-remote-code to run it "
                                "(only for code you have read or trust)") from exc
        raise TedcacheError(f"cannot load {what} {name} as {kind} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from exc
    model_parts(model)  # its parts found now, so a model tedcache cannot read is refused at load time
    return model


def load_for_task(name: str, what: str, task: str, label_names: list[str] | None = None, resize: bool = True,
                  trust_remote_code: bool = False, dtype: str = "fp32", placement: dict | None = None):
    """The model class a task trains: a causal LM, or a sequence classifier (its head resized to the
    task's labels when `resize`), its weights in `dtype` (bf16, fp16 or fp32). Code shipped with a model
    runs only with `trust_remote_code`. `placement` ({"device_map": ..., "offload_folder": ...}) spreads
    the model over devices with accelerate's big-model placement (see input_device)."""
    if TASK[task].causal:
        return load_causal_lm(name, what, trust_remote_code, DTYPES[dtype], placement)
    if not resize:
        return load_classifier(name, what, task if task in HEAD_CLASSES else None,
                               trust_remote_code=trust_remote_code, dtype=DTYPES[dtype], placement=placement)
    return load_classifier(name, what, task, label_names, trust_remote_code, DTYPES[dtype], placement)


DEVICE_MAP_RULES = ("auto", "balanced", "balanced_low_0", "sequential")


def placement(device_map: str | None, offload_root: Path, gpus: list[int] | None = None) -> dict | None:
    """--device-map resolved into from_pretrained's arguments: a rule of accelerate's (GPUs first, then the
    CPU, then disk) or a JSON file mapping module names to devices (0, "cuda:1", "cpu", "disk"). `gpus`:
    this process's group of GPUs (see device_group), over which a rule places and to which a file's GPU
    numbers are relative. Offloaded weights go to a folder under `offload_root` that is removed when the
    process ends. None: no map."""
    if device_map is None:
        return None
    if device_map in DEVICE_MAP_RULES:
        chosen = device_map
    else:
        try:
            chosen = json.loads(Path(device_map).read_text())
        except (OSError, ValueError) as exc:
            raise TedcacheError(f"--device-map {device_map}: not one of {', '.join(DEVICE_MAP_RULES)} nor a readable "
                                f"JSON file mapping module names to devices ({type(exc).__name__})") from exc
        if not isinstance(chosen, dict):
            raise TedcacheError(f"--device-map {device_map} holds a {type(chosen).__name__}, not a map of module "
                                "names to devices")
        chosen = {module: _in_group(device, gpus, device_map) for module, device in chosen.items()}
    offload_root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="offload-", dir=offload_root))
    atexit.register(shutil.rmtree, folder, True)
    placed = {"device_map": chosen, "offload_folder": str(folder)}
    if gpus is not None:  # only the group's GPUs (and the CPU, then disk) are offered to the rule
        from accelerate.utils import get_max_memory

        placed["max_memory"] = {k: v for k, v in get_max_memory().items() if k in gpus or not isinstance(k, int)}
    return placed


def _in_group(device, gpus: list[int] | None, source: str):
    """A map file's device, its GPU number counted within this process's group."""
    number = device if isinstance(device, int) else (int(device[5:]) if str(device).startswith("cuda:") else None)
    if number is None or gpus is None:
        return device
    if number >= len(gpus):
        raise TedcacheError(f"--device-map {source} names GPU {number}, but each process owns {len(gpus)} "
                            "(numbers in a map count within a process's group); use 0 to "
                            f"{len(gpus) - 1}, or more --devices-per-process")
    return gpus[number]


def device_group(per_process: int, local_rank: int, local_size: int, gpu_count: int) -> list[int] | None:
    """The GPUs a process places its teacher over: process r of a machine's N owns GPUs r*K to r*K+K-1,
    K = `per_process` (0: the machine's GPUs shared equally). None on a machine without GPUs, or for a
    single process given no K (all GPUs)."""
    if gpu_count == 0 or (local_size == 1 and per_process == 0):
        return None
    share = per_process or gpu_count // local_size
    if share == 0 or share * local_size > gpu_count:
        raise TedcacheError(f"{local_size} processes per machine with {share or 1} GPUs each need "
                            f"{(share or 1) * local_size} GPUs; this machine has {gpu_count}: run fewer processes "
                            "or give fewer --devices-per-process")
    return list(range(local_rank * share, (local_rank + 1) * share))


def _fitted_map(auto_class, name: str, dtype: torch.dtype | None, kwargs: dict):
    """from_pretrained's device map, decided on a weightless copy of the model (a rule resolved as accelerate
    resolves it, or a file's map as given) and checked against each device's free memory and the offload
    folder's free disk, so that a map that cannot hold the model is refused before anything loads."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import compute_module_sizes, get_balanced_memory, get_max_memory
    from transformers import AutoConfig

    config_keys = ("num_labels", "problem_type", "id2label", "label2id", "trust_remote_code")
    config = AutoConfig.from_pretrained(name, **{k: v for k, v in kwargs.items() if k in config_keys})
    with init_empty_weights():
        skeleton = auto_class.from_config(config, trust_remote_code=kwargs.get("trust_remote_code", False))
    skeleton = skeleton.to(dtype) if dtype is not None else skeleton
    skeleton.tie_weights()
    chosen, offered = kwargs["device_map"], kwargs.get("max_memory")
    if isinstance(chosen, str):
        split = skeleton._no_split_modules
        budget = (get_max_memory(offered) if chosen == "sequential" else
                  get_balanced_memory(skeleton, offered, no_split_module_classes=split, low_zero=chosen == "balanced_low_0"))
        chosen = infer_auto_device_map(skeleton, max_memory=budget, no_split_module_classes=split)
    sizes, needed = compute_module_sizes(skeleton), {}
    for module, device in chosen.items():
        device = int(device[5:]) if str(device).startswith("cuda:") else device
        needed[device] = needed.get(device, 0) + sizes.get(module, 0)
    offload = Path(kwargs["offload_folder"])
    free = {**get_max_memory(offered), "disk": shutil.disk_usage(offload).free}
    for device, size in needed.items():
        if device in free and size > free[device]:
            shown = f"cuda:{device}" if isinstance(device, int) else f"disk ({offload.parent})" if device == "disk" else device
            raise TedcacheError(f"the device map puts {size_text(size)} of the teacher's weights on {shown}, which has "
                                f"{size_text(free[device])} free; free room there, or map fewer modules to it")
    return chosen


def input_device(model) -> torch.device:
    """Where a model's inputs go: its device, or for a model placed by a device map (accelerate) the first
    GPU of the map (parts offloaded to the CPU or disk run there too), else the CPU."""
    placed = getattr(model, "hf_device_map", None)
    if not placed:
        return next(model.parameters()).device
    gpus = [d for d in placed.values() if d not in ("cpu", "disk")]
    return torch.device(f"cuda:{gpus[0]}" if isinstance(gpus[0], int) else gpus[0]) if gpus else torch.device("cpu")


def weights_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer, in name order: the model's identity in a cache. Weights a
    device map offloaded (left on the meta device) are read one module at a time from their offload."""
    from accelerate.utils import align_module_device

    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        if tensor.is_meta:
            owner, _, leaf = key.rpartition(".")
            module = model.get_submodule(owner)
            with align_module_device(module, "cpu"):
                tensor = getattr(module, leaf)
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def source_hash(model: str) -> str:
    """sha256 of a model folder's configuration and weight files as stored (bytes, not loaded tensors, so
    equal on every machine); a name that is not a local folder (a hub model) stands for itself."""
    folder = Path(model)
    if not folder.is_dir():
        return model
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and (path.suffix in WEIGHT_FILES or path.name == "config.json"):
            digest.update(str(path.relative_to(folder)).encode())
            with path.open("rb") as stream:
                for block in iter(lambda: stream.read(1 << 24), b""):
                    digest.update(block)
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
