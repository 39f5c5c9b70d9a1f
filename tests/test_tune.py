"""tedcache tune on Optuna: the same number of trials per method, validation only, a resumable journal
study shared by processes, its best configuration runnable with distill --config, and studies of other
caches or spaces refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import yaml
from helpers.commands import run_cli

from tedcache import DistillConfig, OptimConfig, TuneConfig, tune
from tedcache.errors import TedcacheError
from tedcache.experiments.tune import STUDY_FILE


def _config(assets, labelled_cache, out, **kw) -> TuneConfig:
    base = DistillConfig(cache=labelled_cache, student=str(assets["student"]), out=str(out), seed=3,
                         optim=OptimConfig(batch_size=16), stage1=OptimConfig(epochs=1, batch_size=16), max_steps=6)
    return TuneConfig(base=base, **{"methods": ["kd", "ted"], "trials": 3, **kw})


def test_tune_runs_each_method_the_same_number_of_trials_on_validation_only(assets, labelled_cache, tmp_path):
    messages = []
    summary = tune(_config(assets, labelled_cache, tmp_path / "t", pruner="none"), log=messages.append)
    for method in ("kd", "ted"):
        result = summary["methods"][method]
        assert result["finished"] == 3 and result["pruned"] == 0
        assert set(result["best_params"]) >= {"optim.lr", "kl_alpha"}
        assert ("mse_alpha" in result["best_params"]) == (method == "ted")
        assert (tmp_path / "t" / f"trials-{method}.csv").exists()
        trials = sorted((tmp_path / "t" / "trials" / method).glob("*/metrics.json"))
        assert len(trials) == 3
        for path in trials:
            metrics = json.loads(path.read_text())
            assert "test" not in metrics and "test" not in metrics["teacher"]  # validation only
            assert not list(path.parent.glob("*.safetensors"))  # trials keep their metrics, not a model
        best = [json.loads(p.read_text())["best"]["accuracy"] for p in trials]
        assert result["best_value"] == max(best)
    assert any("3/3 finished" in m for m in messages)
    assert any("3 trials a method: TPE draws its first 10 at random" in m for m in messages)
    # the best configuration is a distill config file that reproduces the best trial's validation result
    best_file = tmp_path / "t" / "best-kd.yaml"
    assert yaml.safe_load(best_file.read_text())["method"] == "kd"
    run = run_cli("distill", "--config", best_file, "--out", tmp_path / "again")
    assert run.returncode == 0, run.stderr
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["best"]["accuracy"] == summary["methods"]["kd"]["best_value"]
    # a run's file is tune's base: TED's weight alone tuned from KD's best configuration
    result = run_cli("tune", "--config", best_file, "--methods", "ted", "--search", "mse_alpha", "--trials", "1",
                     "--pruner", "none", "--out", tmp_path / "ted-on-kd")
    assert result.returncode == 0, result.stderr
    kd = yaml.safe_load(best_file.read_text())
    trial = json.loads(next((tmp_path / "ted-on-kd" / "trials" / "ted").glob("*/metrics.json")).read_text())["config"]
    assert trial["method"] == "ted" and (trial["optim"]["lr"], trial["kl_alpha"]) == (kd["optim"]["lr"], kd["kl_alpha"])


def test_a_trial_over_several_seeds_scores_their_mean_and_searches_only_what_is_asked(assets, labelled_cache, tmp_path):
    cfg = _config(assets, labelled_cache, tmp_path / "t", methods=["kd"], trials=2, pruner="none", seeds=[3, 4],
                  search=["optim.lr"])
    result = tune(cfg, log=lambda *_: None)["methods"]["kd"]
    assert set(result["best_params"]) == {"optim.lr"}
    folder = tmp_path / "t" / "trials" / "kd"
    values = []
    for number in range(2):
        runs = [json.loads((folder / f"{number:04d}-seed{seed}" / "metrics.json").read_text()) for seed in (3, 4)]
        assert [r["config"]["seed"] for r in runs] == [3, 4]
        assert {r["config"]["kl_alpha"] for r in runs} == {cfg.base.kl_alpha}  # not searched
        values.append(sum(r["best"]["accuracy"] for r in runs) / 2)
        if number == 0:  # every study starts from the base's own values
            assert {r["config"]["optim"]["lr"] for r in runs} == {cfg.base.optim.lr}
    assert result["best_value"] == pytest.approx(max(values))
    with pytest.raises(TedcacheError, match="unknown --search mse_alfa"):
        tune(replace(cfg, search=["mse_alfa"]), log=lambda *_: None)
    with pytest.raises(TedcacheError, match="leaves nothing to tune for kd"):
        tune(replace(cfg, search=["mse_alpha"]), log=lambda *_: None)


def test_a_finished_study_is_kept_and_a_foreign_one_refused(assets, labelled_cache, tmp_path):
    cfg = _config(assets, labelled_cache, tmp_path / "t", methods=["kd"], trials=2, pruner="none")
    tune(cfg, log=lambda *_: None)
    messages = []
    tune(cfg, log=messages.append)
    assert not [m for m in messages if m.startswith("[kd] trial")]  # nothing left to run
    changed = replace(cfg, base=replace(cfg.base, temperature=4.0))
    with pytest.raises(TedcacheError, match="another teacher recipe, data, cached layers, settings or search space"):
        tune(changed, log=lambda *_: None)
    result = run_cli("tune", "--cache", labelled_cache, "--student", assets["student"], "--out", tmp_path / "t",
                     "--methods", "kd", "--trials", "2", "--pruner", "none", "--temperature", "4", "--max-steps", "6")
    assert result.returncode != 0 and "Traceback" not in result.stderr and "another teacher recipe" in result.stderr


@pytest.mark.process
def test_a_killed_tune_resumes_retries_the_trial_it_was_running_and_draws_new_ones(assets, labelled_cache, tmp_path):
    out = tmp_path / "t"
    args = ["tune", "--cache", labelled_cache, "--student", assets["student"], "--out", out, "--methods", "kd",
            "--trials", "3", "--search", "optim.lr,kl_alpha", "--pruner", "none", "--max-steps", "40", "--batch-size", "8",
            "--seed", "3"]  # the base configuration fixes every searched value: its trial draws nothing
    process = subprocess.Popen([sys.executable, "-m", "tedcache.cli.main", *map(str, args)], stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "trials" / "kd").glob("0001*.checkpoint")):
        time.sleep(0.2)  # the first randomly drawn trial is mid-way once its first epoch has been checkpointed
    process.send_signal(signal.SIGKILL)
    process.wait()
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / STUDY_FILE)))
    killed = [t for t in optuna.load_study(study_name="kd", storage=storage).trials
              if t.state == optuna.trial.TrialState.RUNNING]
    assert len(killed) == 1
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    trials = optuna.load_study(study_name="kd", storage=storage).trials
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 3 and [t.state for t in trials].count(optuna.trial.TrialState.FAIL) == 1
    assert any(t.params == killed[0].params for t in finished)  # the killed trial's parameters ran again
    # the resumed process drew a configuration of its own, not the one its sampler's stream began with
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == 3


@pytest.mark.process
def test_two_processes_share_one_study(assets, labelled_cache, tmp_path):
    out = tmp_path / "t"
    args = ["tune", "--cache", labelled_cache, "--student", assets["student"], "--out", out, "--methods", "kd",
            "--trials", "4", "--pruner", "none", "--max-steps", "6", "--batch-size", "16"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    workers = [subprocess.Popen([sys.executable, "-m", "tedcache.cli.main", *map(str, args)], stderr=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err[-2000:] for _, err in results]
    workers_seen = set()
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / STUDY_FILE)))
    for trial in optuna.load_study(study_name="kd", storage=storage).trials:
        workers_seen.add(trial.user_attrs["worker"])
    assert len(workers_seen) == 2  # both processes ran trials of the one study
    assert json.loads((out / "tune.json").read_text())["methods"]["kd"]["finished"] == 4
