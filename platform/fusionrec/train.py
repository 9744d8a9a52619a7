"""`fusionrec train`: fit a model with Ray Train, track it in MLflow, optionally register it.

    prepare()            dataset + feature tables -> content matrices, index-coded ratings, split
    train_loop_per_worker(config)   one DDP worker: Ray Data shard -> epochs -> report + checkpoint
    train()              TorchTrainer (ScalingConfig, RunConfig, FailureConfig) -> evaluate -> MLflow

Checkpoints are written every epoch; a lost worker restarts the group from the last one
(`FailureConfig(max_failures=...)`). The checkpoint also keeps the best-on-validation weights,
which are what gets evaluated and registered.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from fusionrec.config import state_folder
from fusionrec.data.splits import SPLITS, Split, split_by_name
from fusionrec.data.validate import Dataset, load_dataset
from fusionrec.encoders.pipeline import feature_encoders
from fusionrec.evaluate import candidate, index_ratings
from fusionrec.models.bundle import save_bundle
from fusionrec.models.content import SideContent, build_side
from fusionrec.models.nets import ModelConfig, build_model

READ_BATCH = 4096  # rows fetched from Ray Data at a time
OBJECTIVES = ("rating", "implicit")
# Default weight decay on the id embeddings, per objective. The rating objective's was tuned on the
# synthetic shop; on implicit feedback (BCE with sampled negatives) that much decay keeps the
# embeddings near zero and NeuMF ranks little better than popularity (MovieLens-100K, stratified
# split: nDCG@10 0.24 at 3e-2 against 0.40 at 1e-4; see the README).
ID_L2 = {"rating": 3e-2, "implicit": 1e-4}


@dataclass
class TrainConfig:
    dataset: str
    features: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 15
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


@dataclass
class Prepared:
    dataset: Dataset
    users: SideContent
    items: SideContent
    ratings: pd.DataFrame  # user_idx, item_idx, user_id, item_id, rating (RangeIndex = split positions)
    split: Split


def prepare(cfg: TrainConfig) -> Prepared:
    dataset = load_dataset(Path(cfg.dataset), check_images=False)
    features = Path(cfg.features) if cfg.features else None
    pixels_root = dataset.root if cfg.model.model == "cnn" else None  # only the CNN reads raw pixels
    users = build_side(dataset.users, dataset.spec.users, "users", features, pixels_root)
    items = build_side(dataset.items, dataset.spec.items, "items", features, pixels_root)
    ratings = index_ratings(dataset, users.ids, items.ids)
    return Prepared(dataset, users, items, ratings, split_by_name(ratings, cfg.split, cfg.seed))


def _loss(model, users, items, ratings, objective: str, negatives: int, n_items: int) -> torch.Tensor:
    if objective == "rating":
        return torch.nn.functional.mse_loss(model(users, items), ratings)
    # implicit: every observed pair is a positive; `negatives` random items per positive are negatives
    neg_users = users.repeat_interleave(negatives)
    neg_items = torch.randint(0, n_items, neg_users.shape)
    scores = model(torch.cat([users, neg_users]), torch.cat([items, neg_items]))
    labels = torch.cat([torch.ones_like(users, dtype=torch.float32), torch.zeros_like(neg_users, dtype=torch.float32)])
    return torch.nn.functional.binary_cross_entropy_with_logits(scores, labels)


def make_optimizer(model: torch.nn.Module, lr: float, id_l2: float) -> torch.optim.Optimizer:
    """Adam, with L2 (weight decay) on the id embedding tables only."""
    ids = [p for name, p in model.named_parameters() if name.endswith(("ids.weight", "p.weight", "q.weight"))]
    rest = [p for name, p in model.named_parameters() if not name.endswith(("ids.weight", "p.weight", "q.weight"))]
    return torch.optim.Adam([{"params": ids, "weight_decay": id_l2}, {"params": rest, "weight_decay": 0.0}], lr=lr)


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker. `config` is the whole training configuration as one dict."""
    import ray
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    users, items, validation, seen = ray.get(config["data"])
    model = build_model(users, items, ModelConfig(**config["model"]))
    model.mark_seen(*seen)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
    core = model.module if hasattr(model, "module") else model
    optimizer = make_optimizer(model, config["lr"], config["id_l2"])
    start_epoch, best = 0, {"val_loss": float("inf"), "state": None}

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resuming after a failure: continue from the last finished epoch
        with checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / "state.pt", weights_only=False)
        core.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start_epoch, best = saved["epoch"] + 1, saved["best"]

    shard = ray.train.get_dataset_shard("train")
    val_u, val_i, val_r = (torch.as_tensor(validation[c]) for c in ("user_idx", "item_idx", "rating"))
    for epoch in range(start_epoch, config["epochs"]):
        crash = config.get("crash_at_epoch")
        if crash is not None and epoch == crash and rank == 0 and not Path(config["crash_marker"]).exists():
            Path(config["crash_marker"]).touch()
            os.kill(os.getpid(), signal.SIGKILL)  # a real lost worker, for the fault-tolerance test
        model.train()
        total, count, started = 0.0, 0, time.perf_counter()
        # Ray Data hands over large shuffled blocks; cutting them into minibatches here keeps its
        # per-batch overhead off every optimiser step.
        for block in shard.iter_torch_batches(batch_size=max(config["batch_size"], READ_BATCH),
                                              local_shuffle_buffer_size=4 * READ_BATCH,
                                              local_shuffle_seed=config["seed"] + epoch):
            for start in range(0, len(block["user_idx"]), config["batch_size"]):
                users_b, items_b, ratings_b = (block[c][start:start + config["batch_size"]]
                                               for c in ("user_idx", "item_idx", "rating"))
                loss = _loss(model, users_b, items_b, ratings_b, config["objective"], config["negatives"], items.n)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss) * len(users_b)
                count += len(users_b)
        core.eval()
        # The same sampled negatives every epoch (implicit objective), so epochs are compared on one
        # validation set; forking keeps the training random stream as it was.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(config["seed"])
            val_loss = float(_loss(core, val_u, val_i, val_r, config["objective"], config["negatives"], items.n))
        val_mse = val_loss  # the rating objective's loss is the MSE; for implicit, the BCE stands in for selection
        if val_loss < best["val_loss"]:
            best = {"val_loss": val_loss, "val_mse": val_mse, "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in core.state_dict().items()}}
        metrics = {"epoch": epoch, "train_loss": total / max(count, 1), "val_loss": val_loss, "val_mse": val_mse,
                   "samples_per_s": count / (time.perf_counter() - started)}
        with tempfile.TemporaryDirectory() as folder:
            saved_checkpoint = None
            if rank == 0:
                torch.save({"model": core.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                            "best": best}, Path(folder) / "state.pt")
                saved_checkpoint = ray.train.Checkpoint.from_directory(folder)
                _log_epoch(config.get("mlflow"), metrics)
            ray.train.report(metrics, checkpoint=saved_checkpoint)


def _log_epoch(mlflow_target: dict | None, metrics: dict) -> None:
    if not mlflow_target:
        return
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_target["uri"])
    for name in ("train_loss", "val_loss", "samples_per_s"):
        client.log_metric(mlflow_target["run_id"], name, metrics[name], step=metrics["epoch"])


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
    metrics: dict
    run_id: str | None
    bundle: Path
    best_epoch: int
    val_mse: float
    version: str | None = None
    promoted: bool = False
    model_uri: str | None = None  # the logged MLflow model (for `registry.download`)


