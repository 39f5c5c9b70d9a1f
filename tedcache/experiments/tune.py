"""`tedcache tune`: Optuna studies over one cache, one per method, the same number of trials each, scored
on the validation split only (a trial never sees the test split).

The studies live in one journal file under `out` (Optuna's JournalStorage, safe for several processes
and for machines sharing a file system): a killed tune resumes where it stopped, and many `tune`
processes started on one `out` work on the same studies. A trial that was running in a process that
died on this machine is marked failed and its parameters are tried again."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import asdict, replace
from pathlib import Path

from ..cache import load_metadata
from ..cache.claims import process_alive
from ..config import METHODS, DistillConfig, TuneConfig, check_methods, what_it_computes
from ..configfile import CONFIG_FILE, config_yaml
from ..distillation import distill
from ..errors import TedcacheError, note
from ..tasks import LOWER_IS_BETTER, PRIMARY_METRIC, TASK
from .same_teacher import check_same_teacher

STUDY_FILE = "study.journal"
FINISHED = ("COMPLETE", "PRUNED")
TPE_STARTUP_TRIALS = 10  # Optuna's default: TPE samples at random until this many trials have finished


def search_space(method: str, temperature_fixed: bool) -> dict[str, tuple]:
    """Each method's own space: name -> ("log" | "float" | "int", low, high). Names are DistillConfig
    fields ("optim.lr", "stage1.lr", ...). Stage II length is searched; Stage I stops by patience."""
    space = {"optim.lr": ("log", 1e-5, 5e-4), "optim.epochs": ("int", 2, 8), "optim.warmup_ratio": ("float", 0.0, 0.2)}
    if method != "finetune":
        space["kl_alpha"] = ("log", 0.1, 20.0)
        if not temperature_fixed:
            space["temperature"] = ("float", 1.0, 8.0)
    if method in ("ted", "lwd"):
        space["mse_alpha"] = ("log", 0.01, 100.0)
    if method == "ted":
        space["stage1.lr"] = ("log", 1e-4, 1e-2)
    return space


def searched(space: dict[str, tuple], search: list[str]) -> dict[str, tuple]:
    """`space` cut to the names in `search` (all of it when `search` is empty)."""
    return {name: spec for name, spec in space.items() if not search or name in search}


def starting_point(base: DistillConfig, space: dict[str, tuple]) -> dict:
    """The base's own values of the searched parameters (clipped into the space): every study tries them
    first, so a small budget never ends below the settings it started from on validation."""
    point = {}
    for name, (kind, low, high) in space.items():
        value = base
        for part in name.split("."):
            value = getattr(value, part)
        if value is None:  # a default decided at run time (the temperature): sampled instead
            continue
        value = min(max(value, low), high)
        point[name] = round(value) if kind == "int" else value
    return point


def sample(trial, space: dict[str, tuple]) -> dict:
    kinds = {"log": lambda n, lo, hi: trial.suggest_float(n, lo, hi, log=True),
             "float": trial.suggest_float, "int": trial.suggest_int}
    return {name: kinds[kind](name, low, high) for name, (kind, low, high) in space.items()}


def apply(base: DistillConfig, params: dict) -> DistillConfig:
    """`base` with the sampled values set (dotted names reach into optim and stage1)."""
    nested: dict[str, dict] = {}
    top = {}
    for name, value in params.items():
        if "." in name:
            record, field = name.split(".", 1)
            nested.setdefault(record, {})[field] = value
        else:
            top[name] = value
    records = {record: replace(getattr(base, record), **fields) for record, fields in nested.items()}
    return replace(base, **top, **records)


def study_space(cfg: TuneConfig, method: str) -> dict[str, tuple]:
    """The space `method`'s study searches (a sampled KD temperature is fixed where the cache fixed it)."""
    meta = load_metadata(cfg.base.cache)
    temperature_fixed = TASK[meta.task].causal and (meta.logits or {}).get("kind") == "sample"
    return searched(search_space(method, temperature_fixed), cfg.search)


