"""Search efficiency in trial-epochs: ASHA + Optuna TPE against random search without early
stopping, over several search seeds, in this process on the same cluster.

For each seed (the split's and the sampler's), the defaults trial runs alone first: its best
validation metric is the target. Then each search runs without the defaults as its first point
(`search(from_defaults=False)`), on the same budget of trial-epochs: random search runs `--trials`
whole trials (`--trials` x `--epochs`); ASHA + TPE gets that many trial-epochs (`epoch_budget`), which
fits more trials since ASHA stops weak ones early. The benchmark counts the trial-epochs (epochs
trained, summed over the trials finished so far, in the order they finished) each needs to reach
the defaults' score, and to beat it by 2 %. A search that never gets there within the budget reads
`inf`. Trial-epochs, not seconds: they do not depend on how busy the machine is.

The last line is JSON: per seed and search the budgets, and the ratio ASHA+TPE / random of the
budget to reach the defaults (below 1: it needed fewer trial-epochs; issue 25's target is <= 0.5).
Where only ASHA + TPE reached them, random search needs more than the whole budget, and the ratio
is at most ASHA + TPE's budget / the whole (`ratio_is_bound`; printed with "<"). The mean and
worst then bound the truth from above.

    .venv/bin/python benchmarks/tune.py SHOP --features FEATURES [--space tune/widths.yaml]
        [--trials 24] [--epochs 12] [--seeds 0,1,2]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import typer

from fusionrec.search.tune import asha_grace_period, search
from fusionrec.verbosity import configure

SEARCHES = {"asha+tpe": ("tpe", True), "random": ("random", False)}
MARGIN = 0.02


def budget_to_reach(board, metric: str, mode: str, target: float) -> float:
    """Trial-epochs spent (trials in the order they finished) when the best so far first reaches `target`."""
    done = board.dropna(subset=[f"best_{metric}", "finished_at"]).sort_values("finished_at")
    spent = 0
    for epochs, value in zip(done["epochs_run"], done[f"best_{metric}"], strict=True):
        spent += int(epochs)
        if (value <= target if mode == "min" else value >= target):
            return float(spent)
    return math.inf


def finite(value):
    """JSON has no infinity: a budget never reached (and a ratio of such) is null."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def main(shop: str, features: str = typer.Option(...), space: str = "tune/widths.yaml", trials: int = 24,
         epochs: int = 12, seeds: str = "0,1,2") -> None:
    configure(verbose_output=False)  # as the CLI: only the lines below
    rows = {}
    budget = trials * epochs  # each search's, in trial-epochs
    for seed in [int(s) for s in seeds.split(",")]:
        common = {"epochs": epochs, "seed": seed, "progress": False, "confirm_seeds": 0}
        defaults = search(shop, features, Path(space), trials=1, search_alg="random", early_stopping=False, **common)
        metric, value = defaults.selection
        mode = "min" if metric == "val_mse" else "max"
        targets = {"defaults": value, "2% better": value * (1 - MARGIN if mode == "min" else 1 + MARGIN)}
        rows[seed] = {"defaults": value}
        for name, (search_alg, early_stopping) in SEARCHES.items():
            if early_stopping:
                # as many trials as the budget can start: each trains at least ASHA's grace period
                runs = {"trials": budget // asha_grace_period(epochs), "epoch_budget": budget}
            else:
                runs = {"trials": trials}
            result = search(shop, features, Path(space), search_alg=search_alg, early_stopping=early_stopping,
                            from_defaults=False, **runs, **common)
            board = result.leaderboard
            budgets = {what: budget_to_reach(board, metric, mode, target) for what, target in targets.items()}
            rows[seed][name] = {"best": result.selection[1], "trials": len(board),
                                "trial_epochs": int(board["epochs_run"].sum()), **budgets}
            print(f"seed {seed} {name}: best {metric} {result.selection[1]:.4f} (defaults {value:.4f}), "
                  f"{len(board)} trials, {rows[seed][name]['trial_epochs']} trial-epochs, to reach the defaults "
                  f"{rows[seed][name]['defaults']}, to beat them by 2 % {rows[seed][name]['2% better']}", flush=True)
        budgets = rows[seed]["asha+tpe"]["defaults"], rows[seed]["random"]["defaults"]
        # Neither reached the defaults: no ratio (nan, left out of the mean); only random did: inf; only
        # ASHA + TPE did: random needs more than the whole budget, so the ratio is at most ASHA's / the budget.
        rows[seed]["ratio_is_bound"] = math.isinf(budgets[1]) and not math.isinf(budgets[0])
        rows[seed]["ratio"] = (budgets[0] / budget if rows[seed]["ratio_is_bound"] else
                               math.nan if math.isinf(budgets[1]) else budgets[0] / budgets[1])

    print(f"\n{budget} trial-epochs per search (random: {trials} trials of {epochs} epochs), space {space}; "
          "budgets in trial-epochs")
    print(f"| seed | defaults' {metric} | search | trials | best | trial-epochs spent | to reach the defaults "
          "| to beat them by 2 % |")
    print("|---|---|---|---|---|---|---|---|")
    for seed, row in rows.items():
        for name in SEARCHES:
            r = row[name]
            print(f"| {seed} | {row['defaults']:.4f} | {name} | {r['trials']} | {r['best']:.4f} | "
                  f"{r['trial_epochs']} | {r['defaults']:g} | {r['2% better']:g} |")
    ratios = [row["ratio"] for row in rows.values()]
    measured = [r for r in ratios if not math.isnan(r)] or [math.nan]
    shown = [("<" if row["ratio_is_bound"] else "") + f"{row['ratio']:.2f}" for row in rows.values()]
    print(f"ratio ASHA+TPE / random, trial-epochs to reach the defaults, per seed: {', '.join(shown)} "
          "(nan: neither reached them; <: only ASHA+TPE did, within the budget); "
          f"mean {np.mean(measured):.2f}, worst {max(measured):.2f}")
    print(json.dumps(finite({"metric": metric, "trials": trials, "epochs": epochs, "space": space,
                             "seeds": {str(k): v for k, v in rows.items()}, "mean_ratio": float(np.mean(measured)),
                             "worst_ratio": float(max(measured))})))


if __name__ == "__main__":
    typer.run(main)
