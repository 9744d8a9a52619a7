"""The one rule for "better": NaN and missing values lose to every real one; min and max modes."""

from __future__ import annotations

import math

from fusionrec.selection import Selection

NAN = math.nan


def test_better_in_both_modes_and_against_nothing():
    low, high = Selection("val_mse", "min"), Selection("val_ndcg_at_10", "max")
    assert low.better(0.8, 0.9) and not low.better(0.9, 0.8) and not low.better(0.9, 0.9)
    assert high.better(0.9, 0.8) and not high.better(0.8, 0.9)
    assert low.better(5.0, None) and low.better(5.0, NAN) and low.better(NAN, None) and not low.better(NAN, 0.9)


def test_best_first_puts_failed_trials_last_and_keeps_ties_in_order():
    values = [0.9, None, 0.7, NAN, 0.7, 1.2]
    assert Selection("val_mse", "min").best_first(values) == [2, 4, 0, 5, 1, 3]
    assert Selection("val_ndcg_at_10", "max").best_first(values) == [5, 0, 2, 4, 1, 3]
