"""Tune's sampler: TPE whose draws for a trial depend on the study's seed and the trial's number alone."""

from __future__ import annotations

import optuna


class TrialSeededTPE(optuna.samplers.TPESampler):
    """TPE (its first `n_startup_trials` drawn at random, then modelled) whose generators are seeded from `seed`
    and the trial's number before each trial. A sampler seeded once per process starts its stream over when a
    killed study is resumed, and so draws again the configurations it drew before; seeded per trial, each
    trial of a study draws its own, in whichever process runs it."""

    def __init__(self, seed: int, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self._study_seed = seed

    def before_trial(self, study, trial) -> None:
        trial_seed = (self._study_seed * 1_000_003 + trial.number) % 2**32
        self._rng.rng.seed(trial_seed)  # TPE's own draws
        self._random_sampler._rng.rng.seed(trial_seed)  # the startup trials' random draws
        super().before_trial(study, trial)
