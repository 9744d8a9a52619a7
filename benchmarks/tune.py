"""Search efficiency in trial-epochs: ASHA with a model-based or local sampler against random search
without early stopping, over several search seeds, in this process on the same cluster.

For each seed (the split's and the sampler's), the defaults trial runs alone first: its best
validation metric is the target. Then each search runs on the same budget of sampled trial-epochs:
random search runs `--trials` whole sampled trials (`--trials` x `--epochs`); an ASHA search gets
that many trial-epochs (`epoch_budget`), which fits more trials since ASHA stops weak ones early.
As `fusionrec tune` does, each search evaluates the defaults first (`--no-from-defaults`: not at
all, to measure how soon a search finds on its own what they give). That trial is the target, not
a candidate: its epochs are not counted and it cannot reach itself; random search draws the same
points with it or without it, while the local search starts from it.
The benchmark counts the trial-epochs (epochs trained, summed over the sampled trials finished so
far, in the order they finished) each needs to reach the defaults' score, and to beat it by 2 %. A
search that never gets there within the budget reads `inf`. Trial-epochs, not seconds: they do not
depend on how busy the machine is.

The last line is JSON: per seed and search the budgets, and per ASHA search the ratio to random's
budget to reach the defaults (below 1: it needed fewer trial-epochs; issue 25's target is <= 0.5).
Where only the ASHA search reached them, random search needs more than the whole budget, and the
ratio is at most the ASHA search's budget / the whole (`ratio_is_bound`; printed with "<"). The mean and
worst then bound the truth from above.

    .venv/bin/python benchmarks/tune.py SHOP --features FEATURES [--space tune/widths.yaml]
        [--trials 24] [--epochs 12] [--seeds 0,1,2] [--searches asha+tpe,asha+local,random]
        [--no-from-defaults]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import typer

from fusionrec.search.tune import asha_grace_period, search
from fusionrec.verbosity import configure

SEARCHES = {"asha+tpe": ("tpe", True), "asha+local": ("local", True), "random": ("random", False)}
MARGIN = 0.02


def budget_to_reach(sampled, metric: str, mode: str, target: float) -> float:
    """Trial-epochs spent (the `sampled` trials, a leaderboard without the defaults trial, in the
    order they finished) when the best so far first reaches `target`."""
    done = sampled.dropna(subset=[f"best_{metric}", "finished_at"]).sort_values("finished_at")
    spent = 0
    for epochs, value in zip(done["epochs_run"], done[f"best_{metric}"], strict=True):
        spent += int(epochs)
        if (value <= target if mode == "min" else value >= target):
            return float(spent)
    return math.inf


def ratio(searched: float, random: float, budget: int) -> dict:
    """A search's trial-epochs to reach the defaults over random search's. Neither reached them: no
    ratio (nan, left out of the mean); only random did: inf; only the search did: random needs more
    than the whole budget, so the ratio is at most the search's / the budget (`ratio_is_bound`)."""
    bound = math.isinf(random) and not math.isinf(searched)
    return {"ratio_is_bound": bound,
            "ratio": searched / budget if bound else math.nan if math.isinf(random) else searched / random}


def finite(value):
    """JSON has no infinity: a budget never reached (and a ratio of such) is null."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def main(shop: str, features: str = typer.Option(...), space: str = "tune/widths.yaml", trials: int = 24,
         epochs: int = 12, seeds: str = "0,1,2", searches: str = ",".join(SEARCHES),
         from_defaults: bool = True) -> None:
    configure(verbose_output=False)  # as the CLI: only the lines below
    names = searches.split(",")
    if not set(names) <= set(SEARCHES) or "random" not in names:
        raise typer.BadParameter(f"--searches {searches}: choose from {', '.join(SEARCHES)}, with random among "
                                 "them (the ratios' baseline)")
    rows = {}
    budget = trials * epochs  # each search's sampled trial-epochs
    extra = {"trials": 1, "epoch_budget": epochs} if from_defaults else {"trials": 0, "epoch_budget": 0}
    for seed in [int(s) for s in seeds.split(",")]:
        common = {"epochs": epochs, "seed": seed, "progress": False, "confirm_seeds": 0}
        defaults = search(shop, features, Path(space), trials=1, search_alg="random", early_stopping=False, **common)
        metric, value = defaults.selection
        mode = "min" if metric == "val_mse" else "max"
        targets = {"defaults": value, "2% better": value * (1 - MARGIN if mode == "min" else 1 + MARGIN)}
        rows[seed] = {"defaults": value}
        for name in names:
            search_alg, early_stopping = SEARCHES[name]
            if early_stopping:
                # as many trials as the budget can start: each trains at least ASHA's grace period
                runs = {"trials": budget // asha_grace_period(epochs), "epoch_budget": budget}
            else:
                runs = {"trials": trials}
            runs = {key: n + extra[key] for key, n in runs.items()}  # the defaults trial on top
            result = search(shop, features, Path(space), search_alg=search_alg, early_stopping=early_stopping,
                            from_defaults=from_defaults, **runs, **common)
            sampled = result.leaderboard[~result.leaderboard["defaults"]]  # the defaults trial is the target
            budgets = {what: budget_to_reach(sampled, metric, mode, target) for what, target in targets.items()}
            row = rows[seed][name] = {"best": float(sampled[f"best_{metric}"].min() if mode == "min"
                                                    else sampled[f"best_{metric}"].max()),
                                      "trials": len(sampled), "trial_epochs": int(sampled["epochs_run"].sum()),
                                      **budgets}
            print(f"seed {seed} {name}: best {metric} {row['best']:.4f} (defaults {value:.4f}), {row['trials']} "
                  f"sampled trials, {row['trial_epochs']} trial-epochs, to reach the defaults {row['defaults']}, "
                  f"to beat them by 2 % {row['2% better']}", flush=True)
        for name in names:
            if name != "random":
                rows[seed][name].update(ratio(rows[seed][name]["defaults"], rows[seed]["random"]["defaults"], budget))

    print(f"\n{budget} trial-epochs per search (random: {trials} trials of {epochs} epochs), space {space}; "
          "budgets in trial-epochs")
    print(f"| seed | defaults' {metric} | search | trials | best | trial-epochs spent | to reach the defaults "
          "| to beat them by 2 % |")
    print("|---|---|---|---|---|---|---|---|")
    for seed, row in rows.items():
        for name in names:
            r = row[name]
            print(f"| {seed} | {row['defaults']:.4f} | {name} | {r['trials']} | {r['best']:.4f} | "
                  f"{r['trial_epochs']} | {r['defaults']:g} | {r['2% better']:g} |")
    summary = {}
    for name in [n for n in names if n != "random"]:
        ratios = [row[name]["ratio"] for row in rows.values()]
        measured = [r for r in ratios if not math.isnan(r)] or [math.nan]
        summary[name] = {"mean_ratio": float(np.mean(measured)), "worst_ratio": float(max(measured))}
        shown = [("<" if row[name]["ratio_is_bound"] else "") + f"{row[name]['ratio']:.2f}" for row in rows.values()]
        print(f"ratio {name} / random, trial-epochs to reach the defaults, per seed: {', '.join(shown)} "
              f"(nan: neither reached them; <: only {name} did, within the budget); "
              f"mean {summary[name]['mean_ratio']:.2f}, worst {summary[name]['worst_ratio']:.2f}")
    print(json.dumps(finite({"metric": metric, "trials": trials, "epochs": epochs, "space": space,
                             "from_defaults": from_defaults, "seeds": {str(k): v for k, v in rows.items()},
                             "ratios": summary})))


if __name__ == "__main__":
    typer.run(main)
