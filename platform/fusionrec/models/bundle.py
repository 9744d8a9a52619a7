"""A trained model on disk: everything serving needs in one folder.

    model.pt      the state dict (weights, and both sides' content matrices as buffers)
    bundle.json   model config, id maps, structured encoders, text/image encoders used for the
                  features, rating scale, split and objective
    seen.npy      [n, 2] int32 (user row, item row) pairs of the training and validation split:
                  what serving leaves out of a user's recommendations
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from fusionrec.models.config import ModelConfig
from fusionrec.models.content import SideContent, StructuredEncoder
from fusionrec.models.factory import build_model
from fusionrec.models.nets import Recommender


def save_bundle(folder: Path, model: Recommender, users: SideContent, items: SideContent, extra: dict,
                seen: np.ndarray | None = None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "model.pt")
    if seen is not None:
        np.save(folder / "seen.npy", np.asarray(seen, np.int32).reshape(-1, 2))
    meta = {
        "model_config": asdict(model.config),
        **{name: {"ids": side.ids.tolist(), "structured": side.encoder.to_dict(), "text_set": side.text_set,
                  "dims": {k: v.shape[1] for k, v in side.arrays().items()}}
           for name, side in (("users", users), ("items", items))},
        **extra,
    }
    (folder / "bundle.json").write_text(json.dumps(meta))


def _empty_side(meta: dict) -> SideContent:
    n = len(meta["ids"])
    arrays = {k: np.zeros((n + 1, d), np.float32) for k, d in meta["dims"].items()}
    return SideContent(ids=np.array(meta["ids"], dtype=object), encoder=StructuredEncoder.from_dict(meta["structured"]),
                       text_set=meta.get("text_set", 1), **arrays)


def _read_meta(folder: Path) -> dict:
    path = folder / "bundle.json"
    if not path.is_file():
        raise ValueError(f"{folder}: not a model bundle (no bundle.json)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    missing = [key for key in ("model_config", "users", "items") if key not in meta]
    if missing:
        raise ValueError(f"{path}: no {missing[0]!r}; train and register the model again")
    return meta


def _model_config(folder: Path, raw: dict) -> ModelConfig:
    """The bundle's ModelConfig; a key or value this version does not know fails naming the bundle."""
    unknown = sorted(set(raw) - {f.name for f in fields(ModelConfig)})
    if unknown:
        raise ValueError(f"{folder}: bundle.json's model_config has a key this version does not know, "
                         f"{unknown[0]!r}; train and register the model again")
    config = ModelConfig(**raw)
    try:
        config.check()
    except ValueError as error:
        raise ValueError(f"{folder}: bundle.json's model_config: {error}") from None
    return config


def load_bundle(folder: Path) -> tuple[Recommender, dict]:
    """The model (eval mode, content restored from its buffers) and the bundle's metadata."""
    folder = Path(folder)
    meta = _read_meta(folder)
    config = _model_config(folder, meta["model_config"])
    model = build_model(_empty_side(meta["users"]), _empty_side(meta["items"]), config)
    try:
        model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    except RuntimeError as error:  # saved by an older model definition: missing/unexpected keys
        reason = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise ValueError(f"{folder}: the weights do not fit this version's {model.config.model} model ({reason}); "
                         "train and register it again") from None
    return model.eval(), meta


def load_seen(folder: Path, n_users: int) -> list[np.ndarray]:
    """Per user row, the item rows it rated in training (empty for all if the bundle has none)."""
    path = Path(folder) / "seen.npy"
    pairs = np.load(path) if path.is_file() else np.zeros((0, 2), np.int32)
    pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
    bounds = np.searchsorted(pairs[:, 0], np.arange(n_users + 1))
    return [pairs[bounds[u]:bounds[u + 1], 1] for u in range(n_users)]
