"""A cache from Hugging Face's Trainer: DistillationTrainer is a transformers.Trainer whose loss is
tedcache's Stage II, set up as `tedcache distill` sets it up, on the batches distill reads."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainingArguments

from .config import DistillConfig
from .distillation import before_stage2, set_up, train_loader
from .errors import TedcacheError
from .stage2 import stage2_step
from .transfer import to_device


class DistillationTrainer(Trainer):
    """A transformers.Trainer that distils `student` against `cache`:

        trainer = DistillationTrainer("caches/teacher-...", "students/small",
                                      TrainingArguments("runs/ted", max_steps=1000), method="ted")
        trainer.train()

    `settings` are distill's (DistillConfig fields: method, kl_alpha, mse_alpha, layer_map, stage1, ...);
    the run's seed is args.seed. The student is loaded, checked against the cache (its tokenizer, the
    method's targets) and given its filters as distill does, and TED's Stage I of the student's filters
    runs here, before training. The optimiser, schedule, precision, clipping and saving are the
    Trainer's (TrainingArguments); it trains the student and its filters.

    Without a train_dataset the batches are distill's: the cache's windows in its seeded order, of
    args.per_device_train_batch_size examples, this process's part. With one (a reader.CacheDataset with
    its `collate` as data_collator, or columns of one's own), every batch must hold the targets the
    method reads (Stage2Loss.needs); the target columns are kept (remove_unused_columns is set off).
    Each logged record also carries the step's loss terms as `stage2/<term>`, unrounded."""

    def __init__(self, cache: str, student: str, args: TrainingArguments, trainer_kwargs: dict | None = None,
                 **settings):
        self.run = set_up(DistillConfig(cache=cache, student=student, out=args.output_dir, seed=args.seed, **settings))
        self.stage2_phases = before_stage2(self.run)
        args.remove_unused_columns = False  # the targets are not the model's arguments: keep them
        self._terms: list[dict] = []
        super().__init__(model=self.run.student, args=args,
                         **{"processing_class": self.run.tokenizer, **(trainer_kwargs or {})})

    def get_train_dataloader(self):
        if self.train_dataset is not None:
            return super().get_train_dataloader()
        return train_loader(self.run, self.args.per_device_train_batch_size, self.args.dataloader_num_workers)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        filters = self.run.loss.filters
        if filters is not None and not any(p is q for group in optimizer.param_groups for p in group["params"]
                                           for q in filters.parameters()):
            optimizer.add_param_group({"params": list(filters.parameters()), "weight_decay": self.args.weight_decay})
            # the Trainer clears the model's gradients after each step; these too (and Stage I's, left over)
            filters.zero_grad()
            optimizer.register_step_post_hook(lambda *_: filters.zero_grad())
        return optimizer

    def _prepare_inputs(self, inputs: dict) -> dict:
        return to_device(inputs, self.args.device)  # moves the compact teacher states too

    def compute_loss(self, model, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        missing = [key for key in self.run.loss.needs() if key not in inputs]
        if missing:
            raise TedcacheError(f"the batch has no {missing[0]!r}, which --method {self.run.cfg.method} reads; give "
                                "batches from a CacheDataset (with its collate) or none (the cache's own), or add "
                                "that column")
        loss, terms = stage2_step(model, self.run.loss, inputs)
        if model.training:
            self._terms.append({"loss": loss.detach(), **terms})
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._terms and "loss" in logs:  # the terms averaged over the steps since the last record
            for key in self._terms[0]:
                logs[f"stage2/{key}"] = float(torch.stack([t[key].float() for t in self._terms]).mean())
            self._terms = []
        super().log(logs, *args, **kwargs)
