"""`fusionrec data validate`: every kind of problem is found, reported as FILE:ROW:COLUMN, all at once."""

from __future__ import annotations

import os
import struct
import zlib

import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import SPEC, make_dataset
from fusionrec.cli import app
from fusionrec.data.problems import DataError
from fusionrec.data.validate import load_dataset, validate

runner = CliRunner()


def problems_of(root) -> list[str]:
    dataset, problems = validate(root)
    assert dataset is None and problems, "expected the dataset to be invalid"
    return [str(p) for p in problems]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_valid_dataset_loads_with_typed_columns(tmp_path, fmt):
    dataset = load_dataset(make_dataset(tmp_path / "d", fmt))
    assert dataset.summary() == "tiny: 3 users, 2 items, 4 ratings, 4 images"
    assert dataset.users["age"].dtype == float and dataset.items["price"].tolist() == [10.5, 20.0]
    assert dataset.ratings["user_id"].tolist() == ["u1", "u1", "u2", "u3"]


def test_cli_prints_one_line_summary_and_exits_0(tmp_path):
    result = runner.invoke(app, ["data", "validate", str(make_dataset(tmp_path / "d"))])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().startswith("ok tiny: 3 users, 2 items, 4 ratings, 4 images")


def test_synthetic_shop_is_valid(tiny_shop):
    dataset = load_dataset(tiny_shop)
    assert len(dataset.users) == 60 and len(dataset.items) == 40 and dataset.image_count() > 90


def test_missing_file(tmp_path):
    root = make_dataset(tmp_path / "d")
    (root / "ratings.parquet").unlink()
    assert problems_of(root) == ["ratings.parquet:-:-: file not found (nor ratings.csv)"]


def test_missing_dataset_yaml_and_folder(tmp_path):
    root = make_dataset(tmp_path / "d")
    (root / "dataset.yaml").unlink()
    assert problems_of(root) == ["dataset.yaml:-:-: file not found"]
    assert problems_of(tmp_path / "nowhere")[0].endswith("dataset folder not found")


def test_missing_required_columns(tmp_path):
    users = pd.DataFrame({"user_id": ["u1", "u2", "u3"], "bio": ["a", "b", "c"], "photo": [None] * 3,
                          "age": [1, 2, 3]})
    ratings = pd.DataFrame({"user_id": ["u1"], "item_id": ["i1"]})
    root = make_dataset(tmp_path / "d", users=users, ratings=ratings)
    assert problems_of(root) == ["users.parquet:-:region: required column missing",
                                 "ratings.parquet:-:rating: required column missing"]


def test_bad_dataset_yaml_reports_each_key(tmp_path):
    spec = dict(SPEC, rating_scale={"min": 5, "max": 1}, relevance_threshold="high", colour="x")
    spec["items"] = {"text": "description"}
    found = problems_of(make_dataset(tmp_path / "d", spec=spec))
    assert "dataset.yaml:-:colour: unknown key" in found[0]
    assert any(p.startswith("dataset.yaml:-:rating_scale: min (5) must be below max (1)") for p in found)
    assert any(p.startswith("dataset.yaml:-:relevance_threshold:") for p in found)
    assert any(p.startswith("dataset.yaml:-:items.id: required") for p in found)


def test_duplicate_ids(tmp_path):
    users = pd.DataFrame({"user_id": ["u1", "u2", "u3", "u1"], "bio": None, "photo": None, "region": "n", "age": 1})
    found = problems_of(make_dataset(tmp_path / "d", users=users))
    assert found == ["users.parquet:4:user_id: duplicate id 'u1' (first at row 1)"]


def test_ratings_naming_unknown_users_or_items(tmp_path):
    ratings = pd.DataFrame({"user_id": ["u1", "u9", "u2"], "item_id": ["i1", "i1", "i7"], "rating": [1, 2, 3]})
    assert problems_of(make_dataset(tmp_path / "d", ratings=ratings)) == [
        "ratings.parquet:2:user_id: unknown user 'u9'",
        "ratings.parquet:3:item_id: unknown item 'i7'",
    ]


def test_nan_and_off_scale_ratings(tmp_path):
    ratings = pd.DataFrame({"user_id": ["u1", "u1", "u2", "u3"], "item_id": ["i1", "i2", "i1", "i2"],
                            "rating": [float("nan"), 6.0, 0.5, 5.0]})
    assert problems_of(make_dataset(tmp_path / "d", ratings=ratings)) == [
        "ratings.parquet:1:rating: rating is missing (NaN)",
        "ratings.parquet:2:rating: rating 6 is outside the scale [1, 5]",
        "ratings.parquet:3:rating: rating 0.5 is outside the scale [1, 5]",
    ]


def test_non_numeric_values_in_numeric_columns_csv(tmp_path):
    root = make_dataset(tmp_path / "d", fmt="csv")
    (root / "items.csv").write_text("item_id,description,image,brand,price\ni1,x,,X,cheap\ni2,y,,Y,12\n")
    (root / "ratings.csv").write_text("user_id,item_id,rating\nu1,i1,five\nu2,i2,4\n")
    assert problems_of(root) == [
        "items.csv:1:price: not a finite number: 'cheap'",
        "ratings.csv:1:rating: not a finite number: 'five'",
    ]