def study_identity(cfg: TuneConfig, method: str) -> str:
    """What a study was made for: the cache's recipe (its teacher's recipe, data, splits, layers and
    settings, not its exact bits: same_teacher checks a rebuilt teacher), the fixed settings, the method
    and its space."""
    space = study_space(cfg, method)
    cache = cfg.raw_cache if method == "lwd" else cfg.base.cache
    base = what_it_computes(asdict(replace(cfg.base, out="", resume=False, method=method, cache="")))
    payload = {"cache": load_metadata(cache).recipe_key, "base": base, "space": space, "pruner": cfg.pruner,
               "seeds": _seeds(cfg)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _seeds(cfg: TuneConfig) -> list[int]:
    return cfg.seeds or [cfg.base.seed]


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _reclaim(study, optuna) -> None:
    """Trials left running by a process of this machine that no longer exists: failed, then re-queued."""
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", "")
        if worker.rsplit(":", 1)[0] != host or process_alive(int(worker.rsplit(":", 1)[1])):
            continue
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)


def _pruner(name: str, optuna):
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def _check(cfg: TuneConfig) -> None:
    check_methods(cfg.methods, cfg.raw_cache)
    if cfg.trials < 1:
        raise TedcacheError(f"--trials must be at least 1, got {cfg.trials}")
    known = {name for method in METHODS for name in search_space(method, False)}
    if set(cfg.search) - known:
        raise TedcacheError(f"unknown --search {', '.join(sorted(set(cfg.search) - known))}; use some of "
                            f"{', '.join(sorted(known))}")
    for cache in {cfg.base.cache} | ({cfg.raw_cache} if cfg.raw_cache else set()):
        if not load_metadata(cache).splits.get("eval"):
            raise TedcacheError(f"cache {cache} has no eval split: tune scores trials on validation only; "
                                "extract it with --eval-data")


def tune(cfg: TuneConfig, log=None) -> dict:
    """Run each method's study until it has `cfg.trials` finished trials; write best-<method>.yaml (a
    distill config), trials-<method>.csv, and tune.json (best values, parameters, importances, trials per
    hour)."""
    import optuna

    from .sampling import TrialSeededTPE

    log = log or note
    _check(cfg)
    if cfg.trials <= TPE_STARTUP_TRIALS:
        log(f"{cfg.trials} trials a method: TPE draws its first {TPE_STARTUP_TRIALS} at random, so this is a seeded "
            "random search around the base configuration; give each method more trials for TPE to model the results")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(cfg.base.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(config_yaml(cfg))
    for cache in [cfg.base.cache] + ([cfg.raw_cache] if cfg.raw_cache else []):
        check_same_teacher(out, cache, log)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / STUDY_FILE)))
    metric = PRIMARY_METRIC[load_metadata(cfg.base.cache).task]
    summary = {"metric": metric, "methods": {}}
    for number, method in enumerate(cfg.methods):
        space = study_space(cfg, method)
        if not space:
            raise TedcacheError(f"--search {','.join(cfg.search)} leaves nothing to tune for {method}; add one of "
                                f"{', '.join(study_space(replace(cfg, search=[]), method))} or leave {method} out")
        identity = study_identity(cfg, method)
        study = optuna.create_study(
            study_name=method, storage=storage, load_if_exists=True,
            direction="minimize" if metric in LOWER_IS_BETTER else "maximize",
            sampler=TrialSeededTPE(n_startup_trials=TPE_STARTUP_TRIALS, seed=cfg.base.seed + number),
            pruner=_pruner(cfg.pruner, optuna))
        made_for = study.user_attrs.get("identity")
        if made_for is None:
            study.set_user_attr("identity", identity)
        elif made_for != identity:
            raise TedcacheError(f"{out / STUDY_FILE} holds a {method} study made for another teacher recipe, data, "
                                "cached layers, settings or search space; give tune another --out, or delete that "
                                "file to start over")
        _reclaim(study, optuna)
        if not study.trials:
            study.enqueue_trial(starting_point(cfg.base, space))
        base = replace(cfg.base, method=method, cache=cfg.raw_cache if method == "lwd" else cfg.base.cache,
                       resume=False)
        _optimize(study, base, space, _seeds(cfg), cfg.trials, out / "trials" / method, metric, log)
        summary["methods"][method] = _report(study, base, cfg.trials, out, optuna)
    (out / "tune.json").write_text(json.dumps(summary, indent=2))
    rows = [[m, str(r["finished"]), str(r["pruned"]), f"{r['best_value']:.4f}",
             "-" if r["trials_per_hour"] is None else f"{r['trials_per_hour']:.1f}"] for m, r in summary["methods"].items()]
    print("\n".join([f"| method | trials | pruned | best validation {metric} | trials per hour |", "|---|---|---|---|---|"]
                    + ["| " + " | ".join(row) + " |" for row in rows]))
    return summary


