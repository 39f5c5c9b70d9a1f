"""Stage I on the causal-LM demo's teacher with each next-token head: "tied" (the frozen output embedding
after a trainable d_f -> d map) against "new" (a trainable d_f -> vocabulary projection).

Trains the same filters (teacher layers 9, 19, 29) with each head for the same steps and reports the
held-out next-token loss of every filter + head, the trainable parameters and the seconds per step.
Run after `make demo-lm`:

    python examples/stage1_heads.py [--workdir ~/.cache/tedcache/demo] [--steps 24]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tedcache.config import DataConfig, TrainConfig
from tedcache.data import load_blocks
from tedcache.evaluate import evaluate
from tedcache.filters import FilterBank, FilterSpec
from tedcache.losses import lm_loss
from tedcache.models import load_causal_lm, load_tokenizer
from tedcache.reader import ExamplesSource, iterate_batches
from tedcache.stage1 import train_filters
from tedcache.demo_lm import QUICK, TEACHER_FILTER_LAYERS, smollm2, snippet_texts
from tedcache.taps import forward_with_taps, parse_layers


@torch.no_grad()
def held_out_losses(model, bank, heads, source) -> list[float]:
    model.eval()
    totals, batches = torch.zeros(len(heads)), 0
    for batch in iterate_batches(source, 16, 0):
        _, hidden = forward_with_taps(model, batch, bank.spec.layers)
        for j, (head, f) in enumerate(zip(heads, bank(hidden))):
            totals[j] += lm_loss(head(f), batch["input_ids"], batch["attention_mask"])
        batches += 1
    return (totals / batches).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "tedcache" / "demo"))
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    root = Path(args.workdir)
    teacher = smollm2(root / "smollm2-135m-instruct")
    files = snippet_texts(root / "stage1-heads" / "data", QUICK)
    tokenizer = load_tokenizer(teacher)
    config = DataConfig(train=[], task="causal-lm", block_size=QUICK.block_size)
    train = load_blocks([files["train"]], config, tokenizer, "--data", limit=args.steps * 8)
    held_out = ExamplesSource(load_blocks([files["validation"]], config, tokenizer, "--eval-data"))
    model = load_causal_lm(teacher)
    layers = parse_layers(TEACHER_FILTER_LAYERS, model.config.num_hidden_layers)
    print(f"| head | trainable params | s / step | held-out loss after {args.steps} steps, layers {layers} |")
    print("|---|---|---|---|")
    for kind in ("tied", "new"):
        torch.manual_seed(0)
        bank = FilterBank(FilterSpec(layers, model.config.hidden_size, model.config.hidden_size))
        started = time.perf_counter()
        heads = train_filters(model, bank, ExamplesSource(train), "causal-lm", None,
                              TrainConfig(epochs=1, lr=1e-3, batch_size=8), 0, lm_head=kind)["heads"]
        seconds = (time.perf_counter() - started) / args.steps
        params = sum(p.numel() for p in list(bank.parameters()) + list(heads.parameters()))
        losses = held_out_losses(model, bank, heads, held_out)
        print(f"| {kind} | {params / 1e6:.1f}M | {seconds:.2f} | {' / '.join(f'{x:.3f}' for x in losses)} |")
    own = evaluate(model, iterate_batches(held_out, 16, 0), "causal-lm")["loss"]
    print(f"the teacher's own held-out loss (its real head on its last layer): {own:.3f}")


if __name__ == "__main__":
    main()
