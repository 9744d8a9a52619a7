"""The synthetic shop: reproducible to the byte, its truth recorded, its signal really there."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from fusionrec.cli import app
from fusionrec.data.shop_vocab import FABRICS
from fusionrec.data.synth import NOISE_SD, SynthConfig, _bayes_floor, generate
from fusionrec.data.validate import load_dataset

runner = CliRunner()


def digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_arguments_give_byte_identical_files(tmp_path, tiny_shop):
    again = tmp_path / "again"
    generate(SynthConfig(users=60, items=40, density=0.2, seed=7, image_size=32), again, workers=2)
    assert digest(again) == digest(tiny_shop)
    other = tmp_path / "other"
    generate(SynthConfig(users=60, items=40, density=0.2, seed=8, image_size=32, images=False), other)
    assert digest(other)["ratings.parquet"] != digest(tiny_shop)["ratings.parquet"]


def test_truth_is_recorded(tiny_shop):
    truth = yaml.safe_load((tiny_shop / "dataset.yaml").read_text())["truth"]
    shares = truth["shares"]
    assert max(shares, key=shares.get) == "text" and sum(shares.values()) == pytest.approx(1.0)
    assert set(shares) == {"text", "image", "structured", "bias"}
    # Rounding to stars adds to the Gaussian noise; clipping at 1 and 5 takes a little away.
    assert 0.2 < truth["bayes_mse"] < NOISE_SD**2 + 1 / 12 + 0.02
    stars = pd.read_parquet(tiny_shop / "ratings.parquet")["rating"]
    assert truth["bayes_mse"] < 0.8 * stars.var()  # the latent signal explains a real part of the stars
    assert truth["generator"]["seed"] == 7


def test_bayes_floor_matches_simulation():
    rng = np.random.default_rng(0)
    latent = rng.normal(3.6, 1.0, 2000)
    floor, best = _bayes_floor(latent)
    draws = np.clip(np.round(latent[:, None] + rng.normal(0, NOISE_SD, (2000, 400))), 1, 5)
    assert floor == pytest.approx(float(((draws - best[:, None]) ** 2).mean()), rel=0.02)
    assert np.abs(best - draws.mean(axis=1)).mean() < 0.04  # per-row standard error is about 0.03


def test_ratings_follow_the_text(tmp_path):
    """Users rate items higher when the item's fabric is the one their self-introduction names."""
    generate(SynthConfig(users=400, items=200, density=0.1, seed=1, images=False), tmp_path / "shop")
    data = load_dataset(tmp_path / "shop")

    def fabric(text: str) -> str | None:
        found = [f for f in FABRICS if f in text.lower()]
        return found[0] if len(found) == 1 else None
    users = data.users.set_index("user_id")["self_intro"].map(fabric)
    items = data.items.set_index("item_id")["description"].map(fabric)
    ratings = data.ratings.assign(u=lambda r: r.user_id.map(users), i=lambda r: r.item_id.map(items)).dropna()
    match = ratings[ratings.u == ratings.i].rating.mean()
    other = ratings[ratings.u != ratings.i].rating.mean()
    assert match > other + 0.3, (match, other)


def test_texts_are_varied(tiny_shop):
    items = pd.read_parquet(tiny_shop / "items.parquet")
    assert items["description"].nunique() == len(items)
    openings = items["description"].str.split().str[:3].str.join(" ")
    assert openings.nunique() >= 6


def test_no_images_flag_leaves_image_columns_empty_and_valid(tmp_path):
    out = tmp_path / "shop"
    generate(SynthConfig(users=20, items=10, density=0.5, seed=0, images=False), out)
    data = load_dataset(out)
    assert data.image_count() == 0 and not (out / "images").exists()


def test_cli_refuses_to_overwrite_and_bad_arguments(tmp_path):
    out = tmp_path / "shop"
    args = ["data", "synth", str(out), "--users", "10", "--items", "10", "--density", "0.2", "--no-images"]
    assert runner.invoke(app, args).exit_code == 0
    before = digest(out)
    result = runner.invoke(app, [*args, "--seed", "3"])
    assert result.exit_code == 1 and "already exists" in result.stderr and "Traceback" not in result.output
    assert digest(out) == before
    assert runner.invoke(app, [*args, "--seed", "3", "--overwrite"]).exit_code == 0
    assert digest(out) != before
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "x"), "--density", "0"])
    assert result.exit_code == 1 and result.stderr.strip() == "error: --density must be in (0, 1], got 0.0"
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["shop"]  # no temporary folders left behind