def _finished_trials(study, optuna, trials: int | None = None) -> list:
    """The finished (complete or pruned) trials in the order they were created; with `trials`, only the
    first that many: when processes sharing a study start their last trials at the same moment, one
    extra may finish, and it does not count, so every method is judged on the same budget."""
    states = tuple(getattr(optuna.trial.TrialState, s) for s in FINISHED)
    done = sorted(study.get_trials(deepcopy=False, states=states), key=lambda t: t.number)
    return done if trials is None else done[:trials]


def _running(study, optuna) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))


def _optimize(study, base: DistillConfig, space: dict, seeds: list[int], trials: int, folder: Path, metric: str,
              log) -> None:
    import optuna

    def objective(trial):
        trial.set_user_attr("worker", _worker())
        trial.set_user_attr("cache", load_metadata(base.cache).content_key)  # which cache exactly this trial read
        params = sample(trial, space)
        evaluations = []

        def on_eval(result: dict) -> None:
            # only the first seed's curve is reported: pruning compares trials at the same seed and evaluation
            evaluations.append(result[metric])
            trial.report(result[metric], len(evaluations))
            if trial.should_prune():
                raise optuna.TrialPruned()

        started = time.perf_counter()
        best = []
        try:
            for seed in seeds:
                name = f"{trial.number:04d}" if len(seeds) == 1 else f"{trial.number:04d}-seed{seed}"
                run = apply(replace(base, seed=seed, out=str(folder / name)), params)
                try:
                    report = distill(run, lambda *_: None, on_eval=on_eval if seed == seeds[0] else None,
                                     score_test=False, keep_model=False)
                finally:
                    shutil.rmtree(f"{run.out}.checkpoint", ignore_errors=True)
                best.append(report["best"][metric])
        finally:
            trial.set_user_attr("seconds", time.perf_counter() - started)
        trial.set_user_attr("seed_values", best)
        return sum(best) / len(best)

    def progress(study, trial):
        done = _finished_trials(study, optuna, trials)
        complete = [t for t in done if t.state == optuna.trial.TrialState.COMPLETE]
        best = _best(complete, study).value if complete else float("nan")
        log(f"[{base.method}] trial {trial.number} {trial.state.name.lower()}: {len(done)}/{trials} finished, "
            f"{len(done) - len(complete)} pruned, best validation {metric} {best:.4f}")

    while len(_finished_trials(study, optuna)) < trials:
        if len(_finished_trials(study, optuna)) + _running(study, optuna) >= trials:
            time.sleep(5)  # the last trials are running in other processes
            _reclaim(study, optuna)
            continue
        study.optimize(objective, n_trials=1, callbacks=[progress], catch=(TedcacheError,))
        failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
        if len(failed) > trials:
            reason = failed[0].system_attrs.get("fail_reason", "?")
            raise TedcacheError(f"{len(failed)} {base.method} trials failed (first: {reason}); run tedcache distill "
                                "with the base settings to see why")


def _best(complete: list, study):
    """The best of `complete` trials in the study's direction."""
    pick = min if study.direction.name == "MINIMIZE" else max
    return pick(complete, key=lambda t: t.value)


def _report(study, base: DistillConfig, budget: int, out: Path, optuna) -> dict:
    """Write best-<method>.yaml and trials-<method>.csv; return the method's summary."""
    trials = _finished_trials(study, optuna, budget)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise TedcacheError(f"no {base.method} trial completed (all were pruned); run more --trials or --pruner none")
    best = _best(complete, study)
    (out / f"best-{base.method}.yaml").write_text(config_yaml(replace(apply(base, best.params),
                                                                      out=str(out / f"best-{base.method}"))))
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs"))
    frame.to_csv(out / f"trials-{base.method}.csv", index=False)
    importance = {}
    if len(complete) >= 2:
        try:
            importance = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError):  # e.g. every complete trial drew the same values
            importance = {}
    seconds = sum(t.user_attrs.get("seconds", 0.0) for t in trials)
    return {"best_value": best.value, "best_params": best.params, "best_trial": best.number,
            "finished": len(trials), "pruned": len(trials) - len(complete),
            "importance": {k: float(v) for k, v in importance.items()},
            "trials_per_hour": 3600 * len(trials) / seconds if seconds else None,
            "config": str(out / f"best-{base.method}.yaml")}
