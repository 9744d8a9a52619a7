"""The settings of a training run (`TrainConfig`), as flags, a YAML file (best.yaml) or a Tune
trial give them: plain data, no torch and no Ray, so the CLI reads it without loading either.
The same object travels to Ray Train's workers and Tune's trials (dataclasses pickle).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from fusionrec.models.config import NO_GRADIENT, ModelConfig
from fusionrec.selection import SELECTION, Selection

OBJECTIVES = ("rating", "implicit")
# Default weight decay on the id embeddings, per objective. The rating objective's was tuned on the
# synthetic shop; on implicit feedback (BCE with sampled negatives) that much decay keeps the
# embeddings near zero and NeuMF ranks little better than popularity (MovieLens-100K, stratified
# split: nDCG@10 0.24 at 3e-2 against 0.40 at 1e-4; see the README).
ID_L2 = {"rating": 3e-2, "implicit": 1e-4}
# What is validated and kept is an exponential moving average of the weights (WeightAverage), not
# the last step's: on the 10 % shop it lowered validation MSE on every start tried (docs/quality.md).
EMA_DECAY = 0.998
# Default strength of the prior on the codebooks' logit weights (FusionNeuMF's `code_logits`), per
# objective, in training ratings: the weight decay is code_prior / the training ratings, as a fixed
# prior weighs against a mean loss. Adam scales each weight's step by the size of its own gradient, so
# even a small decay acts on the weights whose data gradient is small: the codes come to read only the
# directions of the embedding that predict ratings. 35 is a decay of 1e-3 on the 10 % shop (35,000
# training ratings), where it lowered validation MSE warm and cold-start; a fixed 1e-3 was too weak to
# stop a 300 x 200 shop's codes memorising it (0.013 there). On MovieLens (implicit) a decay was level
# on warm items and worse on cold ones (validation: docs/quality.md, 2026-12-06 and 12-07).
CODE_PRIOR = {"rating": 35.0, "implicit": 0.0}


@dataclass
class TrainConfig:
    """Checked when made (`check`): a TrainConfig that exists is a valid one."""

    dataset: str
    features: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 30
    batch_size: int = 256
    lr: float = 5e-3
    id_l2: float | None = None  # weight decay on id embeddings only (they overfit first); None = ID_L2[objective]
    code_prior: float | None = None  # the codebooks' logit decay x training ratings; None = CODE_PRIOR[objective]
    objective: str = "rating"
    negatives: int = 4
    workers: int = 1
    split: str = "random"
    seed: int = 0  # draws the split, and (without train_seed) the training's randomness
    train_seed: int | None = None  # the initialisation, batch order and sampled negatives; None = seed
    k: int = 5
    max_failures: int = 2
    ema_decay: float = EMA_DECAY  # of the weight average that is validated and kept (0: the weights as trained)

    def __post_init__(self) -> None:
        for name, defaults in (("id_l2", ID_L2), ("code_prior", CODE_PRIOR)):  # None: the objective's default
            if getattr(self, name) is None:
                setattr(self, name, defaults.get(self.objective, defaults["rating"]))
        self.check()

    def check(self) -> None:
        from fusionrec.data.splits import SPLITS  # (numpy and pandas: not on the CLI's start-up path)

        self.model.check()
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}: choose one of {', '.join(SPLITS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.epochs < 1 or self.batch_size < 1 or self.workers < 1 or self.lr <= 0:
            raise ValueError("--epochs, --batch-size and --workers must be at least 1 and --lr positive")
        for name in ("id_l2", "code_prior"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.model.model in NO_GRADIENT and self.objective != "implicit":
            raise ValueError(f"{self.model.model} ranks items and predicts no ratings: train it with "
                             "--objective implicit")

    @property
    def training_seed(self) -> int:
        """Seeds the initialisation, the batch order and the training negatives. Apart from `seed`,
        one split can be trained several times: two runs of one model on one split differ by more
        than two models often do (docs/quality.md, MovieLens-100K)."""
        return self.seed if self.train_seed is None else self.train_seed

    def code_l2(self, train_ratings: int) -> float:
        """The weight decay on the codebooks' logit weights for a training part of `train_ratings` ratings."""
        return self.code_prior / max(train_ratings, 1)

    @property
    def selection(self) -> Selection:
        return SELECTION[self.objective]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> TrainConfig:
        """From a dict shaped like `to_dict()` (as `fusionrec tune` writes best.yaml); unknown keys fail."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a mapping of training settings")
        model = raw.get("model") or {}
        if not isinstance(model, dict):
            raise ValueError(f"{source}: model: expected a mapping of model settings")
        _check_keys(raw, TrainConfig, source)
        _check_keys(model, ModelConfig, f"{source}: model")
        return cls(**{**raw, "model": ModelConfig(**model)})


def _check_keys(raw: dict, kind: type, source: str) -> None:
    known = set(kind.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{source}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")


def load_config(path: Path) -> TrainConfig:
    """A TrainConfig from YAML (what `fusionrec tune` writes as best.yaml)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    try:
        return TrainConfig.from_dict(raw, str(path))
    except TypeError as error:  # a missing `dataset`
        raise ValueError(f"{path}: {error}") from None
