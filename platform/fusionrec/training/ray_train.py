"""Training on Ray Train: `fit` runs a TorchTrainer (ScalingConfig, RunConfig, FailureConfig) whose
DDP workers (`train_loop_per_worker`) read their shard of the training part from Ray Data, run the
epoch loop (engine.run_epochs) and report each epoch with a checkpoint; the rank-0 worker also
logs the epoch to MLflow. Models without gradients are fitted in one pass, without the Trainer.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from fusionrec.models.config import NO_GRADIENT
from fusionrec.models.nets import Recommender
from fusionrec.training.config import TrainConfig
from fusionrec.training.data import LoopData, Prepared, loop_data
from fusionrec.training.engine import fit_in_one_pass, load_state, make_optimizer, new_model, run_epochs
from fusionrec.training.tracking import log_epoch, log_resume

READ_BATCH = 4096  # rows fetched from Ray Data at a time


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker. `config`: {"cfg": the TrainConfig, "data": a reference to the LoopData,
    "threads": torch threads, "mlflow": where rank 0 logs each epoch, or None}."""
    import ray
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = config["cfg"]
    torch.set_num_threads(config["threads"])
    torch.manual_seed(cfg.training_seed)
    rank = ray.train.get_context().get_world_rank()
    data: LoopData = ray.get(config["data"])
    device = ray.train.torch.get_device()  # the worker's GPU when the trainer reserved one (use_gpus)
    recommender = new_model(data, cfg)
    model = ray.train.torch.prepare_model(recommender,  # moves it to `device`, wrapped in DDP
                                          parallel_strategy_kwargs={"broadcast_buffers": False})
    optimizer = make_optimizer(recommender, cfg, len(data.train))  # the same parameters, named by the model
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resuming after a failure: continue from the last finished epoch
        with checkpoint.as_directory() as folder:
            resume = load_state(Path(folder) / "state.pt")
        if rank == 0:
            log_resume(config["mlflow"], resume["epoch"])
    shard = ray.train.get_dataset_shard("train")

    def batches(epoch: int):
        # Ray Data hands over large shuffled blocks; cutting them into minibatches here keeps its
        # per-batch overhead off every optimiser step.
        for block in shard.iter_torch_batches(batch_size=max(cfg.batch_size, READ_BATCH),
                                              local_shuffle_buffer_size=4 * READ_BATCH,
                                              local_shuffle_seed=cfg.training_seed + epoch, device=device):
            for start in range(0, len(block["user_idx"]), cfg.batch_size):
                yield tuple(block[c][start:start + cfg.batch_size] for c in ("user_idx", "item_idx", "rating"))

    def report(metrics: dict, state: dict) -> None:
        metrics = metrics | replica_checksums(model)  # every worker takes part: a collective
        with tempfile.TemporaryDirectory() as folder:
            saved_checkpoint = None
            if rank == 0:
                torch.save(state, Path(folder) / "state.pt")
                saved_checkpoint = ray.train.Checkpoint.from_directory(folder)
                log_epoch(config["mlflow"], metrics)
            ray.train.report(metrics, checkpoint=saved_checkpoint)

    run_epochs(model, optimizer, data, cfg, batches, report, device, resume)


def replica_checksums(model: torch.nn.Module) -> dict[str, float]:
    """Each worker's checksum of its weights (their sum), by rank, as metrics `param_checksum_rank<N>`:
    gathered from every worker, so rank 0 reports them all. DDP starts every replica from rank 0's
    weights and steps each with the same averaged gradient, so they must all be equal."""
    import torch.distributed as dist

    mine = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return {f"param_checksum_rank{rank}": value.item() for rank, value in enumerate(every)}


def fit(cfg: TrainConfig, prepared: Prepared, storage: Path,
        mlflow_target: dict | None = None) -> tuple[Recommender, dict]:
    """Run the TorchTrainer; returns (best model on validation, in eval mode; the final checkpoint's
    saved dict, which also carries the last epoch's reported `metrics`). A model without gradients
    is fitted in one pass here instead (engine.fit_in_one_pass), its "epoch" 0 logged the same way."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from fusionrec.ops.ray_runtime import cpus_each, ensure_ray, use_gpus

    data = loop_data(prepared.users, prepared.items, prepared.ratings, prepared.split)
    if cfg.model.model in NO_GRADIENT:
        model, saved = fit_in_one_pass(cfg, data)
        log_epoch(mlflow_target, saved["metrics"])
        return model, saved
    ensure_ray()
    cpus_per_worker = cpus_each(cfg.workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "data": ray.put(data), "threads": cpus_per_worker, "mlflow": mlflow_target},
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
    model = new_model(data, cfg)
    model.load_state_dict(saved["best"]["state"])  # includes the `seen` masks
    return model.eval(), saved
