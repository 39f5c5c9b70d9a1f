"""Typed configuration: the one source of truth for the Python API, the CLI (its flags are generated from
these fields, see cli/options.py), YAML config files (`--config FILE`, nested like these classes) and
the configuration saved with every run and cache."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from .errors import TedcacheError
from .schema import setting
from .tasks import TASKS

METHODS = ("ted", "kd", "lwd", "finetune")


def check_methods(methods: list[str], raw_cache: str | None) -> None:
    """compare's and tune's --methods: known names, at least one, and lwd only with a raw-state cache."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise TedcacheError(f"unknown --methods {', '.join(unknown) or '(none)'}; use some of {', '.join(METHODS)}")
    if "lwd" in methods and not raw_cache:
        raise TedcacheError("--methods lwd needs --raw-cache: a cache extracted with --states raw from the same "
                            "teacher and data (or leave lwd out of --methods)")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
TEACHER_DTYPES = ("auto", "bf16", "fp16", "fp32")  # auto: bf16 on a GPU that has it, else fp32
TRAIN_PRECISIONS = ("auto", "bf16-mixed", "fp32")  # distill; auto: bf16-mixed on a GPU, fp32 elsewhere
WRITERS = ("auto", "process", "thread")  # where extraction writes units; auto: process on a GPU, thread on a CPU
FILTER_KINDS = ("linear", "mlp")
MSE_NORMS = ("none", "variance")
STATE_KINDS = ("filtered", "raw", "none")  # raw: unfiltered hidden states (LWD); none: logits only (KD)
LM_HEADS = ("tied", "new")  # causal-lm Stage-I heads: the frozen output embedding, or a fresh one
KD_TARGETS = ("auto", "sampled", "logits")
STAGE1_STATES = ("stored", "live")  # see state_store.stored_source


def stage1_states_setting(default: str):
    return setting(default, "Stage I's frozen states: stored (computed once, dropout off, then read at every "
                            "step: about one forward pass in all) or live (the model run at every step with "
                            "dropout on, as in the reference). See docs/performance.md.", choices=STAGE1_STATES)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "tedcache"
DEFAULT_CACHES = str(DEFAULT_CACHE_DIR / "caches")


@dataclass
class DataConfig:
    """Where the examples come from and how they are read and tokenized."""

    train: list[str] = setting(help="Training data: csv/tsv/json/jsonl/parquet/txt files, a datasets "
                                    "save_to_disk folder, or a hub name.", flag="--data")
    transfer: list[str] | None = setting(None, "extract: unlabelled training text (same formats; only the text "
                                               "columns are read). The cache holds its teacher outputs and states; "
                                               "distill trains on it without a task loss. Rows of --data with an "
                                               "empty label count as such too.", flag="--transfer-data")
    eval: list[str] | None = setting(None, "Evaluation split (same formats); picks the best epoch.", flag="--eval-data")
    test: list[str] | None = setting(None, "Test split, scored once with the best model.", flag="--test-data")
    task: str = setting("classification", "classification, regression, causal-lm (plain text packed into blocks) "
                                          "token-classification (a list of words and one of tags per row, or "
                                          ".conll files) or question-answering (extractive: SQuAD json, or "
                                          "question/context/answers columns).",
                        choices=TASKS)
    text_column: str = setting("text", "Column holding the text.")
    text_pair_column: str | None = setting(None, "Second text of sentence-pair tasks.")
    label_column: str = setting("label", "Column holding the label.")
    max_length: int = setting(128, "Tokens per example (longer ones are truncated).")
    limit: int | None = setting(None, "Keep only the first N training rows (causal-lm: blocks).")
    block_size: int = setting(128, "causal-lm: tokens per block (documents joined by EOS, then cut).")
    doc_stride: int | None = setting(None, "question-answering: tokens that consecutive windows of a long "
                                           "context share (default: a third of --max-length, HF's 128 of 384).")


@dataclass
class OptimConfig:
    """Optimiser settings of one training phase (fine-tuning, Stage I, Stage II)."""

    epochs: float = setting(3.0, "Passes over the training split (fractions allowed).")
    lr: float = setting(2.5e-4, "Peak learning rate (AdamW, linear warm-up and decay).")
    batch_size: int = setting(32, "Examples per process and micro-batch (global batch: this x processes x grad-accum).")
    grad_accum: int = setting(1, "Micro-batches per optimiser step.")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    warmup_ratio: float = setting(0.0, "Share of the steps spent warming the learning rate up.")
    patience: int = setting(0, "Stop after this many evaluations without a better validation result; epochs is "
                               "then a cap (0: run every epoch).")


