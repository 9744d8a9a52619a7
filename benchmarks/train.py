"""Training throughput: `fusionrec train`'s Ray Train loop against a plain single-process PyTorch loop.

Same model (FusionNeuMF on structured + bag-of-words-free content), same data (a synthetic shop
of >= 200k ratings, the 70 % training part), same batch size and optimiser. Both use all cores:
the plain loop through torch threads, Ray Train through one worker holding every CPU (or N
workers splitting them); on a machine with a GPU both train on it. Prints steady-state samples/s
(the last epoch) of each and the ratio, plus Ray's end-to-end wall time including worker start-up.

    .venv/bin/python benchmarks/train.py [--users 2000 --items 1000 --density 0.15 --epochs 3 --workers 1]
    .venv/bin/python benchmarks/train.py --nodes 2     # also on a local 2-node cluster: the scaling
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import typer

from fusionrec.data.synth import SynthConfig, generate
from fusionrec.models.config import ModelConfig
from fusionrec.models.factory import build_model
from fusionrec.ops.cluster import LocalCluster
from fusionrec.ops.ray_runtime import ensure_ray
from fusionrec.training.config import TrainConfig
from fusionrec.training.data import prepare
from fusionrec.training.engine import batch_loss, make_optimizer
from fusionrec.training.ray_train import fit


def plain_loop(cfg: TrainConfig, prepared, device: torch.device) -> float:
    """Samples/s of the last epoch of a plain loop over in-memory tensors on `device`."""
    torch.set_num_threads(os.cpu_count() or 1)
    train = prepared.ratings.iloc[prepared.split.train]
    model = build_model(prepared.users, prepared.items,
                        ModelConfig(**{**asdict(cfg.model), "global_mean": float(train["rating"].mean())}))
    model.mark_seen(train["user_idx"].to_numpy(), train["item_idx"].to_numpy())
    model.to(device)
    optimizer = make_optimizer(model, cfg, len(train))
    users, items, ratings = (torch.tensor(train[c].to_numpy(), device=device)
                             for c in ("user_idx", "item_idx", "rating"))
    rate = 0.0
    for _ in range(cfg.epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(users), device=device)
        for s in range(0, len(users), cfg.batch_size):
            batch = order[s:s + cfg.batch_size]
            loss = batch_loss(model, users[batch], items[batch], ratings[batch], cfg.objective, cfg.negatives,
                         prepared.items.n)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        loss.item()  # waits for the device to finish the epoch's steps
        rate = len(users) / (time.perf_counter() - start)
    return rate


def main(users: int = 2000, items: int = 1000, density: float = 0.15, epochs: int = 3, workers: int = 1,
         batch_size: int = 256, nodes: int = 1) -> None:
    """--nodes N > 1: also train on a local N-node cluster (one worker a node, the CPUs split
    between nodes) and print its samples/s against the single local Ray's."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(SynthConfig(users=users, items=items, density=density, seed=0, images=False), Path(tmp) / "shop")
        cfg = TrainConfig(dataset=str(Path(tmp) / "shop"), epochs=epochs, batch_size=batch_size, workers=workers)
        prepared = prepare(cfg)
        n = len(prepared.split.train)
        # This machine's GPU, if it has one: the local Ray below finds the same one (fit's use_gpus).
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        plain = plain_loop(cfg, prepared, device)
        ensure_ray()
        ray_rate, wall = ray_train(cfg, prepared, Path(tmp) / "ray")
        print(f"{n:,} training ratings, batch {batch_size}, {epochs} epochs, {workers} Ray worker(s), on {device}")
        print(f"plain PyTorch loop: {plain:,.0f} samples/s; Ray Train: {ray_rate:,.0f} samples/s; "
              f"ratio {ray_rate / plain:.2f}")
        print(f"Ray Train end to end (worker start-up, data, {epochs} epochs): {wall:.1f}s = "
              f"{n * epochs / wall:,.0f} samples/s")
        if nodes > 1:
            import ray

            ray.shutdown()
            cpus = max(1, (os.cpu_count() or 1) // nodes)
            with LocalCluster(nodes=nodes, cpus_per_node=cpus) as address:
                os.environ["RAY_ADDRESS"] = address
                cluster_cfg = replace(cfg, workers=nodes)
                cluster_rate, cluster_wall = ray_train(cluster_cfg, prepared, Path(tmp) / "ray-cluster")
                ray.shutdown()
                del os.environ["RAY_ADDRESS"]
            print(f"local {nodes}-node cluster ({cpus} CPU a node, {nodes} workers, DDP): {cluster_rate:,.0f} "
                  f"samples/s, {cluster_rate / ray_rate:.2f}x the single local Ray; end to end {cluster_wall:.1f}s")


def ray_train(cfg: TrainConfig, prepared, storage: Path) -> tuple[float, float]:
    """(steady-state samples/s over all workers, wall seconds end to end) of one `fit`."""
    start = time.perf_counter()
    _, saved = fit(cfg, prepared, storage)
    wall = time.perf_counter() - start
    return saved["metrics"]["samples_per_s"] * cfg.workers, wall  # each worker reports its own shard's rate


if __name__ == "__main__":
    typer.run(main)
