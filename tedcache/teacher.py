"""The teacher's targets for a batch, shared by both stages: extraction writes them to the cache, and
distill's online mode (`--teacher`) computes them live with the same function, so the two paths differ
only in where the targets come from (and the cache's precision)."""

from __future__ import annotations

import torch

from .cache import Cache, CompactStates
from .cache.logits import LogitSpec, sparsify
from .errors import TedcacheError
from .filters import FilterBank
from .models import load_for_task, weights_hash
from .state_store import STORED_KEY, frozen_forward
from .taps import in_own_dtype, model_parts, num_layers


@torch.no_grad()
def teacher_targets(teacher, bank: FilterBank | None, batch: dict, layers: list[int] | None = None,
                    final: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """What the cache stores for a batch: teacher logits (B, C; causal-lm (B, L, V)) and per tapped layer
    the filtered state (B, L, d_f), or the raw hidden state (B, L, d) when `bank` is None (then `layers`
    says which); with `final` (--logits hidden), one more state last: the final normed hidden state the
    output layer reads (B, L, d). Teacher and filters must be in eval mode.

    A batch that carries the teacher's stored states (state_store.StoredSource, from Stage I) is not run
    again: its states are those of the filters' layers, and for a causal LM, whose logits are not
    stored, they end at the last layer, whose state is the one the output layer reads (see
    teacher_filters.train_teacher_filters); `layers` is then those layers, or none."""
    tapped = bank.spec.layers if bank is not None else list(layers or [])
    if STORED_KEY in batch:
        logits, stored = frozen_forward(teacher, batch, tapped)
        if logits is None:
            logits = in_own_dtype(model_parts(teacher).head, stored[-1])
        hidden, last = stored[:len(tapped)], [stored[-1]] if final else []
    else:
        logits, hidden = frozen_forward(teacher, batch, tapped + ([num_layers(teacher) - 1] if final else []))
        last = [hidden.pop()] if final else []
    states = bank(hidden) if bank is not None else hidden
    return logits.float(), [s.float() for s in [*states, *last]]


class LiveTargets:
    """Online mode: the teacher (and the cache's teacher filters) in memory, filling each batch with the
    targets the cache would hold, computed as the extraction computed them (eval mode, full precision).
    Offline and online losses agree to within the cache's precision (with an fp32 cache, to float
    rounding). Only the mapped layers are kept. Loading the teacher draws from no generator the student's
    training uses."""

    def __init__(self, teacher_dir: str, cache: Cache, teacher_layers: list[int], device: torch.device, seed: int = 0):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # built modules draw weights
            self._load(teacher_dir, cache, teacher_layers, device, seed)

    def _load(self, teacher_dir: str, cache: Cache, teacher_layers: list[int], device: torch.device, seed: int):
        meta = cache.metadata
        self.teacher = load_for_task(teacher_dir, "teacher", meta.task, resize=False,
                                     trust_remote_code=meta.trust_remote_code, dtype=meta.teacher_dtype).to(device).eval()
        if weights_hash(self.teacher) != meta.teacher_weights_sha256:
            raise TedcacheError(f"--teacher {teacher_dir} is not the teacher this cache was extracted from; "
                                "pass that teacher, or extract a cache from this one")
        self.bank, self.layers = None, teacher_layers
        if meta.states == "filtered":
            self.bank = FilterBank.from_bytes(cache.filter_files()).select(teacher_layers).to(device).eval()
        self.logit_spec = LogitSpec(**meta.logits) if meta.logits else None
        self.generator = torch.Generator(device).manual_seed(seed)  # fresh draws: sampled rows differ from the cache's

    def __call__(self, batch: dict) -> dict:
        final = self.logit_spec is not None and self.logit_spec.kind == "hidden"
        with torch.autocast(batch["input_ids"].device.type, enabled=False):  # the extraction ran without autocast
            logits, states = teacher_targets(self.teacher, self.bank, batch, self.layers, final)
        targets = {**batch, "teacher_states": [CompactStates(s) for s in states]}
        if self.logit_spec is None:
            return {**targets, "teacher_logits": logits}
        if final:
            return {**targets, "teacher_states": targets["teacher_states"][:-1], "teacher_hidden": CompactStates(states[-1])}
        rows = sparsify(logits.flatten(0, 1), self.logit_spec, self.generator)
        rows = {k: v.view(*logits.shape[:2], -1) for k, v in rows.items()}
        rows["ids"] = rows["ids"].masked_fill(~batch["attention_mask"].bool().unsqueeze(-1), -1)
        return {**targets, "teacher_rows": rows}