@dataclass
class FilterConfig:
    """TED filters: which teacher layers get one, its shape and its output width."""

    layers: str = setting("all", "Teacher layers to filter: all, every:K, or 0,5 (0-based).")
    kind: str = setting("linear", "Filter shape: linear or mlp.", choices=FILTER_KINDS, flag="--filter")
    dim: int | None = setting(None, "Filter output width (default: the teacher's hidden size).", flag="--filter-dim")
    lm_head: str = setting("tied", "causal-lm Stage-I head: tied (frozen output embedding after a trainable map) "
                                   "or new (a trainable vocabulary projection).", choices=LM_HEADS)


@dataclass
class ExtractConfig:
    """`tedcache extract`: Stage I on the teacher, then one teacher pass written to a cache."""

    teacher: str = setting(help="Fine-tuned teacher: an HF model folder or hub name.")
    data: DataConfig = setting(help="Data settings.", prefix="")
    filters: FilterConfig = setting(help="TED filter settings.", factory=FilterConfig, prefix="")
    stage1: OptimConfig = setting(help="Stage I (teacher filters) optimiser; with --eval-data it stops once the "
                                       "filters' validation loss stops improving (epochs: the cap).",
                                  factory=lambda: OptimConfig(epochs=10.0, lr=1e-3, patience=2), prefix="stage1-")
    stage1_examples: int | None = setting(None, "Stage I trains the filters on this many training examples, drawn "
                                                "at random with --seed (large corpora); the cache pass still covers "
                                                "them all. Default: all.")
    stage1_states: str = stage1_states_setting("stored")
    cache_dir: str = setting(DEFAULT_CACHES, "Where caches go: a folder or an fsspec URL (s3://bucket/prefix).")
    precision: str = setting("int8", "Stored states: fp32, fp16, bf16 or int8 (see docs/design.md).", choices=PRECISIONS)
    states: str = setting("filtered", "filtered (TED), raw (unfiltered hidden states, for --method lwd) or none "
                                      "(the teacher's outputs only, for --method kd: no Stage I, no states).",
                          choices=STATE_KINDS)
    logits: str = setting("sample:50", "causal-lm teacher distribution per token: sample:N, topk:K, full "
                                       "(small vocabularies) or hidden (the final hidden state and, once, the "
                                       "output layer: distill rebuilds the exact distribution).")
    logits_temperature: float = setting(1.0, "causal-lm: sample:N draws from softmax(logits / this); distill's "
                                             "default KD temperature for every --logits option.")
    batch_size: int = setting(64, "Teacher batch during the cache pass.")
    shard_tokens: int = setting(16384, "Tokens per shard: the unit of writing, resuming and checksumming.")
    seed: int = setting(42, "Seed of Stage I and of the training split's storage order.")
    device: str = setting("auto", "auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    dtype: str = setting("auto", "Precision the teacher's weights are loaded and run in: bf16, fp16, fp32, or auto (bf16 "
                                 "on a GPU that has it, fp32 on a CPU). Stage I's filters and the targets stay fp32.",
                         choices=TEACHER_DTYPES)
    writer: str = setting("auto", "Where units are compressed and written while the teacher computes the next: "
                                  "process (a forked process fed through shared memory: the teacher's interpreter "
                                  "never waits on zarr), thread, or auto (process on a GPU, thread on a CPU, where "
                                  "a process competes for the cores; docs/performance.md). The cache is the same.",
                          choices=WRITERS)
    device_map: str | None = setting(None, "Spread a teacher too big for one device: auto or balanced (accelerate's "
                                           "placement: the GPUs, then the CPU, then disk) or a JSON file mapping "
                                           "module names to devices (0, cuda:1, cpu, disk). The cache is the "
                                           "one device's. docs/distributed.md, \"Big models\".")
    stage1_checkpoint_every: int = setting(0, "Stage I optimiser steps between checkpoints of the filters, heads, "
                                              "optimiser and data position (0: after every epoch); a killed extract "
                                              "run again resumes Stage I from the last one.")
    devices_per_process: int = setting(0, "With --device-map and several processes per machine: the GPUs each "
                                          "process places its teacher over (process r owns GPUs r*K to r*K+K-1; "
                                          "a map file's GPU numbers count within them); 0: the machine's GPUs "
                                          "shared equally.")
    offload_dir: str | None = setting(None, "Where --device-map's disk offload goes (default: "
                                            "~/.cache/tedcache/offload); removed when extract ends.")
    compile: bool = setting(False, "Run the teacher through torch.compile (dynamic shapes; fused kernels for a "
                                   "launch-bound teacher). Values may differ from eager at float rounding, so "
                                   "the cache's identity records it; measured in docs/performance.md.")
    force: bool = setting(False, "Rebuild even if a cache of the same inputs exists.")
    wait: float = setting(3600.0, "Seconds to wait while another extraction writes the same cache (on any host "
                                  "sharing the cache folder), then reuse the cache it finished or resume the one "
                                  "it left; 0: refuse at once.")
    lock: bool = setting(True, "Take the cache's writer lock (docs/design.md, \"Sharing caches\"). --no-lock "
                               "writes without it: only for a store that does not honour conditional writes, "
                               "when nothing else writes this cache.")
    trust_remote_code: bool = setting(False, "Run code shipped with the model folder or hub repository (custom "
                                             "architectures). Off by default: such code runs with your rights.")


