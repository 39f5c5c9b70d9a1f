"""TED from the demo's cache with Hugging Face's Trainer (tedcache.hf.DistillationTrainer), then the
student scored on the cache's validation split as distill scores it.

    python examples/hf_trainer.py WORKDIR [EPOCHS]

WORKDIR holds the demo's artefacts (`tedcache demo` makes the same ones; they are reused): the
fine-tuned MiniLM teacher, its 2-layer student and the cache."""

import sys
from pathlib import Path

from transformers import TrainingArguments

from tedcache import extract
from tedcache.demos.demo import QUICK_DEMO, prepare
from tedcache.evaluate import evaluate
from tedcache.hf import DistillationTrainer
from tedcache.reader import CacheSource, iterate_batches


def main(work: Path, epochs: float) -> None:
    setup = prepare(str(work), QUICK_DEMO, seed=42)
    cache = extract(setup.extract_config(42))
    args = TrainingArguments(str(work / "hf-trainer"), num_train_epochs=epochs, per_device_train_batch_size=32,
                             learning_rate=2.5e-4, warmup_steps=0.1, logging_steps=20, save_strategy="no",
                             report_to=[], seed=42)
    trainer = DistillationTrainer(cache, setup.student, args, method="ted")
    trainer.train()
    trainer.save_model()
    for record in trainer.state.log_history:
        if "stage2/loss" in record:
            print({k: round(v, 4) for k, v in record.items() if k == "step" or k.startswith("stage2/")})
    run = trainer.run
    scores = evaluate(run.student, iterate_batches(CacheSource(run.cache.split("eval")), 64, run.meta.pad_token_id),
                      run.task, label_names=run.meta.label_names)
    print(f"student after {epochs} epochs with the Trainer: validation {scores}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 3.0)
