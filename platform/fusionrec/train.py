"""`fusionrec train`: fit a model with Ray Train, track it in MLflow, optionally register it.

    prepare()            dataset + feature tables -> content matrices, index-coded ratings, split
    train_loop_per_worker(config)   one DDP worker: Ray Data shard -> epochs -> report + checkpoint
    run_epochs()         the epoch loop itself, shared with Ray Tune's trials (tune.py)
    train()              TorchTrainer (ScalingConfig, RunConfig, FailureConfig) -> evaluate -> MLflow

On a Ray cluster with GPUs each worker reserves one and trains on it (`ray_runtime.use_gpus`: the
cluster decides, not the driver's torch); the loop takes its device explicitly, keeps the best
weights on the CPU and reads every saved state onto the CPU (`load_state`), so a CPU driver loads
what a GPU trained, and a checkpoint resumes on either.
Every epoch's report (and MLflow history) also carries each worker's checksum of its weights
(`replica_checksums`, `param_checksum_rank<N>`): equal on every rank while DDP keeps them in step.
Checkpoints are written every epoch; a lost worker restarts the group from the last one
(`FailureConfig(max_failures=...)`). The checkpoint also keeps the best weights on validation
(`SELECTION`: validation MSE for ratings, validation nDCG@10 over full ranking for implicit
feedback), which are what gets evaluated and registered; what is validated is a moving average of
the weights (`WeightAverage`, `ema_decay`). The test part is scored once, after.
Models without gradients (`models.config.NO_GRADIENT`: the genre-pop and content-knn baselines) skip the
Trainer: `fit` fits them in one pass from the training ratings and validates them the same way.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from fusionrec.config import state_folder
from fusionrec.data.fingerprint import data_fingerprint, features_fingerprint
from fusionrec.data.splits import SPLITS, Split, split_by_name
from fusionrec.data.validate import Dataset, load_dataset
from fusionrec.encoders.pipeline import feature_encoders
from fusionrec.evaluate import candidate, full_ranking, index_ratings, ranking_candidates
from fusionrec.models.baselines import CountModel
from fusionrec.models.bundle import save_bundle
from fusionrec.models.config import NO_GRADIENT, ModelConfig
from fusionrec.models.content import SideContent, build_side
from fusionrec.models.factory import build_model
from fusionrec.models.nets import Recommender
from fusionrec.selection import SELECTION, VALIDATION_K, Selection

READ_BATCH = 4096  # rows fetched from Ray Data at a time
OBJECTIVES = ("rating", "implicit")
# Default weight decay on the id embeddings, per objective. The rating objective's was tuned on the
# synthetic shop; on implicit feedback (BCE with sampled negatives) that much decay keeps the
# embeddings near zero and NeuMF ranks little better than popularity (MovieLens-100K, stratified
# split: nDCG@10 0.24 at 3e-2 against 0.40 at 1e-4; see the README).
ID_L2 = {"rating": 3e-2, "implicit": 1e-4}
# What is validated and kept is an exponential moving average of the weights (WeightAverage), not
# the last step's: on the 10 % shop it lowered validation MSE on every start tried (docs/quality.md).
EMA_DECAY = 0.998


@dataclass
class TrainConfig:
    dataset: str
    features: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 30
    batch_size: int = 256
    lr: float = 5e-3
    id_l2: float | None = None  # weight decay on id embeddings only (they overfit first); None = ID_L2[objective]
    objective: str = "rating"
    negatives: int = 4
    workers: int = 1
    split: str = "random"
    seed: int = 0
    k: int = 5
    max_failures: int = 2
    ema_decay: float = EMA_DECAY  # of the weight average that is validated and kept (0: the weights as trained)

    def __post_init__(self) -> None:
        if self.id_l2 is None:
            self.id_l2 = ID_L2.get(self.objective, ID_L2["rating"])

    def check(self) -> None:
        self.model.check()
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}: choose one of {', '.join(SPLITS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.epochs < 1 or self.batch_size < 1 or self.workers < 1 or self.lr <= 0:
            raise ValueError("--epochs, --batch-size and --workers must be at least 1 and --lr positive")
        if self.id_l2 < 0:
            raise ValueError(f"id_l2 must be non-negative, got {self.id_l2}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.model.model in NO_GRADIENT and self.objective != "implicit":
            raise ValueError(f"{self.model.model} ranks items and predicts no ratings: train it with "
                             "--objective implicit")

    @property
    def selection(self) -> Selection:
        return SELECTION[self.objective]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> TrainConfig:
        """From a dict shaped like `to_dict()` (as `fusionrec tune` writes best.yaml); unknown keys fail."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a mapping of training settings")
        model = raw.get("model") or {}
        if not isinstance(model, dict):
            raise ValueError(f"{source}: model: expected a mapping of model settings")
        _check_keys(raw, TrainConfig, source)
        _check_keys(model, ModelConfig, f"{source}: model")
        return cls(**{**raw, "model": ModelConfig(**model)})