def fit(cfg: TrainConfig, prepared: Prepared, storage: Path, mlflow_target: dict | None = None,
        crash_at_epoch: int | None = None) -> tuple[object, dict]:
    """Run the TorchTrainer; returns (best model in eval mode, the final checkpoint's saved dict,
    which also carries the last epoch's reported `metrics`)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from fusionrec.ray_runtime import cluster_cpus, ensure_ray

    ensure_ray()
    ratings, split = prepared.ratings, prepared.split
    train = ratings.iloc[split.train][["user_idx", "item_idx", "rating"]].reset_index(drop=True)
    validation_rows = ratings.iloc[split.validation if len(split.validation) else split.test]
    validation = {c: validation_rows[c].to_numpy() for c in ("user_idx", "item_idx", "rating")}
    seen = (train["user_idx"].to_numpy(), train["item_idx"].to_numpy())
    model_config = ModelConfig(**{**asdict(cfg.model), "global_mean": float(train["rating"].mean())
                                  if cfg.objective == "rating" else 0.0})
    cpus_per_worker = max(1, cluster_cpus() // cfg.workers)
    config = {
        "data": ray.put((prepared.users, prepared.items, validation, seen)),
        "model": asdict(model_config), "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
        "id_l2": cfg.id_l2, "objective": cfg.objective, "negatives": cfg.negatives,
        "seed": cfg.seed, "threads": cpus_per_worker, "mlflow": mlflow_target,
        "crash_at_epoch": crash_at_epoch, "crash_marker": str(storage / "crashed-once"),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=torch.cuda.is_available(),
                                               resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=f"train-{int(time.time() * 1000)}",
            storage_path=str(storage.resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": ray.data.from_pandas(train)},
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    with result.checkpoint.as_directory() as folder:
        saved = torch.load(Path(folder) / "state.pt", weights_only=False)
    saved["metrics"] = result.metrics
    model = build_model(prepared.users, prepared.items, model_config)
    model.load_state_dict(saved["best"]["state"])  # includes the `seen` masks
    return model.eval(), saved


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


def train(cfg: TrainConfig, register: bool = False, crash_at_epoch: int | None = None) -> TrainResult:
    """The whole `fusionrec train`: fit on Ray, evaluate on the test split, log to MLflow, register."""
    import mlflow
    from mlflow import MlflowClient

    from fusionrec import registry

    cfg.check()
    prepared = prepare(cfg)
    registry.setup()
    storage = state_folder() / "ray_results"
    storage.mkdir(parents=True, exist_ok=True)
    with mlflow.start_run() as run:
        mlflow.log_params({"dataset": prepared.dataset.spec.name, "dataset_path": cfg.dataset,
                           "features": cfg.features, **{f"model.{k}": v for k, v in asdict(cfg.model).items()},
                           **{k: v for k, v in asdict(cfg).items() if k not in ("model", "dataset", "features")}})
        target = {"uri": registry.tracking_uri(), "run_id": run.info.run_id}
        with EpochProgress(run.info.run_id, cfg.epochs):
            model, saved = fit(cfg, prepared, storage, target, crash_at_epoch)
        best = saved["best"]
        spec = prepared.dataset.spec
        scale = (spec.rating_min, spec.rating_max)
        test = prepared.ratings.iloc[prepared.split.test]
        metrics = candidate(model, test, scale, cfg.k, spec.relevance_threshold, cfg.objective)
        mlflow.log_metrics({"val_mse": best["val_mse"], "best_epoch": best["epoch"],
                            **{f"test_{k.replace('@', '_at_')}": v for k, v in metrics.items() if v is not None}})
        history = {name: [(m.step, m.value) for m in MlflowClient().get_metric_history(run.info.run_id, name)]
                   for name in ("train_loss", "val_loss")}
        with tempfile.TemporaryDirectory() as folder:
            loss_curve_png(history, Path(folder) / "loss_curve.png")
            mlflow.log_artifact(str(Path(folder) / "loss_curve.png"))
            bundle = Path(folder) / "bundle"
            save_bundle(bundle, model, prepared.users, prepared.items, {
                "dataset": spec.name, "rating_scale": list(scale), "relevance_threshold": spec.relevance_threshold,
                "objective": cfg.objective, "split": cfg.split, "seed": cfg.seed, "run_id": run.info.run_id,
                "test_metrics": metrics,
                "encoders": feature_encoders(Path(cfg.features)) if cfg.features else {},
            }, seen=prepared.ratings.iloc[prepared.split.fitted][["user_idx", "item_idx"]].to_numpy())
            model_uri = registry.log_bundle(bundle)
        result = TrainResult(metrics, run.info.run_id, bundle, best["epoch"], best["val_mse"], model_uri=model_uri)
        if register:
            result.version, result.promoted = registry.register(model_uri, best["val_mse"])
    return result

