"""What distill sets up before it trains (DistillRun), shared by its phases, its report and the Trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .cache import Cache, CacheMetadata
from .config import DistillConfig
from .distributed import Processes
from .loop import Checkpoint
from .losses import Stage2Loss


@dataclass
class DistillRun:
    """What `distill` sets up before training: the resolved settings, the cache, the student and its loss."""

    cfg: DistillConfig  # with the method's weights and the KD temperature resolved
    as_given: DistillConfig  # saved as the run's config.yaml: what re-runs this command
    requested: dict
    procs: Processes
    log: Callable
    cache: Cache
    tokenizer: object
    student: torch.nn.Module
    loss: Stage2Loss
    teacher_layers: list[int]
    device: torch.device
    autocast: bool
    checkpoint: Checkpoint
    started: float
    seconds: dict = field(default_factory=dict)  # where the run's time went: set_up, validation, test

    @property
    def meta(self) -> CacheMetadata:
        return self.cache.metadata

    @property
    def task(self) -> str:
        return self.cache.metadata.task
