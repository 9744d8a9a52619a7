"""`fusionrec tune`: a Ray Tune search over training configurations, chosen on validation only.

    SearchSpace.load(path)    tune/*.yaml -> a checked search space (unknown keys, bad ranges fail)
    fit_in_trial(...)         training.engine's epoch loop inside one Tune trial, one report per epoch
    search(...)               Tuner (ASHA + a local search, Optuna TPE or random) -> leaderboard -> the best trials
                              trained again on more seeds -> the best mean's model scored on test
                              once -> MLflow (a parent run, a child per trial and per confirmation)

The first trial of every search is today's defaults (`SearchSpace.defaults`: what `fusionrec train`
uses with no flags, the space's fixed settings on top), so the selected trial never validates worse
than they do; the leaderboard's `defaults` column and best.yaml's first line say whether it beat them.

A trial trains on one seed, and one seed can be lucky. So, before one is crowned, the CONFIRM_TOP
best trials on validation, and the defaults trial if it is not among them, train again on
`confirm_seeds` more training seeds (`train_seed` seed+1, ...: the same split, settings and epochs,
no early stopping), and the trial with the best mean validation metric over its seeds is selected.

Each trial trains in its own process with `cpus_per_trial` CPUs, and one GPU on a cluster that has
GPUs (no nested Ray Train worker group: its driver would hold a whole CPU per trial, and on 2 CPUs
with two workers a trial waited for its workers forever), so as many trials run at once as the
cluster has CPUs (and GPUs) for.
The test part never reaches a trial.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from fusionrec.config import state_folder
from fusionrec.data.io import atomic_file
from fusionrec.search.board import confirmation_candidates, leaderboard, seed_spread, versus_defaults
from fusionrec.search.local import LocalSampler
from fusionrec.search.space import SearchSpace, with_settings
from fusionrec.search.trial import (
    TrialProgress,
    asha_sparing,
    describe_trial,
    epoch_budget_stopper,
    epochs_trained,
    fit_closing,
    quiet_tune,
    restore_tuner,
    run_trial,
)
from fusionrec.training.config import TrainConfig
from fusionrec.training.data import loop_data
from fusionrec.training.engine import load_state, new_model

SEARCHES = ("local", "tpe", "random")


@dataclass
class SearchResult:
    leaderboard: pd.DataFrame  # one row per trial, best first
    best: dict  # the selected trial's settings (TrainConfig.to_dict() shape)
    best_run_id: str
    parent_run_id: str
    test_metrics: dict
    selection: tuple[str, float]
    experiment_path: str
    versus_defaults: str  # whether the selected trial is today's defaults or beat them (versus_defaults())
    # The selected trial's validation values over its seeds, {"seeds": {seed: value}, "mean": m, "std": s}
    # (seed_spread()); None without a confirmation round.
    spread: dict | None = None
    promotion: object | None = None


def asha_grace_period(epochs: int) -> int:
    """The epochs every trial trains before ASHA may stop it: a quarter, since after one epoch a small
    learning rate looks worse than it ends."""
    return max(1, epochs // 4)


def _experiment_folder(space: SearchSpace, dataset_name: str, resume: bool) -> Path:
    root = state_folder() / "tune"
    stem = f"{space.path.stem}-{dataset_name}"
    if resume:
        found = sorted(root.glob(f"{stem}-*"))
        if not found:
            raise ValueError(f"no earlier search of {space.path} on {dataset_name} under {root} to resume")
        return found[-1]
    return root / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def search(dataset: str, features: str | None, space_path: Path, trials: int = 20, epochs: int = 30,
           max_concurrent: int | None = None, cpus_per_trial: float = 1, seed: int = 0, split: str = "random",
           objective: str | None = None, search_alg: str = "local", early_stopping: bool = True,
           register: bool = False, resume: bool = False, progress: bool = True,
           time_budget_s: float | None = None, epoch_budget: int | None = None, confirm_seeds: int = 2,
           from_defaults: bool = True) -> SearchResult:
    """The whole `fusionrec tune` (see the module docstring). Interrupted (Ctrl-C): raises
    KeyboardInterrupt after Tune saved its state; `resume=True` continues that search (and redoes a
    confirmation round that was interrupted). `time_budget_s`: stop starting and running trials after
    that long (fewer trials may run; the confirmation round is not bounded by it). `epoch_budget`: stop
    once the trials have trained that many epochs in all (`epoch_budget_stopper`; with early stopping more
    trials fit in it, up to `trials`; the confirmation round is not counted). `confirm_seeds`:
    the seeds the best trials train on again (0: select on the search's one seed). `from_defaults=False`
    leaves the defaults out of the first trial: benchmarks/tune.py, measuring how soon each algorithm
    finds on its own what the defaults give."""
    import mlflow
    import optuna
    from mlflow import MlflowClient
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from fusionrec import registry
    from fusionrec.ops.ray_runtime import concurrent_trials, ensure_ray, trial_resources
    from fusionrec.training.command import score_test
    from fusionrec.training.data import prepare
    from fusionrec.training.tracking import as_test_metrics, log_trained_model, run_identity
    from fusionrec.verbosity import verbose

    if not verbose():
        # Optuna announces "A new study created in memory" at INFO: the study is the one OptunaSearch
        # makes for Tune, nothing the user named or can reuse. (Optuna sets its level on import.)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    if search_alg not in SEARCHES:
        raise ValueError(f"unknown search {search_alg!r}: choose one of {', '.join(SEARCHES)}")
    if (trials < 1 or epochs < 1 or cpus_per_trial <= 0 or (max_concurrent is not None and max_concurrent < 1)
            or (epoch_budget is not None and epoch_budget < 1)):
        raise ValueError("--trials, --epochs, --max-concurrent and --epoch-budget must be at least 1, "
                         "--cpus-per-trial positive")
    if confirm_seeds < 0:
        raise ValueError(f"--confirm-seeds must be 0 (no confirmation) or more, not {confirm_seeds}")
    space = SearchSpace.load(space_path)
    base = with_settings(space.fixed_settings(), {"dataset": str(dataset), "features": str(features) if features
                                                  else None, "epochs": epochs, "seed": seed, "split": split})
    if objective:
        base["objective"] = objective
    base_cfg = TrainConfig.from_dict(base)  # checked as it is made
    first = space.defaults(base)  # with the command line's objective, whose id_l2 default differs
    selection = base_cfg.selection
    prepared = prepare(base_cfg, pixels="cnn" in space.models())
    folder = _experiment_folder(space, prepared.dataset.spec.name, resume)
    if not resume and folder.exists():
        raise FileExistsError(f"{folder}: a search already writes there")

    experiment_id = registry.setup()
    ensure_ray()
    concurrency = max_concurrent or concurrent_trials(cpus_per_trial)
    threads = max(1, int(cpus_per_trial))
    record = folder / "fusionrec-search.json"
    if resume:
        parent_id = json.loads(record.read_text())["parent_run_id"]
    else:
        with mlflow.start_run(run_name=f"tune {space.path.stem}") as parent:
            parent_id = parent.info.run_id
            mlflow.log_params({"space": str(space.path), "trials": trials, "epochs": epochs, "search": search_alg,
                               "early_stopping": early_stopping, "max_concurrent": concurrency,
                               "cpus_per_trial": cpus_per_trial, "dataset": dataset, "features": features,
                               "split": split, "seed": seed, "objective": base_cfg.objective,
                               "confirm_seeds": confirm_seeds, "epoch_budget": epoch_budget})
            mlflow.log_artifact(str(space.path))
    target = {"uri": registry.tracking_uri(), "experiment_id": experiment_id, "parent": parent_id,
              "tags": run_identity(base_cfg, prepared), "dataset_name": prepared.dataset.spec.name}
    data = loop_data(prepared.users, prepared.items, prepared.ratings, prepared.split)  # no test rows

    def trainable(**confirming):
        return tune.with_resources(tune.with_parameters(run_trial, data=data, base=base, threads=threads,
                                                        mlflow_target=target, **confirming),
                                   trial_resources(cpus_per_trial))

    quiet_tune()
    describe = describe_trial(selection.metric, epochs)
    callback = TrialProgress(trials, describe) if progress else None
    run_config = tune.RunConfig(name=folder.name, storage_path=str(folder.parent), verbose=0,
                                callbacks=[callback] if callback else None,
                                stop=epoch_budget_stopper(epoch_budget) if epoch_budget else None)
    if resume:
        tuner = restore_tuner(folder, trainable(), resume_unfinished=True)
    else:
        # Today's defaults are the first trial (one of --trials), so the selected trial never validates
        # worse than `fusionrec train` with no flags. Random search is Optuna's random sampler too:
        # Tune's own BasicVariantGenerator fails on a list-valued first point (MLP widths) in Ray 2.60.
        # TPE models the space after a quarter of the trials, not Optuna's fixed 10: in a search of
        # 12-20 trials those would be most of it, and TPE random search (docs/quality.md). Under an
        # epoch budget, a quarter of the full-length trials the budget pays for.
        full_trials = min(trials, epoch_budget // epochs) if epoch_budget else trials
        sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, full_trials // 4)),
                   "local": lambda: LocalSampler(seed=seed),
                   "random": lambda: optuna.samplers.RandomSampler(seed=seed)}[search_alg]()
        searcher = OptunaSearch(metric=selection.metric, mode=selection.mode, sampler=sampler,
                                points_to_evaluate=[first] if from_defaults else None)
        scheduler = (asha_sparing(first, metric=selection.metric, mode=selection.mode, max_t=epochs,
                                  grace_period=asha_grace_period(epochs), reduction_factor=2)
                     if early_stopping else FIFOScheduler())
        tuner = tune.Tuner(trainable(), param_space=space.param_space(), run_config=run_config,
                           tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=trials,
                                                       max_concurrent_trials=concurrency, reuse_actors=True,
                                                       time_budget_s=time_budget_s))
        folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"parent_run_id": parent_id, "space": str(space.path), "base": base}))
    grid = fit_closing(tuner, callback)
    budgeted = time_budget_s is not None or (epoch_budget is not None and epochs_trained(grid) >= epoch_budget)
    if not budgeted and grid.num_terminated + grid.num_errors < trials:
        raise KeyboardInterrupt(f"search interrupted after {grid.num_terminated} of {trials} trials; "
                                f"continue it with --resume ({folder})")
    metric = selection.metric
    board = leaderboard(grid, selection, epochs, first)
    done = board[board["status"] == "done"]
    if done.empty or pd.isna(done.iloc[0][f"best_{metric}"]):
        raise RuntimeError(f"no trial finished with a {metric}: see {folder}")
    confirmations = None
    if confirm_seeds:
        candidates = confirmation_candidates(board, metric)
        configs = {r.metrics.get("trial_id"): r.config for r in grid}
        settings = {trial: configs[trial] for trial in candidates["trial"]}
        seeds = list(range(seed + 1, seed + confirm_seeds + 1))
        callback = TrialProgress(len(settings) * len(seeds), describe, "confirmations") if progress else None
        confirmations = _confirm_on_seeds(trainable(confirming=settings), settings, seeds, folder, concurrency,
                                          callback)
        column = f"best_{metric}"
        values = {trial: {seed: float(value)} for trial, value in zip(candidates["trial"], candidates[column],
                                                                      strict=True)}
        for result in confirmations:  # NaN: the run failed before its first report
            values[result.config["confirms"]][result.config["seed"]] = float(result.metrics.get(column, math.nan))
        board = seed_spread(board, values, selection)
    winner = board[board["status"] == "done"].iloc[0]
    best_result = next(r for r in grid if r.metrics.get("mlflow_run_id") == winner["mlflow_run_id"])
    best = with_settings(base, best_result.config)

    # The choice is made: now, and only now, the selected model meets the test part.
    with best_result.checkpoint.as_directory() as checkpoint:
        state = load_state(Path(checkpoint) / "state.pt")
    best_cfg = TrainConfig.from_dict(best)
    model = new_model(data, best_cfg)
    model.load_state_dict(state["best"]["state"])
    test_metrics = score_test(model.eval(), best_cfg, prepared)
    value = float(winner[f"best_{metric}"])  # the scored model's own (the search's seed)
    against_defaults = versus_defaults(board, winner, metric)
    header = f"# {against_defaults}\n"  # comments, so `fusionrec train --config` reads best.yaml as it is
    spread = None
    if confirmations is not None:
        spread = {"seeds": winner["seeds"], "mean": float(winner[f"mean_{metric}"]),
                  "std": float(winner[f"std_{metric}"])}
        header += f"# {metric} on validation per seed: {yaml.safe_dump(spread, default_flow_style=True, width=1000)}"

    client = MlflowClient()
    _close_child_runs(client, board, metric)
    if confirmations is not None:  # a confirmation run of the defaults trial trains the defaults
        runs = leaderboard(confirmations, selection, epochs, first)
        _close_child_runs(client, runs.assign(defaults=runs["confirms"].isin(board.loc[board["defaults"], "trial"])),
                          metric)
    with mlflow.start_run(run_id=winner["mlflow_run_id"]):
        mlflow.log_metrics({metric: value, "best_epoch": float(winner["best_epoch"]), **as_test_metrics(test_metrics)})
        model_uri = log_trained_model(model, best_cfg, prepared, winner["mlflow_run_id"], test_metrics)
    with atomic_file(folder / "leaderboard.csv") as tmp:
        board.to_csv(tmp, index=False)
    with atomic_file(folder / "best.yaml") as tmp:
        tmp.write_text(header + yaml.safe_dump(best, sort_keys=False))
    with mlflow.start_run(run_id=parent_id):
        mlflow.log_artifact(str(folder / "leaderboard.csv"))
        mlflow.log_artifact(str(folder / "best.yaml"))
        mlflow.log_metrics({f"best_{metric}": value, "trials": len(board),
                            "stopped_early": int(board["stopped_early"].sum()), **as_test_metrics(test_metrics),
                            **({f"mean_{metric}": spread["mean"], f"std_{metric}": spread["std"]} if spread else {})})
        mlflow.set_tag("fusionrec.best_run_id", winner["mlflow_run_id"])
        mlflow.set_tag("fusionrec.best_is_defaults", str(bool(winner["defaults"])).lower())
    result = SearchResult(board, best, winner["mlflow_run_id"], parent_id, test_metrics, (metric, value),
                          str(folder), against_defaults, spread)
    if register:
        result.promotion = registry.register(model_uri, winner["mlflow_run_id"])
    return result


def _confirm_on_seeds(trainable, settings: dict[str, dict], seeds: list[int], folder: Path, concurrency: int,
                      callback) -> object:
    """The confirmation round, a Tune experiment in `folder`/confirm: each of `settings` (search
    trial -> its sampled settings) trained again on each of `seeds` as the search trains a trial,
    all epochs (no early stopping). Returns its ResultGrid. A round left there by an interrupted
    search is removed first: a resumed search redoes the round."""
    from ray import tune

    shutil.rmtree(folder / "confirm", ignore_errors=True)
    tuner = tune.Tuner(trainable, param_space={"confirms": tune.grid_search(list(settings)),
                                               "seed": tune.grid_search(seeds)},
                       run_config=tune.RunConfig(name="confirm", storage_path=str(folder), verbose=0,
                                                 callbacks=[callback] if callback else None),
                       tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True))
    confirmations = fit_closing(tuner, callback)
    if confirmations.num_terminated + confirmations.num_errors < len(settings) * len(seeds):
        raise KeyboardInterrupt(f"search interrupted while confirming the best trials on more seeds; --resume "
                                f"redoes that round ({folder})")
    return confirmations


def _close_child_runs(client, board: pd.DataFrame, metric: str) -> None:
    """Mark each trial's run: its best validation value, whether ASHA stopped it, whether it is the
    defaults trial, its final status."""
    for row in board.itertuples(index=False):
        run_id = row.mlflow_run_id
        if not isinstance(run_id, str):
            continue
        value = getattr(row, f"best_{metric}")
        if value is not None and not pd.isna(value):
            client.log_metric(run_id, f"best_{metric}", float(value))
        client.set_tag(run_id, "fusionrec.stopped_early", str(bool(row.stopped_early)).lower())
        client.set_tag(run_id, "fusionrec.defaults", str(bool(row.defaults)).lower())
        client.set_terminated(run_id, "FAILED" if row.status == "failed" else "FINISHED")
