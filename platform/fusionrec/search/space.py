"""Search spaces: tune/*.yaml read into a checked `SearchSpace` (unknown keys and bad ranges fail
on load), whose first point is today's defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fusionrec.models.config import ModelConfig
from fusionrec.selection import IDENTITY
from fusionrec.training.config import TrainConfig

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
SPACE_KEYS = {"description", "fixed", "search"}
PER_RUN = {"dataset", "features"}  # given on the command line, never searched
# A space may fix these, never search them: what a run is compared on (selection.IDENTITY, so every
# trial of a search is selected on the same validation data), and how it is scored and run.
NOT_SEARCHED = (set(IDENTITY) - {"data", "features"}) | {"k", "workers", "max_failures"}


def _settings_keys() -> set[str]:
    """Every setting a space may fix or search: TrainConfig fields and model.<ModelConfig field>."""
    train = set(TrainConfig.__dataclass_fields__) - {"model"} - PER_RUN
    return train | {f"model.{k}" for k in ModelConfig.__dataclass_fields__}


def with_settings(settings: dict, dotted: dict) -> dict:
    """`settings` (TrainConfig.to_dict() shape) with `dotted` values ("lr", "model.mlp") put in."""
    out = {**settings, "model": dict(settings.get("model") or {})}
    for key, value in dotted.items():
        if key.startswith("model."):
            out["model"][key.removeprefix("model.")] = value
        else:
            out[key] = value
    return out


def _read_setting(settings: dict, dotted: str):
    """The value of one dotted setting ("lr", "model.mlp") in `settings` (TrainConfig.to_dict() shape)."""
    if dotted.startswith("model."):
        return settings["model"][dotted.removeprefix("model.")]
    return settings[dotted]


def _can_sample(kind: str, argument: list, value) -> bool:
    """Whether a `search:` distribution ({kind: argument}) holds `value`."""
    if kind == "choice":
        return value in argument
    low, high = argument
    return low <= value < high if kind == "randint" else low <= value <= high  # Tune's randint excludes high


def _flatten(fixed: dict) -> dict:
    """A `fixed:` block, whose `model` may be a nested mapping, as dotted keys."""
    model = fixed.get("model")
    flat = {k: v for k, v in fixed.items() if k != "model" or not isinstance(v, dict)}
    if isinstance(model, dict):
        flat |= {f"model.{k}": v for k, v in model.items()}
    return flat


@dataclass
class SearchSpace:
    """A search space from tune/*.yaml:

        description: ...
        fixed:  {objective: rating, model: {model: fusion, variant: full}}   # every trial
        search:                                                              # sampled per trial
          model.mlp: {choice: [[64, 32], [128, 64]]}
          lr: {loguniform: [0.001, 0.02]}
    """

    path: Path
    fixed: dict = field(default_factory=dict)  # dotted keys
    search: dict = field(default_factory=dict)  # dotted key -> {distribution: argument}
    description: str = ""

    @classmethod
    def load(cls, path: Path) -> SearchSpace:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such search space file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping with `fixed` and `search`")
        for key in raw:
            if key not in SPACE_KEYS:
                raise ValueError(f"{path}: unknown key {key!r} (expected {', '.join(sorted(SPACE_KEYS))})")
        space = cls(path, _flatten(raw.get("fixed") or {}), raw.get("search") or {}, raw.get("description", ""))
        space.check()
        return space

    def check(self) -> None:
        known = _settings_keys()
        for key in [*self.fixed, *self.search]:
            if key not in known:
                hint = " (given on the command line)" if key in PER_RUN else ""
                raise ValueError(f"{self.path}: unknown setting {key!r}{hint}")
        if not self.search:
            raise ValueError(f"{self.path}: `search` names no setting to search")
        for key in self.search:
            if key in NOT_SEARCHED:
                raise ValueError(f"{self.path}: {key!r} cannot be searched (every trial must be selected on the "
                                 "same validation data); fix it under `fixed` or pass it on the command line")
        for key, spec in self.search.items():
            values = self._check_distribution(key, spec)
            for value in values:  # every value a trial can get must make a valid configuration
                self._check_setting(key, value)
        for key, value in self.fixed.items():
            self._check_setting(key, value)
        self.defaults({"dataset": "-", **self.fixed_settings()})

    def defaults(self, base: dict) -> dict:
        """The search's first point: for each searched setting, what `fusionrec train` uses when no
        flag sets it, with `base` (the space's `fixed:` settings and the command line's) on top.
        A value outside the space fails in one line: Optuna cannot record a `choice` value its list
        lacks (the search would crash at its first trial), and a range that leaves out the default
        would make the first trial a point the search does not search."""
        resolved = TrainConfig.from_dict(base).to_dict()  # every default filled in (id_l2: the objective's)
        point = {key: _read_setting(resolved, key) for key in self.search}
        for key, value in point.items():
            kind, argument = next(iter(self.search[key].items()))
            if not _can_sample(kind, argument, value):
                raise ValueError(f"{self.path}: search.{key}: {{{kind}: {argument}}} must contain the default "
                                 f"{value!r} (the first trial of every search)")
        return point

    def _check_distribution(self, key: str, spec) -> list:
        """The values worth checking as settings: every choice, or both ends of a range."""
        where = f"{self.path}: search.{key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ValueError(f"{where}: expected one of {', '.join(f'{{{d}: ...}}' for d in DISTRIBUTIONS)}")
        kind, argument = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(argument, list) or not argument:
                raise ValueError(f"{where}: choice needs a non-empty list")
            return argument
        if (not isinstance(argument, list) or len(argument) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in argument)):
            raise ValueError(f"{where}: {kind} needs [low, high] numbers")
        low, high = argument
        if not low < high:
            raise ValueError(f"{where}: bad range [{low}, {high}]: low must be below high")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"{where}: bad range [{low}, {high}]: loguniform needs low > 0")
        if kind == "randint" and not all(isinstance(v, int) for v in argument):
            raise ValueError(f"{where}: randint needs integer bounds")
        return [low, high - 1 if kind == "randint" else high]

    def _check_setting(self, key: str, value) -> None:
        settings = with_settings({"dataset": "-", **self.fixed_settings()}, {key: value})
        try:
            TrainConfig.from_dict(settings)  # checked as it is made
        except (TypeError, ValueError) as error:
            raise ValueError(f"{self.path}: {key} = {value!r}: {error}") from None

    def fixed_settings(self) -> dict:
        return with_settings({}, self.fixed)

    def param_space(self) -> dict:
        """The `search` block as Ray Tune distributions, keyed by dotted setting names."""
        from ray import tune

        make = {"choice": tune.choice, "uniform": lambda a: tune.uniform(*a),
                "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
        return {key: make[kind](argument) for key, spec in self.search.items() for kind, argument in spec.items()}

    def models(self) -> set[str]:
        """The model types trials may train (the CNN needs raw pixels loaded)."""
        choice = self.search.get("model.model", {}).get("choice")
        return set(choice) if choice else {self.fixed.get("model.model", "fusion")}