def test_csv_ids_keep_leading_zeros(tmp_path):
    root = make_dataset(tmp_path / "d", fmt="csv")
    (root / "users.csv").write_text("user_id,bio,photo,region,age\n007,x,,n,3\n7,y,,n,4\n")
    (root / "ratings.csv").write_text("user_id,item_id,rating\n007,i1,5\n7,i1,4\n")
    assert load_dataset(root).users["user_id"].tolist() == ["007", "7"]


def test_missing_and_undecodable_images(tmp_path):
    root = make_dataset(tmp_path / "d")
    (root / "images" / "b.png").write_bytes(b"not a png at all")
    (root / "images" / "a.png").unlink()
    found = problems_of(root)
    assert found[0] == "users.parquet:1:photo: image file not found: images/a.png"
    assert found[1].startswith("users.parquet:3:photo: undecodable image b.png")
    assert found[2].startswith("items.parquet:1:image: undecodable image b.png")
    assert len(found) == 3


def test_truncated_image_is_undecodable(tmp_path):
    root = make_dataset(tmp_path / "d")
    path = root / "images" / "c.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[:200])
    found = problems_of(root)
    assert len(found) == 1 and found[0].startswith("items.parquet:2:image: undecodable image c.png")


@pytest.mark.parametrize("path, message", [
    ("../outside.png", "leaves the dataset folder"),
    ("images/../../outside.png", "leaves the dataset folder"),
    ("/etc/passwd", "absolute image path"),
    ("images/link.png", "resolves outside the dataset folder"),
])
def test_image_paths_that_leave_the_folder(tmp_path, path, message):
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")
    items = pd.DataFrame({"item_id": ["i1", "i2"], "description": ["a", "b"], "image": [path, None],
                          "brand": ["X", "Y"], "price": [1.0, 2.0]})
    root = make_dataset(tmp_path / "d", items=items)
    os.symlink(outside, root / "images" / "link.png")
    found = problems_of(root)
    assert len(found) == 1 and found[0].startswith("items.parquet:1:image:") and message in found[0]


def test_symlink_inside_the_folder_is_fine(tmp_path):
    root = make_dataset(tmp_path / "d")
    os.symlink(root / "images" / "a.png", root / "images" / "alias.png")
    items = pd.DataFrame({"item_id": ["i1", "i2"], "description": ["a", "b"], "image": ["images/alias.png", None],
                          "brand": ["X", "Y"], "price": [1.0, 2.0]})
    make_dataset(root, items=items)
    assert validate(root)[1] == []


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds almost no data: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_sized_image_is_refused(tmp_path):
    root = make_dataset(tmp_path / "d")
    (root / "images" / "c.png").write_bytes(_png_header_only(30000, 30000))
    found = problems_of(root)
    assert len(found) == 1 and found[0].startswith("items.parquet:2:image:")
    assert "decompression bomb" in found[0]


def test_empty_ratings_table(tmp_path):
    ratings = pd.DataFrame({"user_id": pd.Series([], dtype=str), "item_id": pd.Series([], dtype=str),
                            "rating": pd.Series([], dtype=float)})
    assert problems_of(make_dataset(tmp_path / "d", ratings=ratings)) == [
        "ratings.parquet:-:-: the ratings table is empty"]


def test_duplicate_ratings_of_one_pair(tmp_path):
    ratings = pd.DataFrame({"user_id": ["u1", "u2", "u1"], "item_id": ["i1", "i1", "i1"], "rating": [1, 2, 3]})
    assert problems_of(make_dataset(tmp_path / "d", ratings=ratings)) == [
        "ratings.parquet:3:item_id: duplicate rating of item 'i1' by user 'u1' (first at row 1)"]


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    users = pd.DataFrame({"user_id": ["u1", "u1", "u3"], "bio": None, "photo": ["images/zz.png", None, None],
                          "region": "n", "age": ["x", 2, 3]})
    ratings = pd.DataFrame({"user_id": ["u1", "u4"], "item_id": ["i1", "i2"], "rating": [9, 1]})
    found = problems_of(make_dataset(tmp_path / "d", fmt="csv", users=users, ratings=ratings))
    assert len(found) == 5, found


def test_cli_lists_problems_and_exits_1_without_traceback(tmp_path):
    ratings = pd.DataFrame({"user_id": ["u1", "u9"], "item_id": ["i1", "i1"], "rating": [7, 2]})
    result = runner.invoke(app, ["data", "validate", str(make_dataset(tmp_path / "d", ratings=ratings))])
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "ratings.parquet:2:user_id: unknown user 'u9'",
        "ratings.parquet:1:rating: rating 7 is outside the scale [1, 5]",
    ]
    assert "Traceback" not in result.output


def test_unreadable_table(tmp_path):
    root = make_dataset(tmp_path / "d")
    (root / "items.parquet").write_bytes(b"garbage")
    found = problems_of(root)
    assert found[0].startswith("items.parquet:-:-: cannot read table:")


def test_load_dataset_raises_with_every_problem(tmp_path):
    ratings = pd.DataFrame({"user_id": ["u8", "u9"], "item_id": ["i1", "i1"], "rating": [1, 2]})
    with pytest.raises(DataError) as caught:
        load_dataset(make_dataset(tmp_path / "d", ratings=ratings))
    assert len(caught.value.problems) == 2


def test_yaml_syntax_error_names_the_line(tmp_path):
    root = make_dataset(tmp_path / "d")
    (root / "dataset.yaml").write_text(yaml.safe_dump(SPEC) + "users: [unclosed\n")
    found = problems_of(root)
    assert len(found) == 1 and found[0].startswith("dataset.yaml:") and "not valid YAML" in found[0]
