"""Every model by its name (`ModelConfig.model`): `build_model` makes the one a config names.

Apart from nets.py because the baselines build on nets.Recommender: this module imports both,
and neither imports it.

Adding a model: its class (a Recommender: `score`, and `id_embeddings` if it has id tables that
training should decay), one line here, and its name and description in config.MODELS (names the
CLI lists without importing torch; tests/test_models.py holds the two lists equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from fusionrec.models.baselines import BiasedMF, ContentCNN, ContentDNN, ContentKNN, GenrePopularity
from fusionrec.models.config import FIXED_VARIANT, ModelConfig
from fusionrec.models.content import SideContent
from fusionrec.models.nets import FusionNeuMF, Recommender


def _neumf(users: SideContent, items: SideContent, config: ModelConfig) -> FusionNeuMF:
    """NeuMF is FusionNeuMF on ids alone, without id dropout (no content to fall back on)."""
    return FusionNeuMF(users, items, replace(config, variant=FIXED_VARIANT["neumf"], id_dropout=0.0))


BUILDERS: dict[str, Callable[[SideContent, SideContent, ModelConfig], Recommender]] = {
    "fusion": FusionNeuMF,
    "neumf": _neumf,
    "svd": BiasedMF,
    "dnn": ContentDNN,
    "cnn": ContentCNN,
    "genre-pop": GenrePopularity,
    "content-knn": ContentKNN,
}


def build_model(users: SideContent, items: SideContent, config: ModelConfig) -> Recommender:
    config.check()
    return BUILDERS[config.model](users, items, config)