@dataclass
class DistillConfig:
    """`tedcache distill`: train a student against a cache (the teacher is not loaded, unless `teacher`
    asks for online mode)."""

    cache: str = setting(help="Cache folder printed by tedcache extract.")
    student: str = setting(help="Student: an HF model folder or hub name (with the teacher's tokenizer).")
    out: str = setting(help="Folder for the best student, its tokenizer, metrics.json and config.yaml "
                            "(compare: one such folder per method and seed inside it).")
    method: str = setting("kd", "kd (the default: the evidence study resolved TED ahead of it in no setting, "
                                "docs/evidence.md), ted, lwd (needs a raw-state cache) or finetune.", choices=METHODS)
    seed: int = setting(42, "Seed of everything random in the run (head, filters, order, dropout).")
    kl_alpha: float = setting(1.0, "Weight of the KD term.")
    mse_alpha: float = setting(1.0, "Weight of the filtered-state (ted) or raw-state (lwd) term.")
    mse_norm: str = setting("none", "none, or variance: each layer's MSE divided by the variance of its cached "
                                    "teacher states, so an mse_alpha means the same for every teacher and "
                                    "precision (docs/choosing-methods.md).", choices=MSE_NORMS)
    temperature: float | None = setting(None, "KD temperature (default: 2.0; for a causal-lm cache, its "
                                              "--logits-temperature, 1 unless set).")
    kd_targets: str = setting("auto", "causal-lm: sampled (sample counts, unbiased) or logits (renormalised over "
                                      "the stored ids); auto = sampled for sample:N caches. A --logits hidden "
                                      "cache always gives the exact full distribution.", choices=KD_TARGETS)
    whole_logits: bool = setting(False, "causal-lm: take the next-token and KD terms from the student's whole "
                                        "(positions x vocabulary) logits. Off (default), with exact KD targets (a "
                                        "--logits hidden cache) or none, they come from its final states through its "
                                        "output layer a chunk of positions at a time: the same values, far less memory.")
    # lr and warm-up from the evidence study's tuning (docs/evidence.md, "Defaults")
    optim: OptimConfig = setting(help="Stage II optimiser.",
                                 factory=lambda: OptimConfig(epochs=3.0, lr=2.5e-4, warmup_ratio=0.1), prefix="")
    student_layers: str = setting("all", "Student layers that get filters (ted, lwd): all, every:K or 0,1.")
    layer_map: str = setting("auto", "Which teacher layer each student layer matches (ted, lwd): auto (interval "
                                     "where it pairs every chosen student layer, else provenance for a student "
                                     "that records its origin; the run's log says which and why); interval (TED's "
                                     "rule over the cached layers); for init-student's copied or pruned students "
                                     "provenance (the layer each student layer carries; layers whose teacher layer "
                                     "is not cached are left out and named) or copy (the layer the next carried "
                                     "layer reads; the last with the teacher's last); last:K (the student's last K "
                                     "layers with the teacher's last K); or pairs like 0:2,1:5. See "
                                     "docs/choosing-methods.md.")
    finetune_first: float = setting(0.0, "ted: epochs of plain fine-tuning before Stage I (the reference's practice).")
    stage1: OptimConfig = setting(help="Stage I (student filters) optimiser; every process runs it whole, stopping "
                                       "once the validation loss stops improving (epochs: the cap; 0: untrained).",
                                  factory=lambda: OptimConfig(epochs=10.0, lr=1e-3, patience=2), prefix="stage1-")
    stage1_states: str = stage1_states_setting("stored")
    eval_every: int = setting(0, "Optimiser steps between evaluations (0: once per epoch).")
    max_steps: int | None = setting(None, "Stop after this many optimiser steps.")
    log_every: int = setting(10, "Optimiser steps between loss records in metrics.json.")
    verify: bool = setting(False, "Check every shard's checksum before training.")
    workers: int = setting(0, "DataLoader worker processes reading the cache (0: read in the training process).")
    shard_reads: bool = setting(False, "Many processes: each reads only its own 1/N of the training windows "
                                       "(object stores, large caches); global batches are then not exactly "
                                       "one process's. See docs/distributed.md.")
    reuse_stage1: bool = setting(True, "ted: keep the student's Stage I filters (under "
                                       "~/.cache/tedcache/student-filters, keyed by the student's initial weights and "
                                       "configuration, the layers, the cache, the Stage I settings and the seed) and "
                                       "reuse them in every later run with the same key, as tune's trials and compare's "
                                       "methods have: the run's outcome is the same.")
    read_ahead: int | None = setting(None, "Cache windows (up to 16 MiB of states each) read concurrently "
                                           "ahead of training; default 0 from a local disk, 4 from an object "
                                           "store, where their request latencies overlap.")
    teacher: str | None = setting(None, "Online mode: compute the targets live with this teacher (the one the cache "
                                        "was extracted from) and the cache's filters.")
    device: str = setting("auto", "auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    fsdp: bool = setting(False, "Many processes: shard the student, its filters, gradients and optimiser state "
                                "over them (FSDP2) instead of replicating them (DDP), for a student whose training "
                                "state does not fit one device. See docs/distributed.md, \"Big models\".")
    train_precision: str = setting("auto", "bf16-mixed: forward passes under bf16 autocast, the weights, optimiser state and "
                                     "every loss term in fp32; fp32: everything fp32; auto: bf16-mixed on a GPU, fp32 "
                                     "elsewhere. docs/distributed.md, \"Mixed precision\".", choices=TRAIN_PRECISIONS)
    resume: bool = setting(False, "Continue from the checkpoint an interrupted run left in OUT.checkpoint.")
    checkpoint_every: int = setting(0, "Optimiser steps between checkpoints (0: after every epoch).")
    trust_remote_code: bool = setting(False, "Run code shipped with the model folder or hub repository (custom "
                                             "architectures). Off by default: such code runs with your rights.")


