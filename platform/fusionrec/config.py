"""Where fusionrec keeps its state and finds the packages that carry its data. Ground floor:
no project imports."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def state_folder() -> Path:
    """`$FUSIONREC_HOME`, else `./.fusionrec/`: MLflow store, model cache, demo data."""
    return Path(os.environ.get("FUSIONREC_HOME") or ".fusionrec").resolve()


def installed_package_folder(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (None if absent)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
