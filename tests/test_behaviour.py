"""Behavioural tests (Made-With-ML's tests/model style) on a synthetic shop whose truth is known:
text carries the largest share of the signal, so a trained FusionNeuMF must read it. Real MiniLM
embeddings of the shop's texts; no images (the image path has its own tests)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fusionrec.data.schema import load_spec
from fusionrec.data.synth import SynthConfig, generate
from fusionrec.models.config import ModelConfig
from fusionrec.training.command import score_test
from fusionrec.training.config import TrainConfig
from fusionrec.training.data import prepare
from fusionrec.training.ray_train import fit

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A 300 x 150 shop at 20 % density, its texts encoded by the real MiniLM."""
    from fusionrec.encoders.base import TextEncoder
    from fusionrec.encoders.pipeline import _write
    from fusionrec.encoders.prepare import minilm_path

    root = tmp_path_factory.mktemp("behaviour")
    generate(SynthConfig(users=300, items=150, density=0.2, seed=11, images=False), root / "shop", workers=1)
    encoder = TextEncoder(str(minilm_path()))
    spec = load_spec(root / "shop")
    for side, table_spec in (("users", spec.users), ("items", spec.items)):
        table = pd.read_parquet(root / "shop" / f"{side}.parquet")
        id_column, text_column = table_spec.id, table_spec.text
        embeddings = encoder.encode(table[text_column].tolist())
        frame = pd.DataFrame({"id": table[id_column], "content_hash": "x", "mask": 1, "embedding": list(embeddings)})
        _write(root / "features" / f"{side}.text.parquet", frame, embeddings.shape[1],
               {"encoder": encoder.name, "model": str(minilm_path()), "kind": "text", "dim": embeddings.shape[1],
                "pooling": "cls"})
    return {"root": root / "shop", "features": root / "features", "encoder": encoder}


def trained(shop, tmp_path, variant: str = "full", model: str = "fusion"):
    cfg = TrainConfig(dataset=str(shop["root"]), features=str(shop["features"]), epochs=10,
                      model=ModelConfig(model=model, variant=variant))
    prepared = prepare(cfg)
    net, _ = fit(cfg, prepared, tmp_path / f"{model}-{variant}")
    return net, cfg, prepared


def test_the_planted_order_fusion_beats_the_mean_needs_its_text_and_beats_ids_alone(shop, tmp_path):
    """The ablation's rows on a shop whose truth is known: full < no text (text carries the largest
    share of the signal), and full < NeuMF (ids alone read no content at all)."""
    full, cfg, prepared = trained(shop, tmp_path)
    no_text, no_text_cfg, _ = trained(shop, tmp_path, "no_text")
    neumf, neumf_cfg, _ = trained(shop, tmp_path, model="neumf")
    test = prepared.part("test")
    mean_mse = float(((test["rating"] - prepared.part("train")["rating"].mean()) ** 2).mean())
    full_mse = score_test(full, cfg, prepared)["mse"]
    no_text_mse = score_test(no_text, no_text_cfg, prepared)["mse"]
    neumf_mse = score_test(neumf, neumf_cfg, prepared)["mse"]
    assert full_mse < 0.9 * mean_mse  # it learned something beyond the average star
    assert full_mse < no_text_mse - 0.02, (full_mse, no_text_mse, neumf_mse)
    assert full_mse < neumf_mse - 0.05, (full_mse, no_text_mse, neumf_mse)


def test_a_new_user_who_writes_about_silk_ranks_silk_items_first(shop, tmp_path):
    model, _, prepared = trained(shop, tmp_path)
    text = shop["encoder"].encode(["Hi! Silk is my absolute favourite fabric, I only wear pure silk."])
    row = prepared.users.text.shape[1]
    assert text.shape[1] == row
    scores = model.score_all_for(model.users.row(text=text[0])).numpy()
    spec = load_spec(shop["root"]).items
    descriptions = pd.read_parquet(shop["root"] / "items.parquet").set_index(spec.id)[spec.text]
    silk = np.array(["silk" in descriptions[i].lower() for i in prepared.items.ids])
    assert 0 < silk.sum() < len(silk)
    # silk items score higher on average, and fill the top of the new user's list
    assert scores[silk].mean() > scores[~silk].mean()
    top = np.argsort(-scores)[:10]
    assert silk[top].mean() > 2 * silk.mean()
