"""How data problems are reported: one line per problem, `FILE:ROW:COLUMN: message`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset. `row` is the 1-based data row (None: no row applies)."""

    file: str
    row: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        row = "-" if self.row is None else str(self.row)
        return f"{self.file}:{row}:{self.column or '-'}: {self.message}"


def bad_number(raw: object) -> str:
    """The message for a cell that should hold a finite number but holds `raw`."""
    if raw is None or (isinstance(raw, float) and raw != raw):
        return "missing value"
    plain = raw.item() if hasattr(raw, "item") else raw  # numpy scalars print as np.float64(...)
    return f"not a finite number: {plain!r}"


class DataError(Exception):
    """Raised when input data is unusable; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
