"""The training itself, wherever it runs: the loss, the optimiser, the weight average, validation
and the epoch loop (`run_epochs`), shared by Ray Train's workers (ray_train.py) and Ray Tune's
trials (search/trial.py). Nothing here knows of Ray or MLflow: the caller hands in the batches, the device
and what to do with each epoch's report.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fusionrec.evaluate import full_ranking
from fusionrec.models.baselines import CountModel
from fusionrec.models.factory import build_model
from fusionrec.models.nets import Recommender
from fusionrec.selection import SELECTION, VALIDATION_K
from fusionrec.training.config import TrainConfig
from fusionrec.training.data import LoopData


def batch_loss(model, users, items, ratings, objective: str, negatives: int,
               n_items: int | torch.Tensor) -> torch.Tensor:
    """`n_items`: negatives are drawn from item rows 0..n_items-1, or from the rows in a tensor, on
    the batch's device (on the CPU, the same numbers as without a device)."""
    if objective == "rating":
        return torch.nn.functional.mse_loss(model(users, items), ratings)
    # implicit: every observed pair is a positive; `negatives` random items per positive are negatives
    neg_users = users.repeat_interleave(negatives)
    if isinstance(n_items, torch.Tensor):
        neg_items = n_items[torch.randint(0, len(n_items), neg_users.shape, device=users.device)]
    else:
        neg_items = torch.randint(0, n_items, neg_users.shape, device=users.device)
    scores = model(torch.cat([users, neg_users]), torch.cat([items, neg_items]))
    labels = torch.cat([torch.ones_like(users, dtype=torch.float32), torch.zeros_like(neg_users, dtype=torch.float32)])
    return torch.nn.functional.binary_cross_entropy_with_logits(scores, labels)


def make_optimizer(model: Recommender, cfg: TrainConfig, train_ratings: int) -> torch.optim.Optimizer:
    """Adam, with L2 (weight decay) on the model's id embedding tables (`cfg.id_l2`) and its
    codebooks' logit weights (`cfg.code_l2(train_ratings)`) only (`Recommender.parameter_groups`)."""
    return torch.optim.Adam(model.parameter_groups(cfg.id_l2, cfg.code_l2(train_ratings)), lr=cfg.lr)


def negative_pool(data: LoopData, device: torch.device) -> int | torch.Tensor:
    """What training draws negatives from: the items with training ratings (a tensor on `device`).
    Items held out whole (cold-start, cold-items) never appear as negatives, so their content is not
    learned as "not liked" from the training loop (nor touched by it at all). Every item: the count,
    as before."""
    trained = np.unique(data.train["item_idx"].to_numpy())
    return data.items.n if len(trained) == data.items.n else torch.as_tensor(trained, device=device)


def new_model(data: LoopData, cfg: TrainConfig) -> Recommender:
    """A freshly initialised model of `cfg.model` (its `global_mean`: the training part's) that knows
    which users and items have training ratings."""
    model = build_model(data.users, data.items, replace(cfg.model, global_mean=data.train_mean(cfg.objective)))
    model.mark_seen(data.train["user_idx"].to_numpy(), data.train["item_idx"].to_numpy())
    return model


