"""The leaderboard of a search: one row per trial, best first, and what the confirmation round
reads from it (the candidates, their spread over seeds, the verdict against the defaults)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fusionrec.search.trial import fmt
from fusionrec.selection import Selection

CONFIRM_TOP = 3  # the best trials on validation that the confirmation round trains again (and the defaults)



def leaderboard(grid, selection: Selection, epochs: int, defaults: dict) -> pd.DataFrame:
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
                     **{k: fmt(v) for k, v in (result.config or {}).items()},
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