def what_it_computes(requested: dict) -> dict:
    """A distill configuration (as saved in metrics.json) less the settings that only say how the run
    survives interruption or reads its cache: two runs that agree on the rest train the same student.
    A setting missing from `requested` (saved before the setting existed) counts as its default."""
    defaults = {f.name: f.default for f in fields(DistillConfig) if f.default is not MISSING}
    how = ("resume", "checkpoint_every", "read_ahead", "reuse_stage1")
    return {k: v for k, v in {**defaults, **requested}.items() if k not in how}


@dataclass
class FinetuneConfig:
    """`tedcache finetune`: ordinary fine-tuning of a model on labelled data."""

    model: str = setting(help="Model to fine-tune: an HF model folder or hub name.")
    out: str = setting(help="Folder for the fine-tuned model, its tokenizer, metrics.json and config.yaml.")
    data: DataConfig = setting(help="Data settings.", prefix="")
    seed: int = setting(42, "Seed of the new head, the order and dropout.")
    optim: OptimConfig = setting(help="Optimiser.", factory=lambda: OptimConfig(lr=1e-4, warmup_ratio=0.1),
                                 prefix="")
    trust_remote_code: bool = setting(False, "Run code shipped with the model folder or hub repository (custom "
                                             "architectures). Off by default: such code runs with your rights.")


STUDENT_INITS = ("copy", "random", "prune")
STUDENT_EMBEDDINGS = ("teacher", "random")