@torch.no_grad()
def validate(model: Recommender, data: LoopData, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Validation loss and the objective's selection metric (validation MSE, or nDCG@10 ranking every
    item the user did not rate in training), with the model on `device`."""
    val = data.validation
    u, i, r = (torch.as_tensor(val[c].to_numpy(), device=device) for c in ("user_idx", "item_idx", "rating"))
    # The same sampled negatives every epoch (implicit objective), drawn from the split's seed, so
    # epochs, and runs with other training seeds on this split, are compared on one validation set;
    # forking (the CPU's generator and the device's) keeps the training random stream as it was.
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        torch.manual_seed(cfg.seed)
        loss = float(batch_loss(model, u, i, r, cfg.objective, cfg.negatives, data.items.n))
    if cfg.objective == "rating":
        return {"val_loss": loss, "val_mse": loss}
    return {"val_loss": loss, **validation_ranking(model, data)}


@torch.no_grad()
def validation_ranking(model: Recommender, data: LoopData) -> dict[str, float]:
    """The implicit objective's selection metric: validation nDCG@10 ranking every item the user did
    not rate in training (under cold-items, only the validation part's held-out items)."""
    ranking = full_ranking(model, data.train, data.validation, VALIDATION_K, data.validation_candidates)
    return {SELECTION["implicit"].metric: ranking[f"ndcg@{VALIDATION_K}"]}


class WeightAverage:
    """An exponential moving average of a model's parameters, updated after every optimiser step.
    The decay warms up as min(decay, (1 + t) / (10 + t)) at step t, so the average follows the
    weights early on instead of dragging the initialisation along."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.steps = decay, 0
        self.params = list(model.parameters())
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        weight = 1 - min(self.decay, (1 + self.steps) / (10 + self.steps))
        for average, p in zip(self.average, self.params, strict=True):
            average.lerp_(p, weight)

    @contextlib.contextmanager
    def applied(self):
        """The model holds the averaged weights inside this block, its own again after it."""
        own = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, average in zip(self.params, self.average, strict=True):
                p.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, weights in zip(self.params, own, strict=True):
                    p.copy_(weights)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "average": [a.clone() for a in self.average]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        with torch.no_grad():
            for average, saved in zip(self.average, state["average"], strict=True):
                average.copy_(saved)


def run_epochs(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: LoopData, cfg: TrainConfig,
               batches: Callable[[int], Iterable[tuple[torch.Tensor, ...]]],
               report: Callable[[dict, dict], None], device: torch.device, resume: dict | None = None) -> None:
    """The epoch loop: train on `batches(epoch)` (user, item, rating tensors), validate the weight
    average (`ema_decay`; the weights as trained if 0), keep the best under the objective's
    selection metric, and hand `report` each epoch's metrics and a state to resume from (`resume`:
    such a state, on any device). The model and the batches are on `device`; the best state is
    kept on the CPU, so that a CPU driver loads it whatever device trained it."""
    core = model.module if hasattr(model, "module") else model  # DDP wraps it
    selection = cfg.selection
    start, best = 0, {"value": None, "epoch": -1, "state": None}
    pool = negative_pool(data, device)
    averaged = WeightAverage(core, cfg.ema_decay) if cfg.ema_decay else None
    if resume:
        core.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if averaged:
            averaged.load_state_dict(resume["average"])
        start, best = resume["epoch"] + 1, resume["best"]
    for epoch in range(start, cfg.epochs):
        model.train()
        total, count, started = 0.0, 0, time.perf_counter()
        for users_b, items_b, ratings_b in batches(epoch):
            loss = batch_loss(model, users_b, items_b, ratings_b, cfg.objective, cfg.negatives, pool)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if averaged:
                averaged.update()
            total += loss.item() * len(users_b)
            count += len(users_b)
        elapsed = time.perf_counter() - started
        core.eval()
        with averaged.applied() if averaged else contextlib.nullcontext():
            metrics = {"epoch": epoch, "train_loss": total / max(count, 1), **validate(core, data, cfg, device),
                       "samples_per_s": count / elapsed}
            if selection.better(metrics[selection.metric], best["value"]):
                best = {"value": metrics[selection.metric], "epoch": epoch,
                        "state": {k: v.detach().to("cpu", copy=True) for k, v in core.state_dict().items()}}
        report(metrics, {"model": core.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                         "best": best, "average": averaged.state_dict() if averaged else None})


def load_state(path: Path) -> dict:
    """A training state saved from `run_epochs`' report (a checkpoint), on the CPU whatever device
    saved it: resuming puts it on the resumed model's device (`load_state_dict` copies across devices)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def fit_in_one_pass(cfg: TrainConfig, data: LoopData) -> tuple[CountModel, dict]:
    """A model without parameters (`models.config.NO_GRADIENT`), fitted in one pass from the training
    ratings and validated like an epoch (the shape of `ray_train.fit`'s return, one "epoch" 0). No
    epoch loop: DDP refuses a module without trainable parameters, Adam an empty parameter list, and
    there is no epoch to choose."""
    model = new_model(data, cfg)
    model.fit_ratings(data.train["user_idx"].to_numpy(), data.train["item_idx"].to_numpy())
    model.eval()
    metrics = {"epoch": 0, **validation_ranking(model, data)}
    best = {"value": metrics[cfg.selection.metric], "epoch": 0, "state": model.state_dict()}
    return model, {"best": best, "epoch": 0, "metrics": metrics}
