"""`--search local`: an Optuna sampler that searches around the best trial so far.

Every search starts from today's defaults (tune.py), and on the shop they are a narrow optimum:
the median point drawn at random from tune/widths.yaml validates 15-25 % worse than they do, and
16-30 random or TPE draws in 10 dimensions rarely land near enough to match them
(docs/quality.md). So this sampler does what a person tuning by hand does: it takes the best trial
finished so far (at first the defaults, even while they still train) and changes a few of its
settings by a small step. A (1+1) evolution strategy with a fixed step:

    each setting changes with probability 2 / (number of settings), at least one per trial;
    a range moves by a normal step of STEP x its width (on a log scale for loguniform ones),
        reflected at its ends;
    a choice of numbers (or widths) moves to a neighbouring entry of its list (lists in tune/ are in
        order); a choice of names (model.variant) to any other name.

A trial is ranked by the best value it reported (as the leaderboard ranks it), so a trial ASHA
stopped early competes with what it reached. With nothing to start from (no trial yet), it draws
at random, as random search does.
"""

from __future__ import annotations

import math

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

STEP = 0.1  # a range's normal step, as a fraction of its width
CHANGED = 2  # settings changed per trial, on average


class LocalSampler(BaseSampler):
    def __init__(self, seed: int | None = None):
        self._rng = np.random.default_rng(seed)
        self._random = RandomSampler(seed=seed)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        start = self._start(study)
        return dict(start.distributions) if start else {}

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict:
        start = self._start(study)
        if start is None or not search_space:
            return {}
        names = sorted(search_space)
        change = self._rng.random(len(names)) < min(1.0, CHANGED / len(names))
        if not change.any():
            change[self._rng.integers(len(names))] = True
        return {name: self._step(search_space[name], start.params[name]) if moved else start.params[name]
                for name, moved in zip(names, change, strict=True)}

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution):
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def reseed_rng(self) -> None:
        self._rng = np.random.default_rng()
        self._random.reseed_rng()

    def _start(self, study: Study) -> FrozenTrial | None:
        """The finished trial with the best reported value; before any finished, the first trial
        (the defaults: enqueued, so its settings are known while it trains)."""
        ended = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        finished = [(value, t) for t in ended if (value := _best_reported(t, study.direction)) is not None]
        if finished:
            sign = 1 if study.direction == StudyDirection.MINIMIZE else -1
            return min(finished, key=lambda scored: sign * scored[0])[1]
        started = [t for t in study.get_trials(deepcopy=False) if t.params]
        return started[0] if started else None

    def _step(self, distribution: BaseDistribution, value):
        """One small move of `value` within `distribution`."""
        if isinstance(distribution, CategoricalDistribution):
            choices, at = distribution.choices, distribution.choices.index(value)
            if any(isinstance(choice, str) for choice in choices):  # names, in no order: any other
                neighbours = [i for i in range(len(choices)) if i != at]
            else:
                neighbours = [i for i in (at - 1, at + 1) if 0 <= i < len(choices)]
            return choices[neighbours[self._rng.integers(len(neighbours))]] if neighbours else value
        if isinstance(distribution, FloatDistribution | IntDistribution):
            scale = math.log if distribution.log else float
            low, width, x = scale(distribution.low), scale(distribution.high) - scale(distribution.low), scale(value)
            x += self._rng.normal(0.0, STEP * width)
            # reflected at the ends: the offset from low, folded into [0, width]
            x = low + width - abs((x - low) % (2 * width) - width) if width > 0 else low
            x = math.exp(x) if distribution.log else x
            return int(round(x)) if isinstance(distribution, IntDistribution) else float(x)
        raise TypeError(f"cannot step a {type(distribution).__name__}")


def _best_reported(trial: FrozenTrial, direction: StudyDirection) -> float | None:
    """The best of the values a trial reported per epoch (or its final value, if it reported none)."""
    values = [v for v in trial.intermediate_values.values() if v is not None and not math.isnan(v)]
    if not values:
        return trial.value
    return min(values) if direction == StudyDirection.MINIMIZE else max(values)
