"""TED against its baselines on the embedded default, over several seeds, with TED's weights tuned on
the validation split only (carved from the training data; the test split is read once per run, never
to choose anything).

1. prepare: the demo's data files, fine-tuned MiniLM teacher and 2-layer student (reused when present);
2. two caches from the teacher: filtered states (TED, KD, fine-tuning) and raw states (LWD);
3. tuning: TED over a small grid (kl_alpha, mse_alpha, lr, epochs), each setting scored by its best
   validation accuracy averaged over --tuning-seeds (one seed alone is too noisy on 500 validation
   examples); the winner's lr and epochs are used for every method;
4. the comparison: finetune, KD, LWD and TED over --seeds, then `tedcache report` over all of it.

About 70 minutes on 2 CPU cores.
python examples/rotten_tomatoes_compare.py [--workdir DIR] [--seeds 1,2,3] [--tuning-seeds 1,2,3]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from tedcache import extract
from tedcache.compare import compare
from tedcache.config import CompareConfig
from tedcache.demo import QUICK, prepare
from tedcache.report import build_report
from tedcache.results import format_table

# (kl_alpha, mse_alpha, lr, epochs); the demo's defaults first
GRID = [(1.0, 1.0, 1e-4, 3), (1.0, 10.0, 1e-4, 3), (5.0, 10.0, 1e-4, 3), (1.0, 10.0, 2e-4, 3), (1.0, 10.0, 1e-4, 6),
        (1.0, 1.0, 2e-4, 3), (1.0, 0.1, 2e-4, 3), (1.0, 1.0, 2e-4, 6)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "tedcache" / "demo"))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--tuning-seeds", default="1,2,3")
    args = parser.parse_args()
    seeds, tuning_seeds = ([int(s) for s in text.split(",")] for text in (args.seeds, args.tuning_seeds))

    setup = prepare(args.workdir, QUICK, seed=42)
    cache = extract(setup.extract_config(42))
    raw_cache = extract(setup.extract_config(42, states="raw"))
    results = setup.work / "compare"

    tuning = []
    for kl_alpha, mse_alpha, lr, epochs in GRID:
        name = f"kl{kl_alpha:g}-mse{mse_alpha:g}-lr{lr:g}-ep{epochs}"
        base = setup.distill_config(cache, "ted", str(results / "tuning" / name), QUICK, tuning_seeds[0],
                                    kl_alpha=kl_alpha, mse_alpha=mse_alpha)
        base = replace(base, optim=replace(base.optim, lr=lr, epochs=epochs))
        row = compare(CompareConfig(base=base, methods=["ted"], seeds=tuning_seeds))["rows"][0]
        tuning.append({"kl_alpha": kl_alpha, "mse_alpha": mse_alpha, "lr": lr, "epochs": epochs,
                       "validation_mean": row["validation_mean"], "validation_std": row["validation_std"]})
    chosen = max(tuning, key=lambda t: t["validation_mean"])  # first of equals: the simpler setting
    print(f"| kl_alpha | mse_alpha | lr | epochs | best validation accuracy (mean ± std, seeds {args.tuning_seeds}) |")
    print("|---|---|---|---|---|")
    for t in tuning:
        print(f"| {t['kl_alpha']:g} | {t['mse_alpha']:g} | {t['lr']:g} | {t['epochs']} | "
              f"{t['validation_mean']:.4f} ± {t['validation_std']:.4f} |" + (" chosen" if t is chosen else ""))

    base = setup.distill_config(cache, "ted", str(results / "methods"), QUICK, seeds[0],
                                kl_alpha=chosen["kl_alpha"], mse_alpha=chosen["mse_alpha"])
    base = replace(base, optim=replace(base.optim, lr=chosen["lr"], epochs=chosen["epochs"]))
    summary = compare(CompareConfig(base=base, methods=["finetune", "kd", "lwd", "ted"], seeds=seeds,
                                    raw_cache=raw_cache))
    page = build_report([str(results / "methods")], str(results / "report"))
    (results / "tuning.json").write_text(json.dumps({"grid": tuning, "chosen": chosen}, indent=2))
    print(format_table(summary))
    print(f"report: {page}")


if __name__ == "__main__":
    main()
