"""The teacher pass: each unit of each split through the frozen teacher (or read from the states Stage I
stored), its targets encoded and handed to the cache writer while the teacher computes the next unit."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .cache import BackgroundWriter, CacheWriter, UnitStates
from .cache.claims import check_lock
from .cache.host_copies import HostCopies
from .cache.layout import FINAL, pack, storage_order
from .cache.logits import check_rebuilt, head_tensors, sparsify
from .config import ExtractConfig
from .data import Examples
from .extract_run import ExtractRun
from .losses import lm_loss_per_block
from .models import input_device
from .reader import ExamplesSource, iterate_batches
from .state_store import StateStore, StoredSource
from .taps import model_parts
from .tasks import TASK
from .teacher import teacher_targets
from .transfer import to_device


def run_unit(run: ExtractRun, bank, examples: Examples, pad: int, states: dict | None,
             generator: torch.Generator | None, stored: StateStore | None = None):
    """One unit through the teacher (or, with `stored`, read from the teacher's stored states and outputs
    for these examples: the values its forward gives, to float rounding). Training units pass `states`
    ({layer, or layout.FINAL for --logits hidden: codecs.UnitStates}), which receive each batch's
    per-token states in storage order. Returns
    (outputs, logit rows), where they were computed: outputs are the per-example (N, C) logit rows or, causal-lm,
    each block's mean next-token loss (N,), or with `per_token` (token classification, question
    answering) (tokens, C); with a `generator` (causal-lm training units), the sparse rows
    {"ids", "logprobs"[, "counts"]: (tokens, S)}. Nothing waits for the device inside the unit."""
    teacher, layers, logit_spec = run.teacher, run.layers, run.logit_spec
    per_token, batch_size = TASK[run.cfg.data.task].per_token, run.cfg.batch_size
    device = input_device(teacher)
    final = states is not None and FINAL in states
    outputs, rows = [], {}
    source = ExamplesSource(examples) if stored is None else StoredSource(ExamplesSource(examples), stored)
    for batch in iterate_batches(source, batch_size, pad):
        # real tokens, row-major (storage order), indexed from the host mask: no device sync per batch
        real = batch["attention_mask"].flatten().nonzero().squeeze(1).to(device)
        batch = to_device(batch, device)
        logits, filtered = teacher_targets(teacher, bank if states is not None else None, batch,
                                           layers if states is not None else [], final)
        for unit_states, s in zip((states or {}).values(), filtered):
            unit_states.add(_real(s, real))
        if per_token:
            outputs.append(_real(logits, real))
        elif logit_spec is None:
            outputs.append(logits)
        else:
            outputs.append(lm_loss_per_block(logits, batch["input_ids"], batch["attention_mask"]))
        if final and len(outputs) == 1:  # the unit's first batch
            head = head_tensors(model_parts(teacher).head, logit_spec.vocab)
            check_rebuilt(_real(logits, real), _real(filtered[-1], real), head)
        if generator is not None:
            for name, part in sparsify(_real(logits, real), logit_spec, generator).items():
                rows.setdefault(name, []).append(part)
    return torch.cat(outputs), {name: torch.cat(parts) for name, parts in rows.items()}


def _real(values: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(B, L, ...) -> the real tokens' rows (n, ...), `real` being their flat positions."""
    return values.flatten(0, 1).index_select(0, real)


def stored_units(splits: dict[str, Examples], bounds: dict[str, np.ndarray], seed: int,
                 units: list[tuple[str, int]]):
    """(split, unit, order, examples) for each of `units`: the unit's examples in the order the cache
    stores them (`order`: their indices in the split), `bounds[split]` being the cache's
    `<split>/unit_bounds`. Only one unit's tokens are gathered at a time."""
    orders = {split: storage_order(split, len(splits[split]), seed) for split in dict.fromkeys(s for s, _ in units)}
    for split, unit in units:
        order = orders[split][bounds[split][unit]:bounds[split][unit + 1]]
        yield split, unit, order, splits[split].reorder(order)


def unit_generator(seed: int, unit: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Sampling is seeded per unit, so a resumed or repaired unit draws exactly what a clean run drew (on
    the same kind of device: the draws are made where the logits are)."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, unit]).generate_state(1)[0]))


def teacher_pass(run: ExtractRun, writer: CacheWriter, bank, units: list[tuple[str, int]],
                 stored: dict[str, StoredSource] | None = None) -> None:
    """Compute `units` ((split, unit) pairs) and hand each to the writer; states and logit rows are
    stored for the training split only, per-token logits (token classification, question answering) for
    every split. The splits in `stored` are read from Stage I's stored states and outputs, the others run
    through the teacher. Without int8 channel scales yet, the first training unit sets them (see _prepare)."""
    teacher, splits, logit_spec, writer_kind = run.teacher, run.splits, run.logit_spec, run.cfg.writer
    stored = stored or {}
    meta = writer.metadata
    device = input_device(teacher)
    output_key = "logits" if logit_spec is None else "nll"
    per_token = TASK[meta.task].per_token
    sampled = logit_spec is not None and logit_spec.kind != "hidden"
    bounds = {split: writer.unit_bounds(split) for split in splits}
    # The teacher computes unit u+1 while the background writer pads, compresses, writes and checksums unit u.
    bar = tqdm(total=len(units), desc="teacher pass (units)", leave=False, disable=None)
    if writer_kind == "auto":
        writer_kind = "process" if device.type == "cuda" else "thread"
    copies = HostCopies(device)
    with BackgroundWriter(writer, writer_kind) as background:
        def hand_over(split, unit, outputs, rows, encoded):
            check_lock(run.location)
            background.write(split, unit, {} if per_token else {output_key: outputs.tolist()}, encoded, rows,
                             outputs if per_token else None)
            bar.update(1)

        for split, unit, order, part in stored_units(splits, bounds, meta.seed, units):
            train = split == "train"
            states = {key: UnitStates(meta.precision, writer.channel_scales.get(key), device)
                      for key in writer.state_keys} if train else None
            generator = unit_generator(meta.seed, unit, device) if train and sampled else None
            store = stored[split].store.take(stored[split], order) if split in stored else None
            outputs, rows = run_unit(run, bank, part, meta.pad_token_id, states, generator, store)
            if states and writer.needs_channel_scales():
                writer.calibrate({key: s.float_states() for key, s in states.items()})
            encoded = {key: s.finish(writer.channel_scales.get(key)) for key, s in states.items()} if train else None
            for landed in copies.push((split, unit, outputs, rows, encoded)):
                hand_over(*landed)
        for landed in copies.drain():
            hand_over(*landed)
        background.close()
    bar.close()


def pass_batches(examples: Examples, split: str, cfg: ExtractConfig, pad: int):
    """(example indices, batch) of one split as the cache pass forms them: unit by unit in storage order,
    batches of --batch-size (see stored_units and run_unit)."""
    order = storage_order(split, len(examples), cfg.seed)
    bounds = {split: pack(np.diff(examples.offsets)[order], cfg.shard_tokens)[1]}
    for _, _, indices, part in stored_units({split: examples}, bounds, cfg.seed,
                                            [(split, unit) for unit in range(len(bounds[split]) - 1)]):
        for batch in iterate_batches(ExamplesSource(part), cfg.batch_size, pad):
            yield indices[batch["example_index"].numpy()], batch
