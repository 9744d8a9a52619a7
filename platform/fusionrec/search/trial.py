"""One Tune trial: `fit_in_trial` runs training.engine's epoch loop in the trial's process (one
report per epoch), `run_trial` wraps it with MLflow child-run logging; a progress bar over trials."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from fusionrec.search.space import with_settings
from fusionrec.training.config import TrainConfig
from fusionrec.training.data import LoopData
from fusionrec.training.engine import load_state, make_optimizer, new_model, run_epochs
from fusionrec.training.tracking import log_epoch


def report_with_checkpoint(metrics: dict, state: dict) -> None:
    """`tune.report` with a checkpoint of a resumable training state. Tune copies the folder into
    the trial's storage before `report` returns, so the temporary folder goes straight after."""
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="fusionrec-trial-") as folder:
        torch.save(state, Path(folder) / "state.pt")
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def fit_in_trial(cfg: TrainConfig, data: LoopData, threads: int, device: torch.device,
                 report: Callable[[dict, dict], None] | None = None) -> tuple[torch.nn.Module, dict]:
    """Train one configuration in this process (a Tune trial) on `device` (a trial's is
    `ray_runtime.assigned_device()`): the epoch loop of training.engine over in-memory shuffled batches,
    resumed from the trial's checkpoint if Tune restored one. Each epoch reports its validation
    metrics, the best so far (`best_<metric>`, `best_epoch`) and a checkpoint. Returns (the best
    model on validation, eval mode, on `device`; the last state)."""
    from ray import tune

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.training_seed)
    model = new_model(data, cfg).to(device)
    optimizer = make_optimizer(model, cfg, len(data.train))
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            resume = load_state(Path(folder) / "state.pt")
    users, items, ratings = (torch.as_tensor(data.train[c].to_numpy(), device=device)
                             for c in ("user_idx", "item_idx", "rating"))

    def batches(epoch: int):
        # Shuffled on the CPU, so the order is the same on every device.
        shuffle = torch.Generator().manual_seed(cfg.training_seed + epoch)
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
    its child run trains with that `train_seed` on the search's split and is tagged fusionrec.confirms
    and fusionrec.training_seed. Every child run is tagged fusionrec.node_id: the Ray node it trained on."""
    import ray
    from mlflow import MlflowClient
    from ray import tune

    from fusionrec.ops.ray_runtime import assigned_device
    from fusionrec.training.tracking import config_params

    trial_id = tune.get_context().get_trial_id()
    sampled, run_name, tags = config, trial_id, {"fusionrec.trial_id": trial_id}
    if confirming:
        sampled = {**confirming[config["confirms"]], "train_seed": config["seed"]}
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
        params = config_params(cfg, mlflow_target["dataset_name"], len(data.train))
        client.log_batch(run_id, params=[_param(k, v) for k, v in params.items()])
    # Where the trial runs (a resumed one may run elsewhere: the tag holds its last node).
    client.set_tag(run_id, "fusionrec.node_id", ray.get_runtime_context().get_node_id())

    def report(metrics: dict, state: dict) -> None:
        log_epoch({"uri": mlflow_target["uri"], "run_id": run_id}, metrics)
        report_with_checkpoint({**metrics, "mlflow_run_id": run_id}, {**state, "run_id": run_id})

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


def asha_sparing(defaults: dict, **asha):
    """ASHA (`asha`: its arguments) that never stops the defaults trial (config `defaults`) early.
    Its values still count at every rung, so it still stops others. Run to the end, the defaults are
    a full-length reference for the confirmation round: stopped at a rung, their value on the
    search's seed was an early epoch's, averaged with full-length runs on the others."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class SparingDefaults(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)
            if (action == TrialScheduler.STOP and trial.config == defaults
                    and result.get("training_iteration", 0) < asha["max_t"]):
                return TrialScheduler.CONTINUE
            return action

    return SparingDefaults(**asha)


def epoch_budget_stopper(budget: int):
    """A Tune stopper that ends the whole search once its trials have trained `budget` epochs in all
    (each trial reports once per epoch); Tune stops the trials still running."""
    from ray.tune.stopper import Stopper

    class EpochBudget(Stopper):
        def __init__(self):
            self.trained: set[tuple[str, int]] = set()  # (trial, epoch): a finished trial's last result comes twice

        def __call__(self, trial_id, result) -> bool:
            self.trained.add((trial_id, result.get("training_iteration")))
            return False

        def stop_all(self) -> bool:
            return len(self.trained) >= budget

    return EpochBudget()


def epochs_trained(grid) -> int:
    """The epochs a Tune ResultGrid's trials trained in all."""
    return sum(int(result.metrics.get("training_iteration", 0)) for result in grid)


def restore_tuner(folder: Path, trainable, **options):
    """The Tune experiment saved in `folder`, to go on with (`Tuner.restore` with `options`), or a
    one-line error if there is none."""
    from ray import tune

    if not tune.Tuner.can_restore(str(folder)):
        raise ValueError(f"{folder}: no Tune state to resume from")
    return tune.Tuner.restore(str(folder), trainable=trainable, **options)


def fit_closing(tuner, progress: TrialProgress | None):
    """`tuner.fit()`'s ResultGrid; the progress bar is closed however the fit ends (Ctrl-C included)."""
    try:
        return tuner.fit()
    finally:
        if progress:
            progress.close()


def describe_trial(metric: str, epochs: int) -> Callable[[object, str], str]:
    def describe(trial, state: str) -> str:
        result = trial.last_result or {}
        value = result.get(f"best_{metric}")
        epochs_run = result.get("training_iteration", 0)
        stopped = state == "done" and epochs_run < epochs
        return (f"trial {trial.trial_id}: {'stopped early' if stopped else state} after {epochs_run} epoch(s), "
                f"best {metric} {'-' if value is None else f'{value:.4f}'}  {short(trial.config)}")

    return describe


def quiet_tune() -> None:
    """Our own progress lines replace Tune's tables; Optuna's note on list-valued choices (MLP
    widths) concerns its persistent storage, which a search does not use."""
    import warnings

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter honours verbose=0
    warnings.filterwarnings("ignore", message="Choices for a categorical distribution should be")



def short(config: dict) -> str:
    return ", ".join(f"{k}={fmt(v)}" for k, v in sorted(config.items()))


def fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, list) else str(value)
