"""What "better" means: one validation metric per objective, and the comparison every choice uses.

Epochs (train.py), trials (tune.py) and champions (registry.py) are all picked with
`Selection.better`, on validation data only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

VALIDATION_K = 10  # implicit feedback is selected on nDCG at this cut-off


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


SELECTION = {"rating": Selection("val_mse", "min"), "implicit": Selection(f"val_ndcg_at_{VALIDATION_K}", "max")}