def _check_keys(raw: dict, kind: type, source: str) -> None:
    known = set(kind.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{source}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")


def load_config(path: Path) -> TrainConfig:
    """A TrainConfig from YAML (what `fusionrec tune` writes as best.yaml)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    try:
        return TrainConfig.from_dict(raw, str(path))
    except TypeError as error:  # a missing `dataset`
        raise ValueError(f"{path}: {error}") from None


@dataclass
class Prepared:
    dataset: Dataset
    users: SideContent
    items: SideContent
    ratings: pd.DataFrame  # user_idx, item_idx, user_id, item_id, rating (RangeIndex = split positions)
    split: Split
    fingerprints: dict[str, str]  # "data", "features" (see data/fingerprint.py)

    def part(self, name: str) -> pd.DataFrame:
        """The ratings of one part of the split: "train", "validation" or "test"."""
        return self.ratings.iloc[getattr(self.split, name)]


def prepare(cfg: TrainConfig, pixels: bool = False) -> Prepared:
    """Load and index the data of a run and draw its split. Raw pixels are read for the CNN baseline
    (or with `pixels`, for runs of several models); every other model reads the encoded features."""
    dataset = load_dataset(Path(cfg.dataset), check_images=False)
    features = Path(cfg.features) if cfg.features else None
    pixels_root = dataset.root if cfg.model.model == "cnn" or pixels else None
    users = build_side(dataset.users, dataset.spec.users, "users", features, pixels_root)
    items = build_side(dataset.items, dataset.spec.items, "items", features, pixels_root)
    ratings = index_ratings(dataset, users.ids, items.ids)
    split = split_by_name(ratings, cfg.split, cfg.seed)
    if not len(split.validation):
        raise ValueError(f"the {cfg.split} split of {cfg.dataset} leaves no validation ratings to select on")
    fingerprints = {"data": data_fingerprint(dataset), "features": features_fingerprint(features)}
    return Prepared(dataset, users, items, ratings, split, fingerprints)


def _loss(model, users, items, ratings, objective: str, negatives: int, n_items: int | torch.Tensor) -> torch.Tensor:
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


def make_optimizer(model: torch.nn.Module, lr: float, id_l2: float) -> torch.optim.Optimizer:
    """Adam, with L2 (weight decay) on the id embedding tables only."""
    ids = [p for name, p in model.named_parameters() if name.endswith(("ids.weight", "p.weight", "q.weight"))]
    rest = [p for name, p in model.named_parameters() if not name.endswith(("ids.weight", "p.weight", "q.weight"))]
    return torch.optim.Adam([{"params": ids, "weight_decay": id_l2}, {"params": rest, "weight_decay": 0.0}], lr=lr)


@dataclass
class LoopData:
    """What each training worker or Tune trial needs besides its batches (one copy in the object store)."""

    users: SideContent
    items: SideContent
    train: pd.DataFrame  # user_idx, item_idx, rating of the training part (left out when ranking for validation)
    validation: pd.DataFrame  # user_idx, item_idx, rating
    validation_candidates: np.ndarray | None = None  # what validation ranks (None: every item; cold-items)


def loop_data(users: SideContent, items: SideContent, ratings: pd.DataFrame, split: Split) -> LoopData:
    """The training and validation parts only: the test part never reaches a worker or a trial."""
    columns = ["user_idx", "item_idx", "rating"]
    validation = ratings.iloc[split.validation][columns].reset_index(drop=True)
    return LoopData(users, items, ratings.iloc[split.train][columns].reset_index(drop=True), validation,
                    ranking_candidates(split, validation))


def loop_config(cfg: TrainConfig, data: LoopData, threads: int) -> dict:
    """The training configuration as the one dict each worker or trial receives."""
    train_mean = float(data.train["rating"].mean()) if cfg.objective == "rating" else 0.0
    return {"model": asdict(cfg.model) | {"global_mean": train_mean}, "epochs": cfg.epochs,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "id_l2": cfg.id_l2, "objective": cfg.objective,
            "negatives": cfg.negatives, "seed": cfg.seed, "ema_decay": cfg.ema_decay, "threads": threads}


def negative_pool(data: LoopData, device: torch.device) -> int | torch.Tensor:
    """What training draws negatives from: the items with training ratings (a tensor on `device`).
    Items held out whole (cold-start, cold-items) never appear as negatives, so their content is not
    learned as "not liked" from the training loop (nor touched by it at all). Every item: the count,
    as before."""
    trained = np.unique(data.train["item_idx"].to_numpy())
    return data.items.n if len(trained) == data.items.n else torch.as_tensor(trained, device=device)


def new_model(data: LoopData, model_config: dict) -> Recommender:
    """A freshly initialised model that knows which users and items have training ratings."""
    model = build_model(data.users, data.items, ModelConfig(**model_config))
    model.mark_seen(data.train["user_idx"].to_numpy(), data.train["item_idx"].to_numpy())
    return model


@torch.no_grad()
def validate(model: Recommender, data: LoopData, config: dict, device: torch.device) -> dict[str, float]:
    """Validation loss and the objective's selection metric (validation MSE, or nDCG@10 ranking every
    item the user did not rate in training), with the model on `device`."""
    val = data.validation
    u, i, r = (torch.as_tensor(val[c].to_numpy(), device=device) for c in ("user_idx", "item_idx", "rating"))
    # The same sampled negatives every epoch (implicit objective), so epochs are compared on one
    # validation set; forking (the CPU's generator and the device's) keeps the training random
    # stream as it was.
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        torch.manual_seed(config["seed"])
        loss = float(_loss(model, u, i, r, config["objective"], config["negatives"], data.items.n))
    if config["objective"] == "rating":
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


def run_epochs(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: LoopData, config: dict,
               batches: Callable[[int], Iterable[tuple[torch.Tensor, ...]]],
               report: Callable[[dict, dict], None], device: torch.device, resume: dict | None = None) -> None:
    """The epoch loop: train on `batches(epoch)` (user, item, rating tensors), validate the weight
    average (`ema_decay`; the weights as trained if 0), keep the best under the objective's
    selection metric, and hand `report` each epoch's metrics and a state to resume from (`resume`:
    such a state, on any device). The model and the batches are on `device`; the best state is
    kept on the CPU, so that a CPU driver loads it whatever device trained it."""
    core = model.module if hasattr(model, "module") else model  # DDP wraps it
    selection = SELECTION[config["objective"]]
    start, best = 0, {"value": None, "epoch": -1, "state": None}
    pool = negative_pool(data, device)
    averaged = WeightAverage(core, config["ema_decay"]) if config["ema_decay"] else None
    if resume:
        core.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if averaged:
            averaged.load_state_dict(resume["average"])
        start, best = resume["epoch"] + 1, resume["best"]
    for epoch in range(start, config["epochs"]):
        model.train()
        total, count, started = 0.0, 0, time.perf_counter()
        for users_b, items_b, ratings_b in batches(epoch):
            loss = _loss(model, users_b, items_b, ratings_b, config["objective"], config["negatives"], pool)
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
            metrics = {"epoch": epoch, "train_loss": total / max(count, 1), **validate(core, data, config, device),
                       "samples_per_s": count / elapsed}
            if selection.better(metrics[selection.metric], best["value"]):
                best = {"value": metrics[selection.metric], "epoch": epoch,
                        "state": {k: v.detach().to("cpu", copy=True) for k, v in core.state_dict().items()}}
        report(metrics, {"model": core.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                         "best": best, "average": averaged.state_dict() if averaged else None})


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker. `config` is the whole training configuration as one dict."""
    import ray
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    rank = ray.train.get_context().get_world_rank()
    data: LoopData = ray.get(config["data"])
    device = ray.train.torch.get_device()  # the worker's GPU when the trainer reserved one (use_gpus)
    model = ray.train.torch.prepare_model(new_model(data, config["model"]),  # moves it to `device`
                                          parallel_strategy_kwargs={"broadcast_buffers": False})
    optimizer = make_optimizer(model, config["lr"], config["id_l2"])
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resuming after a failure: continue from the last finished epoch
        with checkpoint.as_directory() as folder:
            resume = load_state(Path(folder) / "state.pt")
    shard = ray.train.get_dataset_shard("train")

    def batches(epoch: int):
        # Ray Data hands over large shuffled blocks; cutting them into minibatches here keeps its
        # per-batch overhead off every optimiser step.
        for block in shard.iter_torch_batches(batch_size=max(config["batch_size"], READ_BATCH),
                                              local_shuffle_buffer_size=4 * READ_BATCH,
                                              local_shuffle_seed=config["seed"] + epoch, device=device):
            for start in range(0, len(block["user_idx"]), config["batch_size"]):
                yield tuple(block[c][start:start + config["batch_size"]] for c in ("user_idx", "item_idx", "rating"))

    def report(metrics: dict, state: dict) -> None:
        metrics = metrics | replica_checksums(model)  # every worker takes part: a collective
        with tempfile.TemporaryDirectory() as folder:
            saved_checkpoint = None
            if rank == 0:
                torch.save(state, Path(folder) / "state.pt")
                saved_checkpoint = ray.train.Checkpoint.from_directory(folder)
                log_epoch(config.get("mlflow"), metrics)
            ray.train.report(metrics, checkpoint=saved_checkpoint)

    run_epochs(model, optimizer, data, config, batches, report, device, resume)


