"""MovieLens-100K converted from the recbole package's copy into the dataset contract."""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from fusionrec.cli import app
from fusionrec.data.validate import load_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def movielens(tmp_path_factory):
    out = tmp_path_factory.mktemp("ml") / "ml-100k"
    result = runner.invoke(app, ["data", "movielens-100k", str(out)])
    assert result.exit_code == 0, result.output
    return load_dataset(out)


def test_counts_and_contract(movielens):
    assert (len(movielens.users), len(movielens.items), len(movielens.ratings)) == (943, 1682, 100_000)
    assert movielens.ratings["rating"].between(1, 5).all()
    assert movielens.spec.users.categorical == ("gender", "occupation")


def test_item_text_has_title_year_and_genres(movielens):
    toy_story = movielens.items.set_index("item_id").loc["1"]
    assert toy_story["text"] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert toy_story["year"] == 1995 and toy_story["genre_comedy"] == 1.0 and toy_story["genre_drama"] == 0.0


def test_clear_error_when_recbole_is_absent(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "recbole" else real(name, *a))
    result = runner.invoke(app, ["data", "movielens-100k", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.stderr.strip() == "recbole:-:-: package not installed: pip install --no-deps recbole==1.2.1"
    assert not (tmp_path / "out").exists()
