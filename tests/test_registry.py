"""The promotion rule: `champion` moves only over a champion trained on the same data, features,
split and objective, and only on a better selection metric; otherwise the reason is said."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

IDENTITY = {"data": "d1", "features": "f1", "split": "random", "seed": 0, "objective": "rating"}


@pytest.fixture
def store(tmp_path, monkeypatch, served_bundles):
    from fusionrec import registry

    monkeypatch.setenv("FUSIONREC_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    registry.setup()

    def register(value: float | None, metric: str = "val_mse", mode: str = "min", **identity):
        import mlflow

        with mlflow.start_run() as run:
            mlflow.set_tags(registry.identity_tags({**IDENTITY, **identity}, metric, mode))
            if value is not None:
                mlflow.log_metric(metric, value)
            uri = registry.log_bundle(served_bundles["svd"])
        return registry.register(uri, run.info.run_id)

    return register


def champion() -> str:
    from mlflow import MlflowClient

    return str(MlflowClient().get_model_version_by_alias("fusionrec", "champion").version)


def test_better_on_the_same_data_split_and_objective_takes_the_alias(store):
    assert store(0.9).promoted and champion() == "1"
    worse = store(0.95)
    assert not worse.promoted and "does not beat version 1's 0.9000" in worse.reason
    better = store(0.8)
    assert better.promoted and champion() == "3" and "beats version 1's 0.9000" in better.reason


@pytest.mark.parametrize(("change", "label"), [
    ({"data": "d2"}, "another dataset"),
    ({"features": "f2"}, "another set of feature tables"),
    ({"split": "stratified"}, "another split"),
    ({"seed": 1}, "another split seed"),
])
def test_a_better_metric_on_other_data_does_not_move_the_alias(store, change, label):
    store(0.9)
    other = store(0.1, **change)
    assert not other.promoted and champion() == "1"
    assert label in other.reason and "fusionrec promote" in other.line()


def test_an_implicit_model_never_replaces_a_rating_champion(store):
    store(0.9)
    implicit = store(0.45, metric="val_ndcg_at_10", mode="max", objective="implicit")
    assert not implicit.promoted and "another objective" in implicit.reason and champion() == "1"


def test_ndcg_is_maximised(store):
    implicit = {"metric": "val_ndcg_at_10", "mode": "max", "objective": "implicit"}
    store(0.30, **implicit)
    assert store(0.35, **implicit).promoted and champion() == "2"
    assert not store(0.32, **implicit).promoted


def test_a_run_without_a_selection_metric_is_not_promoted(store):
    result = store(None)
    assert not result.promoted and "no selection metric" in result.reason


def run_data(value: float | None, metric: str = "val_mse", mode: str = "min", **identity):
    """A run's MLflow data (tags, metrics) as `registry.decide` reads it, without a store."""
    from fusionrec import registry

    tags = registry.identity_tags(IDENTITY | identity, metric, mode)
    return SimpleNamespace(tags=tags, metrics={} if value is None else {metric: value})


UNTAGGED = SimpleNamespace(tags={}, metrics={"val_mse": 0.1})  # a run logged without fusionrec's tags
SELECTED_ONLY = {"fusionrec.selection_metric": "val_mse", "fusionrec.selection_mode": "min"}  # and no identity
NDCG = {"metric": "val_ndcg_at_10", "mode": "max"}


@pytest.mark.parametrize("new, champion, promoted, reason", [
    (run_data(0.9), None, True, "no champion yet; val_mse 0.9000"),
    (run_data(0.8), run_data(0.9), True, "val_mse 0.8000 beats version 1's 0.9000"),
    (run_data(0.9), run_data(0.9), False, "val_mse 0.9000 does not beat version 1's 0.9000"),
    (run_data(0.95), run_data(0.9), False, "val_mse 0.9500 does not beat version 1's 0.9000"),
    (run_data(0.5, **NDCG), run_data(0.4, **NDCG), True, "val_ndcg_at_10 0.5000 beats version 1's 0.4000"),
    (run_data(0.3, **NDCG), run_data(0.4, **NDCG), False, "0.3000 does not beat version 1's 0.4000"),
    (run_data(0.4, **NDCG), run_data(0.4, **NDCG), False, "0.4000 does not beat version 1's 0.4000"),
    (run_data(float("nan")), run_data(0.9), False, "this run recorded no selection metric"),
    (run_data(None), run_data(0.9), False, "this run recorded no selection metric"),
    (run_data(None), None, False, "this run recorded no selection metric"),  # not even as the first version
    (UNTAGGED, run_data(0.9), False, "this run recorded no selection metric"),  # it names no metric to compare
    (run_data(0.9), run_data(None), True, "val_mse 0.9000; version 1 recorded none"),  # `promote` allows that
    (run_data(0.9), run_data(float("nan")), True, "val_mse 0.9000; version 1 recorded none"),
    (run_data(0.1), UNTAGGED, False, "trained on another dataset (unrecorded vs d1)"),
    # two runs that record no identity are not alike: nothing says what either was trained on
    (SimpleNamespace(tags=SELECTED_ONLY, metrics={"val_mse": 0.1}), SimpleNamespace(tags=SELECTED_ONLY, metrics={}),
     False, "another dataset (unrecorded vs unrecorded)"),
    (run_data(0.1, "val_rmse"), run_data(0.9), False, "version 1 was selected on another metric"),
])
def test_the_rule_alone(new, champion, promoted, reason):
    from fusionrec.registry import decide

    decision = decide(new, None if champion is None else ("1", champion))
    assert decision[0] is promoted and reason in decision[1]


# one change per IDENTITY key: (the key, the champion's value, the new run's, what the reason calls it)
OTHER = [("data", "d1", "d2", "another dataset"), ("features", "f1", "f2", "another set of feature tables"),
         ("split", "random", "cold-start", "another split"), ("seed", 0, 1, "another split seed"),
         ("objective", "rating", "implicit", "another objective")]


@pytest.mark.parametrize("key, theirs, mine, label", OTHER, ids=[key for key, *_ in OTHER])
def test_the_rule_alone_compares_only_like_with_like(key, theirs, mine, label):
    from fusionrec.registry import decide

    promoted, reason = decide(run_data(0.1, **{key: mine}), ("1", run_data(0.9)))
    assert not promoted and f"version 1 was trained on {label} ({theirs} vs {mine})" in reason


def test_every_identity_key_has_a_like_with_like_case():
    from fusionrec.registry import IDENTITY as KEYS

    assert [key for key, *_ in OTHER] == list(KEYS)


def test_a_local_bundle_folder_is_used_where_it_is(tmp_path, monkeypatch):
    """No download and no temporary folder for a bundle that is already on disk."""
    import tempfile

    from fusionrec.registry import local_bundle

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with local_bundle(str(bundle)) as folder:
        assert folder == bundle
        assert not list((tmp_path / "tmp").iterdir())
    assert bundle.is_dir()
