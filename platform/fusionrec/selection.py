"""What "better" means: one validation metric per objective, and the comparison every choice uses.

Epochs (training/engine.py), trials (search/trial.py) and champions (registry.py) are all picked by `Selection`
(`better`, `best_first`), on validation data only, between runs that share an IDENTITY.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

VALIDATION_K = 10  # implicit feedback is selected on nDCG at this cut-off
# What makes two runs comparable: validation metrics are only compared between runs that agree on
# all of these (registry.py tags every run with them; search/space.py never searches the settings among them).
IDENTITY = {"data": "dataset", "features": "set of feature tables", "split": "split", "seed": "split seed",
            "objective": "objective"}


@dataclass(frozen=True)
class Selection:
    """The validation metric that picks epochs, configurations and champions for an objective."""

    metric: str  # its name in reports and in MLflow
    mode: str  # "min" or "max"

    def better(self, value: float, than: float | None) -> bool:
        """Whether `value` beats `than` (None: nothing yet). NaN (a diverged model) beats nothing."""
        if math.isnan(value):
            return than is None
        if than is None or math.isnan(than):
            return True
        return value < than if self.mode == "min" else value > than

    def best_first(self, values: Sequence[float | None]) -> list[int]:
        """Positions of `values` from best to worst; a missing or NaN value (a trial that failed or
        diverged) after every real one; ties keep their order."""
        def key(position: int) -> tuple[bool, float]:
            value = values[position]
            if value is None or math.isnan(value):
                return True, 0.0
            return False, value if self.mode == "min" else -value

        return sorted(range(len(values)), key=key)


SELECTION = {"rating": Selection("val_mse", "min"), "implicit": Selection(f"val_ndcg_at_{VALIDATION_K}", "max")}
