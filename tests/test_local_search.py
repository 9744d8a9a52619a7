"""`--search local` (search/local.py): each trial is a small step from the best trial so far, so on
a narrow optimum next to the first point it finds better points than random draws do."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest

from fusionrec.search.local import LocalSampler

WIDTHS = [[32, 16], [64, 32], [128, 64], [256, 128]]


def suggest(trial: optuna.Trial) -> dict:
    return {"lr": trial.suggest_float("lr", 0.001, 0.025, log=True),
            "dropout": trial.suggest_float("dropout", 0.3, 0.7),
            "size": trial.suggest_categorical("size", [4, 6, 8, 12, 16]),
            "mlp": trial.suggest_categorical("mlp", WIDTHS)}


def narrow(point: dict) -> float:
    """A narrow optimum near the first point (lr 0.005, dropout 0.5, size 8, mlp [128, 64]), as the
    defaults are on the shop: lr 0.007, dropout 0.55, size 8, mlp [128, 64]."""
    return (10 * math.log(point["lr"] / 0.007) ** 2 + 30 * (point["dropout"] - 0.55) ** 2
            + abs(math.log(point["size"] / 8)) + abs(WIDTHS.index(point["mlp"]) - 2))


def study_with(sampler, first: dict, objective, trials: int) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler)
    study.enqueue_trial(first)
    study.optimize(lambda trial: objective(suggest(trial)), n_trials=trials)
    return study


FIRST = {"lr": 0.005, "dropout": 0.5, "size": 8, "mlp": [128, 64]}


def test_every_trial_is_a_small_step_from_the_best_one_before_it():
    study = study_with(LocalSampler(seed=0), FIRST, narrow, trials=30)
    sizes = [4, 6, 8, 12, 16]
    for i, trial in enumerate(study.trials[1:], start=1):
        before = min(study.trials[:i], key=lambda t: t.value)  # the best finished when it was drawn
        moved = {name for name in FIRST if trial.params[name] != before.params[name]}
        assert moved, (trial.params, before.params)  # never the same point again
        assert abs(sizes.index(trial.params["size"]) - sizes.index(before.params["size"])) <= 1
        assert abs(WIDTHS.index(trial.params["mlp"]) - WIDTHS.index(before.params["mlp"])) <= 1
        assert 0.001 <= trial.params["lr"] <= 0.025 and 0.3 <= trial.params["dropout"] <= 0.7
    # steps are small: on a log scale, a tenth of the range's width on average
    steps = [abs(math.log(t.params["lr"] / min(study.trials[:i], key=lambda s: s.value).params["lr"]))
             for i, t in enumerate(study.trials[1:], start=1)]
    assert 0 < np.median([s for s in steps if s > 0]) < 0.25 * math.log(25)


def test_a_choice_of_names_moves_to_any_other_name():
    """Variants have no order: from the first one, every other is reachable in one step."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    variants = ["full", "no_image", "no_text", "no_structured", "id_only"]
    study = optuna.create_study(sampler=LocalSampler(seed=0))
    study.enqueue_trial({"variant": "full"})
    study.optimize(lambda trial: 0.0 if trial.suggest_categorical("variant", variants) == "full" else 1.0,
                   n_trials=30)
    assert {t.params["variant"] for t in study.trials[1:]} == set(variants[1:])


def test_it_starts_from_the_best_reported_value_not_the_last():
    """A trial that reported a better epoch than it ended on (the leaderboard ranks it by that
    epoch) is where the next step starts from."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=LocalSampler(seed=1))
    for point, reported in ((FIRST, [1.0, 0.9]), ({**FIRST, "mlp": [32, 16], "size": 16}, [0.5, 2.0])):
        study.enqueue_trial(point)
        trial = study.ask()
        suggest(trial)
        for step, value in enumerate(reported):
            trial.report(value, step)
        study.tell(trial, reported[-1])
    proposed = suggest(study.ask())  # the second trial ended worse (2.0) but reached 0.5
    assert WIDTHS.index(proposed["mlp"]) <= 1 and proposed["size"] >= 12, proposed


def test_while_the_first_trial_still_trains_the_next_steps_from_it():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=LocalSampler(seed=2))
    study.enqueue_trial(FIRST)
    suggest(study.ask())  # running: no value yet
    for _ in range(5):
        proposed = suggest(study.ask())
        assert proposed["mlp"] in WIDTHS[1:] and proposed["size"] in (6, 8, 12), proposed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_on_a_narrow_optimum_near_the_first_point_it_beats_random_draws(seed):
    local = study_with(LocalSampler(seed=seed), FIRST, narrow, trials=20)
    drawn = study_with(optuna.samplers.RandomSampler(seed=seed), FIRST, narrow, trials=20)
    assert local.best_value < 0.5 * narrow(FIRST), local.best_value
    assert local.best_value < drawn.best_value, (local.best_value, drawn.best_value)