def replica_checksums(model: torch.nn.Module) -> dict[str, float]:
    """Each worker's checksum of its weights (their sum), by rank, as metrics `param_checksum_rank<N>`:
    gathered from every worker, so rank 0 reports them all. DDP starts every replica from rank 0's
    weights and steps each with the same averaged gradient, so they must all be equal."""
    import torch.distributed as dist

    mine = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return {f"param_checksum_rank{rank}": value.item() for rank, value in enumerate(every)}


def load_state(path: Path) -> dict:
    """A training state saved by `report` (a checkpoint), on the CPU whatever device saved it:
    resuming puts it on the resumed model's device (`load_state_dict` copies across devices)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def log_epoch(mlflow_target: dict | None, metrics: dict) -> None:
    """One epoch's metrics as MLflow history. The selection metric goes in as `epoch_<name>`: the
    plain name holds the best epoch's value, logged once at the end (what the registry compares)."""
    if not mlflow_target:
        return
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_target["uri"])
    history = {"train_loss": "train_loss", "val_loss": "val_loss", "samples_per_s": "samples_per_s"}
    history |= {name: f"epoch_{name}" for name in metrics if name.startswith("val_") and name != "val_loss"}
    history |= {name: name for name in metrics if name.startswith("param_checksum_rank")}  # replica_checksums
    for name, logged_as in history.items():
        client.log_metric(mlflow_target["run_id"], logged_as, metrics[name], step=metrics["epoch"])


