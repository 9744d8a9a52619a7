"""Cold items: ranking only the held-out items, the genre-pop and content-knn baselines (by hand),
and the cold-items split end to end on the tiny shop through Ray Train, MLflow and the evaluator."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import leaves_no_temp_folders
from fusionrec.cli import app
from fusionrec.data.schema import TableSpec
from fusionrec.evaluate import full_ranking, top_k_among
from fusionrec.models.bundle import load_bundle, save_bundle
from fusionrec.models.config import ModelConfig
from fusionrec.models.content import build_side
from fusionrec.models.factory import build_model
from fusionrec.training.config import TrainConfig
from test_models import FixedScores  # the stand-in model of test_models.py (pytest puts tests/ on the path)

runner = CliRunner()


def test_full_ranking_among_held_out_items_by_hand():
    # user 0 rated item 0 in training; the held-out items are 1, 3, 4, 5; the user's test items 1 and 4.
    model = FixedScores([[9.0, 2.0, 3.0, 4.0, 1.0, 8.0]])
    train = pd.DataFrame({"user_idx": [0], "item_idx": [0]})
    test = pd.DataFrame({"user_idx": [0, 0], "item_idx": [1, 4]})
    held_out = np.array([1, 3, 4, 5])
    # among the held-out items the order is 5 (8), 3 (4), 1 (2), 4 (1); item 2 (3) is not a candidate
    assert top_k_among(model.table[0].numpy(), held_out, [0], 3).tolist() == [5, 3, 1]
    out = full_ranking(model, train, test, k=3, candidates=held_out)  # one hit, at position 3
    idcg = 1 + 1 / np.log2(3)
    assert out["ndcg@3"] == pytest.approx((1 / np.log2(4)) / idcg)
    assert (out["hr@3"], out["recall@3"], out["precision@3"]) == (1.0, 0.5, pytest.approx(1 / 3))
    # over the whole catalogue the top 3 would be 5, 3, 2: no hit
    assert full_ranking(model, train, test, k=3)["hr@3"] == 0.0
    # K above the number of candidates: all four ranked, both hits (positions 3 and 4), P divides by K
    wide = full_ranking(model, train, test, k=5, candidates=held_out)
    assert wide["ndcg@5"] == pytest.approx((1 / np.log2(4) + 1 / np.log2(5)) / idcg)
    assert wide["recall@5"] == 1.0 and wide["precision@5"] == pytest.approx(2 / 5)
    # a candidate the user already rated is left out
    assert top_k_among(model.table[0].numpy(), np.array([0, 1, 5]), [0], 3).tolist() == [5, 1]


def _sides(text=None):
    """Two users; five items with a categorical colour, two 0/1 genre flags and a non-flag year."""
    users = pd.DataFrame({"user_id": ["u0", "u1"]})
    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(5)], "colour": ["red", "red", "blue", "red", "blue"],
                          "comedy": [1.0, 0.0, 1.0, 1.0, 0.0], "drama": [0.0, 1.0, 1.0, 0.0, 1.0],
                          "year": [1990.0, 1991.0, 1995.0, 1990.0, 1999.0]})
    u = build_side(users, TableSpec("user_id"), "users", None)
    i = build_side(items, TableSpec("item_id", categorical=("colour",), numeric=("comedy", "drama", "year")),
                   "items", None)
    if text is not None:
        i.text = np.vstack([np.asarray(text, np.float32), np.zeros((1, 2), np.float32)])
    return u, i


def test_genre_pop_scores_a_cold_item_by_its_attributes_popularity():
    users, items = _sides()
    model = build_model(users, items, ModelConfig(model="genre-pop"))
    # training: item 0 rated 3 times, item 1 once, item 2 twice; items 3 and 4 are cold
    train_users, train_items = np.array([0, 1, 0, 0, 1, 1]), np.array([0, 0, 0, 1, 2, 2])
    model.mark_seen(train_users, train_items)
    model.fit_ratings(train_users, train_items)
    # pop(red) = mean(3, 1) = 2, pop(blue) = 2 (item 2), pop(comedy) = mean(3, 2) = 2.5,
    # pop(drama) = mean(1, 2) = 1.5; year is no flag. Item 3 (red, comedy): (2 + 2.5) / 2;
    # item 4 (blue, drama): (2 + 1.5) / 2. Warm items score their own popularity.
    scores = model.eval().score_all(0)
    assert scores.tolist() == pytest.approx([3.0, 1.0, 2.0, 2.25, 1.75])
    assert torch.equal(model.score_all(1), scores)  # not personalised
    # two colour one-hots and the two genre flags are attributes; the year column is none
    assert not torch.isnan(model.on_value[:4]).any() and torch.isnan(model.on_value[4])
    # an item with no attribute any training item has scores the mean training popularity, (3+1+2)/3
    assert float(model(torch.tensor([0]), torch.tensor([5]))) == pytest.approx(2.0)


def test_content_knn_averages_the_top_k_cosines_by_hand():
    # 2-d text embeddings: item 0 = (1, 0), item 1 = (0, 1), item 2 = (1, 1), item 3 = (1, 0.5), item 4 = (-1, 0)
    users, items = _sides(text=[[1, 0], [0, 1], [1, 1], [1, 0.5], [-1, 0]])
    train_users, train_items = np.array([0, 0, 1]), np.array([0, 1, 2])  # user 0: items 0, 1; user 1: item 2
    cos3 = np.array([1, 0.5]) / np.linalg.norm([1, 0.5])  # item 3's unit vector
    for neighbours, expected in ((1, cos3[0]), (2, cos3.mean()), (0, cos3.mean())):
        model = build_model(users, items, ModelConfig(model="content-knn", neighbours=neighbours))
        model.mark_seen(train_users, train_items)
        model.fit_ratings(train_users, train_items)
        model.eval()
        assert float(model(torch.tensor([0]), torch.tensor([3]))) == pytest.approx(expected)
    assert float(model(torch.tensor([0]), torch.tensor([4]))) == pytest.approx(-0.5)  # mean(cos 180°, cos 90°)
    assert float(model(torch.tensor([1]), torch.tensor([3]))) == pytest.approx(cos3.sum() / np.sqrt(2))
    assert model.score_all(1).tolist() == pytest.approx(model(torch.full((5,), 1), torch.arange(5)).tolist())
    assert float(model(torch.tensor([2]), torch.tensor([3]))) == 0.0  # a user with no training ratings
    with pytest.raises(ValueError, match="content-knn needs item text embeddings"):
        build_model(*_sides(), ModelConfig(model="content-knn"))


@pytest.mark.parametrize("name", ["genre-pop", "content-knn"])
def test_baselines_round_trip_through_a_bundle(name, tmp_path):
    users, items = _sides(text=[[1, 0], [0, 1], [1, 1], [1, 0.5], [-1, 0]])
    model = build_model(users, items, ModelConfig(model=name))
    train_users, train_items = np.array([0, 1, 0, 1]), np.array([0, 0, 1, 2])
    model.mark_seen(train_users, train_items)
    model.fit_ratings(train_users, train_items)
    save_bundle(tmp_path / "b", model.eval(), users, items, {"objective": "implicit"})
    loaded, _ = load_bundle(tmp_path / "b")
    for user in (0, 1):
        assert torch.equal(loaded.score_all(user), model.score_all(user))
    assert not list(loaded.parameters())


def test_baselines_are_listed_and_train_under_the_implicit_objective_only():
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0 and "genre-pop" in result.stdout and "content-knn" in result.stdout
    with pytest.raises(ValueError, match="genre-pop ranks items and predicts no ratings"):
        TrainConfig(dataset="d", model=ModelConfig(model="genre-pop")).check()
    TrainConfig(dataset="d", objective="implicit", split="cold-items", model=ModelConfig(model="content-knn")).check()


def test_negatives_are_drawn_from_training_items_only():
    from fusionrec.training.data import LoopData
    from fusionrec.training.engine import negative_pool

    cpu = torch.device("cpu")
    users, items = _sides()
    train = pd.DataFrame({"user_idx": [0, 1, 1], "item_idx": [0, 2, 2], "rating": [1.0, 1.0, 1.0]})
    data = LoopData(users, items, train, train.iloc[:0])
    assert negative_pool(data, cpu).tolist() == [0, 2]  # items 1, 3 and 4 are held out: never negatives
    everything = pd.DataFrame({"user_idx": [0] * 5, "item_idx": range(5), "rating": 1.0})
    assert negative_pool(LoopData(users, items, everything, train.iloc[:0]), cpu) == 5  # all items: as before


# --- end to end on the tiny shop (Ray Train, MLflow, evaluate) ---------------------------------------

integration = [pytest.mark.usefixtures("local_ray"), pytest.mark.integration]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONREC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def _restricted(model, prepared, part: str, k: int) -> dict:
    """The full ranking of a part by hand: only that part's held-out items are candidates."""
    ranked = prepared.part(part)
    seen = prepared.part("fitted") if part == "test" else prepared.part("train")
    return full_ranking(model, seen, ranked, k, candidates=np.unique(ranked["item_idx"]))


