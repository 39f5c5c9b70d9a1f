"""Whether a cache's teacher is the teacher a study began with. A teacher rebuilt from the same recipe on
another machine differs in its last bits (CPU kernels round differently per instruction set), so its caches
get other content keys; it is still the same teacher when it predicts the same. Each tuning or comparison
folder keeps the validation predictions of the first teacher it used (TEACHER_FILE, a small file, not
weights) and accepts a teacher of the same recipe with other bits only when their predictions agree on at
least MIN_AGREEMENT of the validation examples and their validation metrics are within MAX_METRIC_GAP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..cache.read import Cache
from ..distill_report import teacher_outputs
from ..errors import TedcacheError
from ..evaluate import score
from ..tasks import PRIMARY_METRIC

TEACHER_FILE = "teacher-predictions.json"
MIN_AGREEMENT = 0.995
MAX_METRIC_GAP = 0.002  # in the metric's own units; perplexity: in its log, the mean loss in nats


def teacher_predictions(cache: str) -> dict | None:
    """The cache's teacher on its validation split, from what extraction stored: per example the
    prediction (a class, a tag, an answer; a loss rounded to 3 decimals) and the outputs rounded to 4
    decimals, with the metric; None when the cache has no validation split."""
    opened = Cache(cache)
    meta, split = opened.metadata, opened.split("eval")
    if split is None:
        return None
    outputs = teacher_outputs(split, meta.task)
    metric = PRIMARY_METRIC[meta.task]
    values = np.asarray(outputs["values"])
    if values.dtype.kind == "f" and values.ndim == 2 and values.shape[1] > 1:
        predicted = values.argmax(-1)
    else:
        predicted = np.round(values.reshape(len(values), -1)[:, 0], 3) if values.dtype.kind == "f" else values
    rounded = np.round(values, 4) if values.dtype.kind == "f" else values
    return {"teacher": meta.teacher_recipe or meta.teacher_weights_sha256, "weights": meta.teacher_weights_sha256,
            "cache": meta.content_key, "metric": metric,
            "value": float(score(outputs, meta.task, meta.label_names)[metric]),
            "predicted": predicted.tolist(), "outputs": rounded.tolist()}


def agreement(kept: dict, now: dict) -> tuple[float, float]:
    """The share of validation examples on which two teachers predict the same, and how far apart their
    validation metrics are (perplexity: the difference of their logs)."""
    a, b = kept["predicted"], now["predicted"]
    share = sum(x == y for x, y in zip(a, b)) / max(len(a), 1) if len(a) == len(b) else 0.0
    if kept["metric"] == "perplexity":
        return share, abs(math.log(kept["value"]) - math.log(now["value"]))
    return share, abs(kept["value"] - now["value"])


def check_same_teacher(folder: Path, cache: str, log) -> None:
    """Keep the validation predictions of `cache`'s teacher in `folder` the first time; afterwards accept a
    cache of the same teacher recipe whose teacher has other bits only when it predicts as the kept one did,
    and stop in one line on another recipe. (A teacher tedcache finetune did not make has no recipe: its
    exact weights stand for it.)"""
    now = teacher_predictions(cache)
    if now is None:
        return
    path = Path(folder) / TEACHER_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(now))
        return
    kept = json.loads(path.read_text())
    if kept["teacher"] != now["teacher"]:
        raise TedcacheError(f"{folder} was made with another teacher recipe than the one behind {cache}; give it another "
                            "--out, or use a cache of the teacher it was made with")
    if kept["weights"] == now["weights"]:
        return
    share, gap = agreement(kept, now)
    figures = (f"its validation predictions agree with the kept teacher's on {share:.2%} of examples (at least "
               f"{MIN_AGREEMENT:.1%} needed) and its validation {now['metric']} is {now['value']:.4f} against "
               f"{kept['value']:.4f} (at most {MAX_METRIC_GAP} apart)")
    if share < MIN_AGREEMENT or gap > MAX_METRIC_GAP:
        raise TedcacheError(f"the teacher behind {cache} is not the one {folder} was made with: {figures}; use the "
                            "teacher the study began with, or start a new study in another --out")
    log(f"the teacher behind {cache} is a rebuild of the one {folder} began with: {figures}; continuing")