class EpochProgress:
    """A progress bar over epochs in this process, fed by the per-epoch metrics that the rank-0
    worker logs to MLflow (worker output is not forwarded here). A run resumed after a failure
    logs some epochs again: the bar stays at the furthest epoch logged."""

    def __init__(self, run_id: str, epochs: int, every_s: float = 1.0):
        from tqdm import tqdm

        self.run_id, self.every_s = run_id, every_s
        self.bar = tqdm(total=epochs, desc="training", unit="epoch", disable=None)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="fusionrec-epoch-progress", daemon=True)

    def _update(self) -> None:
        from mlflow import MlflowClient

        history = MlflowClient().get_metric_history(self.run_id, "val_loss")
        if history:
            last = max(history, key=lambda m: (m.step, m.timestamp))
            self.bar.n = last.step + 1
            self.bar.set_postfix(val_loss=f"{last.value:.4f}")  # (also redraws the bar)

    def _follow(self) -> None:
        while not self.stopping.wait(self.every_s):
            self._update()

    def __enter__(self) -> EpochProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join()
        self._update()
        self.bar.close()


@dataclass
class TrainResult:
    metrics: dict  # test metrics, scored once after selection
    run_id: str | None
    best_epoch: int
    selection: tuple[str, float]  # (metric, best value on validation)
    model_uri: str | None = None  # the logged MLflow model (for `registry.download`)
    promotion: object | None = None  # registry.Promotion when registered