@pytest.mark.usefixtures("local_ray")
@pytest.mark.integration
def test_cold_items_fusion_trains_selects_on_validation_items_and_evaluates_on_test_items(
        home, tiny_shop, random_features):
    from mlflow import MlflowClient

    from fusionrec.evaluate import evaluate_bundle
    from fusionrec.registry import local_bundle
    from fusionrec.training.command import train
    from fusionrec.training.data import loop_data, prepare

    config = TrainConfig(dataset=str(tiny_shop), features=str(random_features), epochs=2, batch_size=64,
                         split="cold-items", objective="implicit")
    prepared = prepare(config)
    data = loop_data(prepared.users, prepared.items, prepared.ratings, prepared.split)
    held_out = set(prepared.part("validation")["item_idx"])
    assert set(data.validation_candidates) == held_out and not held_out & set(prepared.part("test")["item_idx"])
    result = train(config)
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["fusionrec.split"] == "cold-items" and result.selection[0] == "val_ndcg_at_10"

    with local_bundle(result.model_uri) as folder:
        model, meta = load_bundle(folder)
        out = evaluate_bundle(tiny_shop, folder, "full", 10)
    # the recorded selection metric is the validation ranking over the validation items only
    assert result.selection[1] == pytest.approx(_restricted(model, prepared, "validation", 10)["ndcg@10"])
    assert out == pytest.approx(_restricted(model, prepared, "test", 10))
    assert out["users"] == prepared.part("test")["user_idx"].nunique()


