"""Search efficiency: ASHA + Optuna TPE against random search without early stopping, at the same
wall-clock budget, one after the other in this process on the same cluster and data.

Prints, for each: trials started and finished, the best validation metric reached, the time to
reach random search's final best (the ratio ASHA+TPE / random: below 1 means it got there
sooner), and the CPU busy fraction during the search (sampled system-wide every second; the
search should keep the cluster's CPUs busy: >= 0.8 on 2 CPUs).

    .venv/bin/python benchmarks/tune.py SHOP --features FEATURES [--space tune/widths.yaml]
        [--budget-s 600] [--epochs 15] [--trials 200]
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import psutil
import typer

from fusionrec.search.tune import search


class CpuSampler:
    """Mean system-wide CPU busy fraction over the `with` block."""

    def __init__(self, every_s: float = 1.0):
        self.every_s, self.samples, self.stopping = every_s, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        psutil.cpu_percent(None)
        while not self.stopping.wait(self.every_s):
            self.samples.append(psutil.cpu_percent(None) / 100)

    def __enter__(self) -> CpuSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join()

    @property
    def busy(self) -> float:
        return float(np.mean(self.samples)) if self.samples else float("nan")


def best_over_time(board, metric: str, mode: str, started: float) -> list[tuple[float, float]]:
    """(seconds since the start, best value so far) at each trial's end."""
    done = board.dropna(subset=[f"best_{metric}", "finished_at"]).sort_values("finished_at")
    curve, best = [], None
    for finished, value in zip(done["finished_at"], done[f"best_{metric}"], strict=True):
        if best is None or (value < best if mode == "min" else value > best):
            best = value
        curve.append((finished - started, best))
    return curve


def time_to_reach(curve: list[tuple[float, float]], target: float, mode: str) -> float:
    for seconds, value in curve:
        if (value <= target if mode == "min" else value >= target):
            return seconds
    return float("inf")


def main(shop: str, features: str = typer.Option(...), space: str = "tune/widths.yaml", budget_s: float = 600,
         epochs: int = 15, trials: int = 200, seed: int = 0) -> None:
    runs = {}
    for name, search_alg, early_stopping in (("asha+tpe", "tpe", True), ("random", "random", False)):
        started = time.time()
        with CpuSampler() as cpu:
            result = search(shop, features, Path(space), trials=trials, epochs=epochs, seed=seed,
                            search_alg=search_alg, early_stopping=early_stopping, time_budget_s=budget_s,
                            progress=False, confirm_seeds=0)  # the searches' own best, on one seed each
        metric = result.selection[0]
        mode = "min" if metric == "val_mse" else "max"
        runs[name] = {"result": result, "cpu": cpu.busy, "mode": mode, "metric": metric,
                      "curve": best_over_time(result.leaderboard, metric, mode, started)}
        print(f"{name}: {len(result.leaderboard)} trials, {int(result.leaderboard['stopped_early'].sum())} stopped "
              f"early, best {metric} {result.selection[1]:.4f}, CPU busy {cpu.busy:.2f}", flush=True)
    target = runs["random"]["curve"][-1][1]
    mode = runs["random"]["mode"]
    times = {name: time_to_reach(run["curve"], target, mode) for name, run in runs.items()}
    print(f"\nbudget {budget_s:.0f} s each, {epochs} epochs max, space {space}")
    print(f"| search | trials | best {runs['random']['metric']} | s to reach random's best ({target:.4f}) "
          "| CPU busy |")
    print("|---|---|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {len(run['result'].leaderboard)} | {run['result'].selection[1]:.4f} | "
              f"{times[name]:.0f} | {run['cpu']:.2f} |")
    print(f"time ratio asha+tpe / random to reach random's final best: {times['asha+tpe'] / times['random']:.2f}")


if __name__ == "__main__":
    typer.run(main)
