"""The teacher's Stage I in an extraction: its filters trained (under DDP with many processes), measured,
and checkpointed in the unfinished cache so that a killed extraction resumes them."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from .cache import CacheMetadata
from .config import DEFAULT_CACHE_DIR
from .extract_run import ExtractRun
from .filters import FilterBank
from .loop import Checkpoint
from .models import input_device
from .reader import ExamplesSource
from .stage1 import FilterTraining, describe_filters, train_filters
from .state_store import StoredSource, in_order, stored_source
from .taps import num_layers
from .tasks import TASK
from .teacher_pass import pass_batches

STAGE1_CHECKPOINT = "stage1.checkpoint"  # inside an unfinished cache folder


def stage1_checkpoint(run: ExtractRun, metadata: CacheMetadata) -> Checkpoint:
    """Where Stage I keeps its state while it trains: inside the cache folder (whose creation, once the
    filters are trained, clears it); for a cache on an object store, a local folder named after it."""
    location, cfg, processes = run.location, run.cfg, run.procs.size
    name = Path(location.url.rstrip("/")).name
    folder = Path(location.path(STAGE1_CHECKPOINT)) if location.local else DEFAULT_CACHE_DIR / "stage1" / name
    return Checkpoint(folder, {"cache": metadata.identity, "processes": processes}, cfg.stage1_checkpoint_every)


def train_teacher_filters(run: ExtractRun, metadata: CacheMetadata, checkpoint: Checkpoint
                          ) -> tuple[FilterBank, dict, dict[str, StoredSource]]:
    """The trained filters, how well each learned (on the eval split when there is one), and the splits
    whose stored states and outputs the cache pass can use instead of the teacher (--stage1-states stored:
    the splits Stage I read whole; for a causal LM, only when its last layer is tapped). With many
    processes, trained under DDP by all of them."""
    teacher, spec, splits, cfg, log = run.teacher, run.spec, run.splits, run.cfg, run.log
    torch.manual_seed(cfg.seed)
    bank = FilterBank(spec).to(input_device(teacher))
    train = splits["train"]
    if "stage1_examples" in metadata.identity:
        sample = np.random.default_rng(cfg.seed).choice(len(train), metadata.identity["stage1_examples"], replace=False)
        train = train.reorder(np.sort(sample))
        log(f"stage I on {len(train)} of the {len(splits['train'])} training examples (--stage1-examples)")
    source = ExamplesSource(train)
    evaluation = ExamplesSource(splits["eval"]) if "eval" in splits else None
    stored = {}
    if cfg.stage1_states == "stored":  # filled with the cache pass's own batches where Stage I reads a whole split
        whole = {"train": len(train) == len(splits["train"]), "eval": True}
        stored = {split: stored_source(teacher, s, spec.layers, metadata.task,
                                       pass_batches(splits[split], split, cfg, metadata.pad_token_id) if whole[split]
                                       else in_order(s, cfg.batch_size, metadata.pad_token_id))
                  for split, s in (("train", source), ("eval", evaluation)) if s is not None}
        source, evaluation = stored["train"], stored.get("eval")
        log(f"stage I reads the teacher's states stored once ({sum(s.store.nbytes for s in stored.values()) / 2**20:.0f}"
            f" MiB in {tempfile.gettempdir()}, --stage1-states stored)")
    training = FilterTraining(metadata.task, metadata.num_outputs or 1, cfg.stage1, metadata.pad_token_id, cfg.seed,
                              cfg.filters.lm_head, "stage I (teacher filters)")
    result = train_filters(teacher, bank, source, training, evaluation, run.procs, checkpoint)
    teacher.eval()
    log(describe_filters(result["filters"]))
    # a causal LM's logits are its output layer on the last layer's state: stored when that layer is tapped
    reusable = not TASK[metadata.task].causal or spec.layers[-1] == num_layers(teacher) - 1
    return bank, result["filters"], {split: s for split, s in stored.items() if reusable and len(s) == len(splits[split])}
