"""`fusionrec tune`: a Ray Tune search over training configurations, chosen on validation only.

    SearchSpace.load(path)    tune/*.yaml -> a checked search space (unknown keys, bad ranges fail)
    fit_in_trial(...)         training.engine's epoch loop inside one Tune trial, one report per epoch
    search(...)               Tuner (ASHA + Optuna TPE, or random) -> leaderboard -> the best trials
                              trained again on more seeds -> the best mean's model scored on test
                              once -> MLflow (a parent run, a child per trial and per confirmation)

The first trial of every search is today's defaults (`SearchSpace.defaults`: what `fusionrec train`
uses with no flags, the space's fixed settings on top), so the selected trial never validates worse
than they do; the leaderboard's `defaults` column and best.yaml's first line say whether it beat them.

A trial trains on one seed, and one seed can be lucky. So, before one is crowned, the CONFIRM_TOP
best trials on validation, and the defaults trial if it is not among them, train again on
`confirm_seeds` more seeds (seed+1, ..., the same settings and epochs, no early stopping), and the
trial with the best mean validation metric over its seeds is selected.

Each trial trains in its own process with `cpus_per_trial` CPUs, and one GPU on a cluster that has
GPUs (no nested Ray Train worker group: its driver would hold a whole CPU per trial, and on 2 CPUs
with two workers a trial waited for its workers forever), so as many trials run at once as the
cluster has CPUs (and GPUs) for.
The test part never reaches a trial.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import yaml

from fusionrec.config import state_folder
from fusionrec.data.io import atomic_file
from fusionrec.models.config import ModelConfig
from fusionrec.selection import IDENTITY, Selection
from fusionrec.training.config import TrainConfig
from fusionrec.training.data import LoopData, loop_data
from fusionrec.training.engine import load_state, make_optimizer, new_model, run_epochs
from fusionrec.training.tracking import log_epoch

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
SPACE_KEYS = {"description", "fixed", "search"}
PER_RUN = {"dataset", "features"}  # given on the command line, never searched
# A space may fix these, never search them: what a run is compared on (selection.IDENTITY, so every
# trial of a search is selected on the same validation data), and how it is scored and run.
NOT_SEARCHED = (set(IDENTITY) - {"data", "features"}) | {"k", "workers", "max_failures"}
SEARCHES = ("tpe", "random")
CONFIRM_TOP = 3  # the best trials on validation that the confirmation round trains again (and the defaults)


def _settings_keys() -> set[str]:
    """Every setting a space may fix or search: TrainConfig fields and model.<ModelConfig field>."""
    train = set(TrainConfig.__dataclass_fields__) - {"model"} - PER_RUN
    return train | {f"model.{k}" for k in ModelConfig.__dataclass_fields__}


def with_settings(settings: dict, dotted: dict) -> dict:
    """`settings` (TrainConfig.to_dict() shape) with `dotted` values ("lr", "model.mlp") put in."""
    out = {**settings, "model": dict(settings.get("model") or {})}
    for key, value in dotted.items():
        if key.startswith("model."):
            out["model"][key.removeprefix("model.")] = value
        else:
            out[key] = value
    return out


def _read_setting(settings: dict, dotted: str):
    """The value of one dotted setting ("lr", "model.mlp") in `settings` (TrainConfig.to_dict() shape)."""
    if dotted.startswith("model."):
        return settings["model"][dotted.removeprefix("model.")]
    return settings[dotted]


def _can_sample(kind: str, argument: list, value) -> bool:
    """Whether a `search:` distribution ({kind: argument}) holds `value`."""
    if kind == "choice":
        return value in argument
    low, high = argument
    return low <= value < high if kind == "randint" else low <= value <= high  # Tune's randint excludes high


def _flatten(fixed: dict) -> dict:
    """A `fixed:` block, whose `model` may be a nested mapping, as dotted keys."""
    model = fixed.get("model")
    flat = {k: v for k, v in fixed.items() if k != "model" or not isinstance(v, dict)}
    if isinstance(model, dict):
        flat |= {f"model.{k}": v for k, v in model.items()}
    return flat


@dataclass
class SearchSpace:
    """A search space from tune/*.yaml:

        description: ...
        fixed:  {objective: rating, model: {model: fusion, variant: full}}   # every trial
        search:                                                              # sampled per trial
          model.mlp: {choice: [[64, 32], [128, 64]]}
          lr: {loguniform: [0.001, 0.02]}
    """

    path: Path
    fixed: dict = field(default_factory=dict)  # dotted keys
    search: dict = field(default_factory=dict)  # dotted key -> {distribution: argument}
    description: str = ""

    @classmethod
    def load(cls, path: Path) -> SearchSpace:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such search space file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping with `fixed` and `search`")
        for key in raw:
            if key not in SPACE_KEYS:
                raise ValueError(f"{path}: unknown key {key!r} (expected {', '.join(sorted(SPACE_KEYS))})")
        space = cls(path, _flatten(raw.get("fixed") or {}), raw.get("search") or {}, raw.get("description", ""))
        space.check()
        return space

    def check(self) -> None:
        known = _settings_keys()
        for key in [*self.fixed, *self.search]:
            if key not in known:
                hint = " (given on the command line)" if key in PER_RUN else ""
                raise ValueError(f"{self.path}: unknown setting {key!r}{hint}")
        if not self.search:
            raise ValueError(f"{self.path}: `search` names no setting to search")
        for key in self.search:
            if key in NOT_SEARCHED:
                raise ValueError(f"{self.path}: {key!r} cannot be searched (every trial must be selected on the "
                                 "same validation data); fix it under `fixed` or pass it on the command line")
        for key, spec in self.search.items():
            values = self._check_distribution(key, spec)
            for value in values:  # every value a trial can get must make a valid configuration
                self._check_setting(key, value)
        for key, value in self.fixed.items():
            self._check_setting(key, value)
        self.defaults({"dataset": "-", **self.fixed_settings()})

    def defaults(self, base: dict) -> dict:
        """The search's first point: for each searched setting, what `fusionrec train` uses when no
        flag sets it, with `base` (the space's `fixed:` settings and the command line's) on top.
        A value outside the space fails in one line: Optuna cannot record a `choice` value its list
        lacks (the search would crash at its first trial), and a range that leaves out the default
        would make the first trial a point the search does not search."""
        resolved = TrainConfig.from_dict(base).to_dict()  # every default filled in (id_l2: the objective's)
        point = {key: _read_setting(resolved, key) for key in self.search}
        for key, value in point.items():
            kind, argument = next(iter(self.search[key].items()))
            if not _can_sample(kind, argument, value):
                raise ValueError(f"{self.path}: search.{key}: {{{kind}: {argument}}} must contain the default "
                                 f"{value!r} (the first trial of every search)")
        return point

    def _check_distribution(self, key: str, spec) -> list:
        """The values worth checking as settings: every choice, or both ends of a range."""
        where = f"{self.path}: search.{key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ValueError(f"{where}: expected one of {', '.join(f'{{{d}: ...}}' for d in DISTRIBUTIONS)}")
        kind, argument = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(argument, list) or not argument:
                raise ValueError(f"{where}: choice needs a non-empty list")
            return argument
        if (not isinstance(argument, list) or len(argument) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in argument)):
            raise ValueError(f"{where}: {kind} needs [low, high] numbers")
        low, high = argument
        if not low < high:
            raise ValueError(f"{where}: bad range [{low}, {high}]: low must be below high")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"{where}: bad range [{low}, {high}]: loguniform needs low > 0")
        if kind == "randint" and not all(isinstance(v, int) for v in argument):
            raise ValueError(f"{where}: randint needs integer bounds")
        return [low, high - 1 if kind == "randint" else high]

    def _check_setting(self, key: str, value) -> None:
        settings = with_settings({"dataset": "-", **self.fixed_settings()}, {key: value})
        try:
            TrainConfig.from_dict(settings)  # checked as it is made
        except (TypeError, ValueError) as error:
            raise ValueError(f"{self.path}: {key} = {value!r}: {error}") from None

    def fixed_settings(self) -> dict:
        return with_settings({}, self.fixed)

    def param_space(self) -> dict:
        """The `search` block as Ray Tune distributions, keyed by dotted setting names."""
        from ray import tune

        make = {"choice": tune.choice, "uniform": lambda a: tune.uniform(*a),
                "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
        return {key: make[kind](argument) for key, spec in self.search.items() for kind, argument in spec.items()}

    def models(self) -> set[str]:
        """The model types trials may train (the CNN needs raw pixels loaded)."""
        choice = self.search.get("model.model", {}).get("choice")
        return set(choice) if choice else {self.fixed.get("model.model", "fusion")}


def _report_checkpoint(state: dict, extra: dict) -> object:
    """A Tune checkpoint of a resumable training state (a temporary folder Tune copies)."""
    from ray import tune

    folder = tempfile.mkdtemp(prefix="fusionrec-trial-")
    torch.save({**state, **extra}, Path(folder) / "state.pt")
    return tune.Checkpoint.from_directory(folder)


def fit_in_trial(cfg: TrainConfig, data: LoopData, threads: int, device: torch.device,
                 report: Callable[[dict, dict], None] | None = None) -> tuple[torch.nn.Module, dict]:
    """Train one configuration in this process (a Tune trial) on `device` (a trial's is
    `ray_runtime.assigned_device()`): the epoch loop of training.engine over in-memory shuffled batches,
    resumed from the trial's checkpoint if Tune restored one. Each epoch reports its validation
    metrics, the best so far (`best_<metric>`, `best_epoch`) and a checkpoint. Returns (the best
    model on validation, eval mode, on `device`; the last state)."""
    from ray import tune

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = new_model(data, cfg).to(device)
    optimizer = make_optimizer(model, cfg.lr, cfg.id_l2)
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            resume = load_state(Path(folder) / "state.pt")
    users, items, ratings = (torch.as_tensor(data.train[c].to_numpy(), device=device)
                             for c in ("user_idx", "item_idx", "rating"))

    def batches(epoch: int):
        # Shuffled on the CPU, so the order is the same on every device.
        shuffle = torch.Generator().manual_seed(cfg.seed + epoch)
        order = torch.randperm(len(users), generator=shuffle, device="cpu").to(device)
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            yield users[batch], items[batch], ratings[batch]

    last: dict = {}

    def on_epoch(metrics: dict, state: dict) -> None:
        last.update(state)
        best = state["best"]
        metrics = {**metrics, f"best_{cfg.selection.metric}": best["value"], "best_epoch": best["epoch"]}
        if report:
            report(metrics, state)

    run_epochs(model, optimizer, data, cfg, batches, on_epoch, device, resume)
    model.load_state_dict(last["best"]["state"])
    return model.eval(), last


def run_trial(config: dict, data: LoopData, base: dict, threads: int, mlflow_target: dict,
              confirming: dict | None = None) -> None:
    """One trial of `fusionrec tune`: `base` settings with the sampled ones (`config`), logged as a
    child run. In the confirmation round `confirming` maps each search trial it confirms to its
    sampled settings, and `config` is {"confirms": one of those trials, "seed": the seed to train on}:
    its child run is tagged fusionrec.confirms and fusionrec.training_seed (fusionrec.seed is the
    split's)."""
    from mlflow import MlflowClient
    from ray import tune

    from fusionrec.ops.ray_runtime import assigned_device
    from fusionrec.training.tracking import config_params

    trial_id = tune.get_context().get_trial_id()
    sampled, run_name, tags = config, trial_id, {"fusionrec.trial_id": trial_id}
    if confirming:
        sampled = {**confirming[config["confirms"]], "seed": config["seed"]}
        run_name = f"{config['confirms']} seed {config['seed']}"
        tags |= {"fusionrec.confirms": config["confirms"], "fusionrec.training_seed": str(config["seed"])}
    cfg = TrainConfig.from_dict(with_settings(base, sampled))
    client = MlflowClient(mlflow_target["uri"])
    checkpoint = tune.get_checkpoint()
    if checkpoint:  # resumed: keep logging to the trial's run
        with checkpoint.as_directory() as folder:
            run_id = load_state(Path(folder) / "state.pt")["run_id"]
    else:
        run = client.create_run(mlflow_target["experiment_id"], run_name=run_name, tags={
            **mlflow_target["tags"], "mlflow.parentRunId": mlflow_target["parent"], **tags})
        run_id = run.info.run_id
        params = config_params(cfg, mlflow_target["dataset_name"])
        client.log_batch(run_id, params=[_param(k, v) for k, v in params.items()])

    def report(metrics: dict, state: dict) -> None:
        log_epoch({"uri": mlflow_target["uri"], "run_id": run_id}, metrics)
        tune.report({**metrics, "mlflow_run_id": run_id}, checkpoint=_report_checkpoint(state, {"run_id": run_id}))

    fit_in_trial(cfg, data, threads, assigned_device(), report)


def _param(key: str, value):
    from mlflow.entities import Param

    return Param(key, str(value))


class TrialProgress:
    """A Tune callback: a bar (named `desc`) over trials and one line per finished, stopped or failed
    trial, which `describe(trial, state)` writes ("done" / "failed")."""

    def __new__(cls, total: int, describe: Callable[[object, str], str], desc: str = "trials"):
        from ray.tune import Callback
        from tqdm import tqdm

        class _Progress(Callback):
            def __init__(self):
                self.bar = tqdm(total=total, desc=desc, unit="trial", disable=None)

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.bar.write(describe(trial, "done"), file=sys.stderr)
                self.bar.update(1)

            def on_trial_error(self, iteration, trials, trial, **info):
                self.bar.write(describe(trial, "failed"), file=sys.stderr)
                self.bar.update(1)

            def close(self) -> None:
                self.bar.close()

        return _Progress()


def _describe_trial(metric: str, epochs: int) -> Callable[[object, str], str]:
    def describe(trial, state: str) -> str:
        result = trial.last_result or {}
        value = result.get(f"best_{metric}")
        epochs_run = result.get("training_iteration", 0)
        stopped = state == "done" and epochs_run < epochs
        return (f"trial {trial.trial_id}: {'stopped early' if stopped else state} after {epochs_run} epoch(s), "
                f"best {metric} {'-' if value is None else f'{value:.4f}'}  {_short(trial.config)}")

    return describe


def quiet_tune() -> None:
    """Our own progress lines replace Tune's tables; Optuna's note on list-valued choices (MLP
    widths) concerns its persistent storage, which a search does not use."""
    import warnings

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter honours verbose=0
    warnings.filterwarnings("ignore", message="Choices for a categorical distribution should be")


def _short(config: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(config.items()))


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, list) else str(value)


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


def _experiment_folder(space: SearchSpace, dataset_name: str, resume: bool) -> Path:
    root = state_folder() / "tune"
    stem = f"{space.path.stem}-{dataset_name}"
    if resume:
        found = sorted(root.glob(f"{stem}-*"))
        if not found:
            raise ValueError(f"no earlier search of {space.path} on {dataset_name} under {root} to resume")
        return found[-1]
    return root / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _leaderboard(grid, selection: Selection, epochs: int, defaults: dict) -> pd.DataFrame:
    """One row per trial that ran, best first; `defaults` marks the trial(s) whose sampled settings
    are `defaults` (SearchSpace.defaults: the first trial)."""
    metric = selection.metric
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        if not metrics and result.error is None:
            continue  # never started (a time budget ran out first)
        value = metrics.get(f"best_{metric}")
        epochs_run = int(metrics.get("training_iteration", 0))
        rows.append({"trial": metrics.get("trial_id", Path(result.path).name), "defaults": result.config == defaults,
                     **{k: _fmt(v) for k, v in (result.config or {}).items()},
                     f"best_{metric}": value, "best_epoch": metrics.get("best_epoch"), "epochs_run": epochs_run,
                     "stopped_early": result.error is None and epochs_run < epochs,
                     "seconds": metrics.get("time_total_s"), "finished_at": metrics.get("timestamp"),
                     "status": "failed" if result.error else "done", "mlflow_run_id": metrics.get("mlflow_run_id")})
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    return board.iloc[selection.best_first(board[f"best_{metric}"].astype(float).tolist())].reset_index(drop=True)


def confirmation_candidates(board: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows of `board` (best first) that the confirmation round trains again: the CONFIRM_TOP best
    finished trials, and the defaults trial if it finished outside them (so that the defaults stay
    comparable)."""
    done = board[(board["status"] == "done") & board[f"best_{metric}"].notna()]
    return pd.concat([done.head(CONFIRM_TOP), done[done["defaults"]]]).drop_duplicates("trial")


def seed_spread(board: pd.DataFrame, values: dict[str, dict[int, float]], selection: Selection) -> pd.DataFrame:
    """`board` with the confirmation round's outcome: for each confirmed trial (`values`: trial ->
    {seed: its best validation value on that seed}, the search's own seed included) `seeds` holds
    those values, `mean_<metric>` and `std_<metric>` (std over seeds, ddof 0 as `fusionrec ablate`;
    NaN when a seed failed or diverged) their spread. The confirmed trials come first, best mean
    first; the others follow in their order."""
    metric = selection.metric
    spread = {trial: pd.Series(by_seed, dtype=float) for trial, by_seed in values.items()}
    board = board.assign(seeds=board["trial"].map(values.get),
                         **{f"mean_{metric}": board["trial"].map({t: s.mean(skipna=False) for t, s in spread.items()}),
                            f"std_{metric}": board["trial"].map({t: s.std(ddof=0, skipna=False)
                                                                 for t, s in spread.items()})})
    confirmed = board[board["trial"].isin(values)]
    confirmed = confirmed.iloc[selection.best_first(confirmed[f"mean_{metric}"].tolist())]
    return pd.concat([confirmed, board[~board["trial"].isin(values)]]).reset_index(drop=True)


def versus_defaults(board: pd.DataFrame, winner: pd.Series, metric: str) -> str:
    """One line: is the selected trial (`winner`, a row of `board`) today's defaults, or by how much
    did it beat them on validation (on the mean over seeds, if the trials were confirmed)?"""
    column, what = f"best_{metric}", metric
    if f"mean_{metric}" in board:
        column, what = f"mean_{metric}", f"mean {metric} over {len(winner['seeds'])} seeds"
    if winner["defaults"]:
        return f"the selected trial is today's defaults ({what} {winner[column]:.4f}): no sampled trial beat them"
    ran = board[board["defaults"] & board[column].notna()]
    if ran.empty:
        return "the defaults trial has no result (it failed, or a time budget ended the search first)"
    return (f"the selected trial beat today's defaults on validation: {what} {winner[column]:.4f} against "
            f"{ran.iloc[0][column]:.4f} (trial {ran.iloc[0]['trial']})")


def search(dataset: str, features: str | None, space_path: Path, trials: int = 20, epochs: int = 30,
           max_concurrent: int | None = None, cpus_per_trial: float = 1, seed: int = 0, split: str = "random",
           objective: str | None = None, search_alg: str = "tpe", early_stopping: bool = True,
           register: bool = False, resume: bool = False, progress: bool = True,
           time_budget_s: float | None = None, confirm_seeds: int = 2) -> SearchResult:
    """The whole `fusionrec tune` (see the module docstring). Interrupted (Ctrl-C): raises
    KeyboardInterrupt after Tune saved its state; `resume=True` continues that search (and redoes a
    confirmation round that was interrupted). `time_budget_s`: stop starting and running trials after
    that long (fewer trials may run; the confirmation round is not bounded by it). `confirm_seeds`:
    the seeds the best trials train on again (0: select on the search's one seed)."""
    import mlflow
    import optuna
    from mlflow import MlflowClient
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
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
    if trials < 1 or epochs < 1 or cpus_per_trial <= 0 or (max_concurrent is not None and max_concurrent < 1):
        raise ValueError("--trials, --epochs and --max-concurrent must be at least 1, --cpus-per-trial positive")
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
                               "confirm_seeds": confirm_seeds})
            mlflow.log_artifact(str(space.path))
    target = {"uri": registry.tracking_uri(), "experiment_id": experiment_id, "parent": parent_id,
              "tags": run_identity(base_cfg, prepared), "dataset_name": prepared.dataset.spec.name}
    data = loop_data(prepared.users, prepared.items, prepared.ratings, prepared.split)  # no test rows

    def trainable(**confirming):
        return tune.with_resources(tune.with_parameters(run_trial, data=data, base=base, threads=threads,
                                                        mlflow_target=target, **confirming),
                                   trial_resources(cpus_per_trial))

    quiet_tune()
    describe = _describe_trial(selection.metric, epochs)
    callback = TrialProgress(trials, describe) if progress else None
    run_config = tune.RunConfig(name=folder.name, storage_path=str(folder.parent), verbose=0,
                                callbacks=[callback] if callback else None)
    if resume:
        if not tune.Tuner.can_restore(str(folder)):
            raise ValueError(f"{folder}: no Tune state to resume from")
        tuner = tune.Tuner.restore(str(folder), trainable=trainable(), resume_unfinished=True)
    else:
        # Today's defaults are the first trial (one of --trials), so the selected trial never validates
        # worse than `fusionrec train` with no flags. Random search is Optuna's random sampler too:
        # Tune's own BasicVariantGenerator fails on a list-valued first point (MLP widths) in Ray 2.60.
        sampler = (optuna.samplers.TPESampler if search_alg == "tpe" else optuna.samplers.RandomSampler)(seed=seed)
        searcher = OptunaSearch(metric=selection.metric, mode=selection.mode, sampler=sampler,
                                points_to_evaluate=[first])
        # Every trial gets a quarter of the epochs before ASHA may stop it: after one epoch a small
        # learning rate looks worse than it ends.
        scheduler = (ASHAScheduler(metric=selection.metric, mode=selection.mode, max_t=epochs,
                                   grace_period=max(1, epochs // 4), reduction_factor=2)
                     if early_stopping else FIFOScheduler())
        tuner = tune.Tuner(trainable(), param_space=space.param_space(), run_config=run_config,
                           tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=trials,
                                                       max_concurrent_trials=concurrency, reuse_actors=True,
                                                       time_budget_s=time_budget_s))
        folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"parent_run_id": parent_id, "space": str(space.path), "base": base}))
    try:
        grid = tuner.fit()
    finally:
        if callback:
            callback.close()
    if time_budget_s is None and grid.num_terminated + grid.num_errors < trials:
        raise KeyboardInterrupt(f"search interrupted after {grid.num_terminated} of {trials} trials; "
                                f"continue it with --resume ({folder})")
    metric = selection.metric
    board = _leaderboard(grid, selection, epochs, first)
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
        runs = _leaderboard(confirmations, selection, epochs, first)
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
    try:
        confirmations = tuner.fit()
    finally:
        if callback:
            callback.close()
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