@dataclass
class StudentConfig:
    """`tedcache init-student`: a student made from a model (usually the teacher), saved as a model folder
    whose config records how it was made."""

    source: str = setting(help="The model the student is made from: an HF model folder or hub name.", flag="--from")
    out: str = setting(help="Folder the student is saved to.")
    init: str = setting("copy", "copy: the source's --layers, weights and all (DistilBERT-style); random: a "
                                "randomly initialised model of the source's kind and vocabulary, shaped by --depth, "
                                "--width, --heads and --ffn; prune: the source's --layers narrowed to --width, "
                                "--heads and --ffn, keeping the attention heads, FFN neurons and hidden channels "
                                "most active on a sample of --data (Minitron). See docs/choosing-methods.md.",
                         choices=STUDENT_INITS)
    layers: list[int] | None = setting(None, "copy, prune: the source's 0-based layers to keep (prune default: all).")
    depth: int | None = setting(None, "random: the number of layers (default: the source's).")
    width: int | None = setting(None, "random, prune: the hidden size (default: the source's).")
    heads: int | None = setting(None, "random, prune: attention heads (default: --width / the source's head size).")
    ffn: int | None = setting(None, "random, prune: the FFN width (default: --width x the source's FFN/hidden ratio).")
    embeddings: str = setting("teacher", "random: teacher (the source's token and position embeddings, projected "
                                         "onto their top principal directions when --width is smaller) or random.",
                              choices=STUDENT_EMBEDDINGS)
    data: DataConfig = setting(help="prune: the training data whose activations rank what to keep.",
                               factory=lambda: DataConfig(train=[]), prefix="")
    calibration_examples: int = setting(256, "prune: examples drawn from --data (with --seed) to rank on.")
    seed: int = setting(0, "random: the initialisation's seed; prune: the calibration sample's.")
    trust_remote_code: bool = setting(False, "Run code shipped with the model folder or hub repository (custom "
                                             "architectures). Off by default: such code runs with your rights.")


@dataclass
class CompareConfig:
    """`tedcache compare`: several methods over several seeds from one cache. `base` holds what the runs
    share (its `out` receives one run folder per method and seed; its method and seed are set per run)."""

    base: DistillConfig = setting(help="The settings every run shares.", prefix="")
    methods: list[str] = setting(help="Methods to run.", factory=lambda: ["finetune", "kd", "lwd", "ted"])
    seeds: list[int] = setting(help="Seeds every method runs with.", factory=lambda: [1, 2, 3])
    raw_cache: str | None = setting(None, "Cache of raw states from the same teacher and data (lwd runs read it).")


PRUNERS = ("median", "halving", "none")


@dataclass
class TuneConfig:
    """`tedcache tune`: an Optuna study per method over one cache, the same number of trials for each,
    scored on the validation split only. `base` holds the fixed settings (its `out` receives the study,
    the trial folders and each method's best configuration)."""

    base: DistillConfig = setting(help="The settings every trial starts from (searched ones are overridden).",
                                  prefix="")
    methods: list[str] = setting(help="Methods to tune, each with its own search space.",
                                 factory=lambda: ["kd", "ted"])
    trials: int = setting(20, "Finished trials (complete or pruned) per method.")
    pruner: str = setting("median", "Stop trials whose validation curve is poor: median (Optuna's MedianPruner), "
                                    "halving (successive halving) or none.", choices=PRUNERS)
    raw_cache: str | None = setting(None, "Cache of raw states from the same teacher and data (lwd trials read it).")
    seeds: list[int] = setting(help="Seeds each trial runs; its value is the mean of their best validation scores "
                                    "(the averaging a paired comparison over seeds uses). Empty: the base's seed.",
                               factory=list)
    search: list[str] = setting(help="Parameters to search (names from the methods' spaces, e.g. optim.lr,kl_alpha); "
                                     "the others keep the base's values. Empty: each method's whole space.",
                                factory=list)


@dataclass
class SelectConfig:
    """`tedcache select`: tune each method with the same budget, run each one's best configuration on the
    same seeds, read the paired verdicts, and keep the winning student. `base` holds what every run
    shares (its `out` receives tune/, runs/, best/ and select.json)."""

    base: DistillConfig = setting(help="The settings every trial and run starts from.", prefix="")
    methods: list[str] = setting(help="Methods to choose between.", factory=lambda: ["finetune", "kd", "ted"])
    trials: int = setting(20, "Finished tuning trials per method (the same budget for each; 20 or more lets TPE "
                                  "model the results after its 10 random start-up trials, docs/evidence.md).")
    pruner: str = setting("median", "Tuning's pruner: median, halving or none.", choices=PRUNERS)
    raw_cache: str | None = setting(None, "Cache of raw states from the same teacher and data (lwd reads it).")
    seeds: list[int] = setting(help="Paired seeds each method's best configuration runs with.",
                               factory=lambda: [1, 2, 3])
