"""The run folder, written and read here only: the model (save_pretrained) and its tokenizer, metrics.json
(what distill or finetune measured and how it was configured), config.yaml (the run's settings: `--config`
it to run it again) and the test predictions (for paired tests)."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .configfile import CONFIG_FILE, config_yaml
from .errors import TedcacheError
from .tasks import PRIMARY_METRIC

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "test_predictions.npz"  # the test split's outputs in example order (see evaluate.predictions)


def save_run(model, tokenizer, out: str, metrics: dict, config, test_outputs: dict | None = None,
             weights: dict | None = None) -> Path:
    """Write the model (save_pretrained, with `weights` in place of its own state if given), its tokenizer,
    metrics.json, the run's configuration (config.yaml: `--config` it to run it again) and its test
    predictions (for paired tests) to `out`, atomically: everything goes to a temporary sibling folder that
    replaces `out` only once complete."""
    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()) and not (out_path / METRICS_FILE).exists():
        raise TedcacheError(f"--out {out} exists and is not a tedcache run folder; choose an empty or new folder")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        if model is not None:  # (None: a tuning trial keeps only its metrics)
            model.save_pretrained(staging, state_dict=weights)
            tokenizer.save_pretrained(staging)
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        (staging / CONFIG_FILE).write_text(config_yaml(config))
        if test_outputs is not None:
            np.savez(staging / PREDICTIONS_FILE, **test_outputs)
        if out_path.exists():
            shutil.rmtree(out_path)
        staging.rename(out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_path


def cache_read(metrics: dict) -> tuple[str, str, str | None]:
    """(recipe key, content key, teacher weights) of the cache a distill run read (see CacheMetadata);
    runs saved before these were recorded name their cache by its folder, which ends with the content key."""
    content = metrics.get("cache_identity") or str(metrics.get("cache") or "").rstrip("/").rsplit("-", 1)[-1]
    return metrics.get("cache_recipe") or content, content, metrics.get("teacher_weights")


@dataclass
class Run:
    """One training run as recorded in its folder."""

    folder: Path
    metrics: dict

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def method(self) -> str:
        return self.metrics["method"]

    @property
    def task(self) -> str:
        return self.metrics["task"]

    @property
    def metric(self) -> str:
        return PRIMARY_METRIC[self.task]

    @property
    def seed(self) -> int:
        return self.metrics["config"]["seed"]

    @property
    def cache(self) -> str | None:
        return self.metrics.get("cache")

    @property
    def cache_mib(self) -> float | None:
        size = self.metrics.get("cache_bytes")
        return None if size is None else size / 2**20

    def test(self) -> float | None:
        return (self.metrics.get("test") or {}).get(self.metric)

    def validation(self) -> float | None:
        return (self.metrics.get("best") or {}).get(self.metric)

    def test_outputs(self) -> dict | None:
        """The test predictions distill saved (None for runs made before they were saved)."""
        path = self.folder / PREDICTIONS_FILE
        if not path.is_file():
            return None
        with np.load(path) as saved:
            return {k: saved[k] for k in saved.files}

    def teacher_test(self) -> float | None:
        return ((self.metrics.get("teacher") or {}).get("test") or {}).get(self.metric)


def find_runs(paths: list[str]) -> list[Run]:
    """The runs named by `paths`: run folders, or folders holding run folders (such as a compare folder)."""
    runs = []
    for path in map(Path, paths):
        if (path / METRICS_FILE).is_file():
            runs.append(Run(path, json.loads((path / METRICS_FILE).read_text())))
        elif path.is_dir() and (inner := sorted(p.parent for p in path.glob("*/metrics.json"))):
            runs.extend(Run(p, json.loads((p / METRICS_FILE).read_text())) for p in inner)
        else:
            raise TedcacheError(f"{path} is not a run folder (no metrics.json in it or in its sub-folders); "
                                "pass folders written by tedcache distill, finetune or compare")
    if len({r.task for r in runs}) > 1:
        raise TedcacheError(f"the runs mix tasks ({', '.join(sorted({r.task for r in runs}))}); report one task at a time")
    return runs