def fit(cfg: TrainConfig, prepared: Prepared, storage: Path,
        mlflow_target: dict | None = None) -> tuple[Recommender, dict]:
    """Run the TorchTrainer; returns (best model on validation, in eval mode; the final checkpoint's
    saved dict, which also carries the last epoch's reported `metrics`)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from fusionrec.ray_runtime import cpus_each, ensure_ray, use_gpus

    data = loop_data(prepared.users, prepared.items, prepared.ratings, prepared.split)
    if cfg.model.model in NO_GRADIENT:
        return fit_without_gradients(cfg, data, mlflow_target)
    ensure_ray()
    cpus_per_worker = cpus_each(cfg.workers)
    config = loop_config(cfg, data, cpus_per_worker) | {"data": ray.put(data), "mlflow": mlflow_target}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        # With GPUs each worker also reserves one (use_gpu), and trains on it.
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpus(),
                                               resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=f"train-{int(time.time() * 1000)}",
            storage_path=str(storage.resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": ray.data.from_pandas(data.train)},
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    with result.checkpoint.as_directory() as folder:
        saved = load_state(Path(folder) / "state.pt")
    saved["metrics"] = result.metrics
    model = new_model(data, config["model"])
    model.load_state_dict(saved["best"]["state"])  # includes the `seen` masks
    return model.eval(), saved


def fit_without_gradients(cfg: TrainConfig, data: LoopData, mlflow_target: dict | None = None
                          ) -> tuple[CountModel, dict]:
    """A model without parameters (`models.config.NO_GRADIENT`), fitted in one pass from the training ratings
    and validated like an epoch (`fit`'s return shape, one "epoch" 0). No Ray Train: DDP refuses a
    module without trainable parameters, Adam an empty parameter list, and there is no epoch to choose."""
    model = new_model(data, loop_config(cfg, data, 1)["model"])
    model.fit_ratings(data.train["user_idx"].to_numpy(), data.train["item_idx"].to_numpy())
    model.eval()
    metrics = {"epoch": 0, **validation_ranking(model, data)}
    value = metrics[cfg.selection.metric]
    if mlflow_target:
        from mlflow import MlflowClient

        MlflowClient(mlflow_target["uri"]).log_metric(mlflow_target["run_id"], f"epoch_{cfg.selection.metric}",
                                                      value, step=0)
    best = {"value": value, "epoch": 0, "state": model.state_dict()}
    return model, {"best": best, "epoch": 0, "metrics": metrics}


def loss_curve_png(history: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in history.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_identity(cfg: TrainConfig, prepared: Prepared) -> dict[str, str]:
    """The MLflow tags saying what a run was trained on and selected by (selection.IDENTITY)."""
    from fusionrec.registry import identity_tags

    return identity_tags({**prepared.fingerprints, "split": cfg.split, "seed": cfg.seed, "objective": cfg.objective},
                         cfg.selection.metric, cfg.selection.mode)


def score_test(model: Recommender, cfg: TrainConfig, prepared: Prepared) -> dict:
    """The test metrics (candidate protocol): call once, after every choice is made."""
    spec = prepared.dataset.spec
    return candidate(model, prepared.part("test"), (spec.rating_min, spec.rating_max), cfg.k,
                     spec.relevance_threshold, cfg.objective)


def as_test_metrics(metrics: dict) -> dict[str, float]:
    """Test metrics under their MLflow names ("precision@5" -> "test_precision_at_5"); Nones left out."""
    return {f"test_{k.replace('@', '_at_')}": v for k, v in metrics.items() if v is not None}


def log_trained_model(model: Recommender, cfg: TrainConfig, prepared: Prepared, run_id: str, metrics: dict) -> str:
    """Log the model as a bundle to the active MLflow run; returns its model URI."""
    from fusionrec import registry

    spec = prepared.dataset.spec
    with tempfile.TemporaryDirectory() as folder:
        bundle = Path(folder) / "bundle"
        save_bundle(bundle, model, prepared.users, prepared.items, {
            "dataset": spec.name, "rating_scale": [spec.rating_min, spec.rating_max],
            "relevance_threshold": spec.relevance_threshold, "objective": cfg.objective, "split": cfg.split,
            "seed": cfg.seed, "run_id": run_id, "test_metrics": metrics, "fingerprints": prepared.fingerprints,
            "encoders": feature_encoders(Path(cfg.features)) if cfg.features else {},
        }, seen=prepared.part("fitted")[["user_idx", "item_idx"]].to_numpy())
        return registry.log_bundle(bundle)


def log_config(cfg: TrainConfig, prepared: Prepared) -> None:
    """Params and identity tags of the active MLflow run."""
    import mlflow

    mlflow.log_params(config_params(cfg, prepared.dataset.spec.name))
    mlflow.set_tags(run_identity(cfg, prepared))


def config_params(cfg: TrainConfig, dataset_name: str) -> dict:
    """A configuration as flat MLflow params ("lr", "model.mlp", ...)."""
    return {"dataset": dataset_name, "dataset_path": cfg.dataset, "features": cfg.features,
            **{f"model.{k}": v for k, v in asdict(cfg.model).items()},
            **{k: v for k, v in asdict(cfg).items() if k not in ("model", "dataset", "features")}}


def train(cfg: TrainConfig, register: bool = False) -> TrainResult:
    """The whole `fusionrec train`: fit on Ray (choosing the epoch on validation), score the test part
    once, log to MLflow, register."""
    import mlflow
    from mlflow import MlflowClient

    from fusionrec import registry

    cfg.check()
    prepared = prepare(cfg)
    registry.setup()
    storage = state_folder() / "ray_results"
    storage.mkdir(parents=True, exist_ok=True)
    with mlflow.start_run() as run:
        log_config(cfg, prepared)
        target = {"uri": registry.tracking_uri(), "run_id": run.info.run_id}
        trains = cfg.model.model not in NO_GRADIENT  # the others have no epochs to follow or loss to plot
        with EpochProgress(run.info.run_id, cfg.epochs) if trains else contextlib.nullcontext():
            model, saved = fit(cfg, prepared, storage, target)
        best = saved["best"]
        metrics = score_test(model, cfg, prepared)
        mlflow.log_metrics({cfg.selection.metric: best["value"], "best_epoch": best["epoch"],
                            **as_test_metrics(metrics)})
        history = {name: [(m.step, m.value) for m in MlflowClient().get_metric_history(run.info.run_id, name)]
                   for name in ("train_loss", "val_loss")}
        with tempfile.TemporaryDirectory() as folder:
            if trains:
                loss_curve_png(history, Path(folder) / "loss_curve.png")
                mlflow.log_artifact(str(Path(folder) / "loss_curve.png"))
        model_uri = log_trained_model(model, cfg, prepared, run.info.run_id, metrics)
    result = TrainResult(metrics, run.info.run_id, best["epoch"], (cfg.selection.metric, best["value"]), model_uri)
    if register:
        result.promotion = registry.register(model_uri, run.info.run_id)
    return result