@pytest.mark.usefixtures("local_ray")
@pytest.mark.integration
def test_cold_item_baselines_train_log_and_evaluate_through_the_same_path(home, tiny_shop, random_features):
    from mlflow import MlflowClient

    from fusionrec.evaluate import evaluate_bundle
    from fusionrec.registry import local_bundle
    from fusionrec.training.command import train
    from fusionrec.training.data import prepare

    result = runner.invoke(app, ["train", str(tiny_shop), "--features", str(random_features), "--model", "genre-pop",
                                 "--split", "cold-items", "--objective", "implicit", "--register"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout.strip().splitlines()[-1])) >= {"ndcg@5", "precision@5"}
    with leaves_no_temp_folders("fusionrec-model-"):  # the model's download is gone
        result = runner.invoke(app, ["evaluate", str(tiny_shop), "--protocol", "full", "--k", "10"])
        assert result.exit_code == 0, result.output
    genre = json.loads(result.stdout.strip().splitlines()[-1])
    assert genre["protocol"] == "full" and 0 <= genre["ndcg@10"] <= 1

    config = TrainConfig(dataset=str(tiny_shop), features=str(random_features), split="cold-items",
                         objective="implicit", model=ModelConfig(model="content-knn"))
    knn = train(config)
    run = MlflowClient().get_run(knn.run_id)
    assert run.data.params["model.model"] == "content-knn" and "test_ndcg_at_5" in run.data.metrics
    assert run.data.metrics["val_ndcg_at_10"] == pytest.approx(knn.selection[1])
    with local_bundle(knn.model_uri) as folder:
        model, _ = load_bundle(folder)
        out = evaluate_bundle(tiny_shop, folder, "full", 10)
    assert not list(model.parameters())
    prepared = prepare(config)
    assert out == pytest.approx(_restricted(model, prepared, "test", 10))
