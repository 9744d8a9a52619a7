"""Metrics under the candidate protocol, checked against sums written out by hand."""

from __future__ import annotations

import json
from math import log2, sqrt

import pandas as pd
import pytest
from typer.testing import CliRunner

from fusionrec.cli import app
from fusionrec.metrics import candidate_metrics

runner = CliRunner()

# user A: six rows, a tie at the top (a1 and a2 both 4.0 -> a1 first, by item_id);
# user B: two rows, fewer than K; user C: only a 0 rating, so IDCG = 0 and NDCG skips them.
ROWS = [
    ("A", "a1", 5, 4.0), ("A", "a2", 3, 4.0), ("A", "a3", 4, 2.0), ("A", "a4", 1, 3.0), ("A", "a5", 2, 1.0),
    ("A", "a6", 5, 0.5),
    ("B", "b1", 4, 1.0), ("B", "b2", 2, 2.0),
    ("C", "c1", 0, 1.0),
]
FRAME = pd.DataFrame(ROWS, columns=["user_id", "item_id", "rating", "prediction"])

# Top 5 of A by prediction: a1, a2, a4, a3, a5 (ratings 5, 3, 1, 4, 2); ideal: 5, 5, 4, 3, 2.
DCG_A = 31 / log2(2) + 7 / log2(3) + 1 / log2(4) + 15 / log2(5) + 3 / log2(6)
IDCG_A = 31 / log2(2) + 31 / log2(3) + 15 / log2(4) + 7 / log2(5) + 3 / log2(6)
# B by prediction: b2 (2), b1 (4); ideal: b1, b2.
DCG_B = 3 / log2(2) + 15 / log2(3)
IDCG_B = 15 / log2(2) + 3 / log2(3)


def test_mse_and_rmse_over_all_rows():
    expected = sum((r - p) ** 2 for *_, r, p in ROWS) / len(ROWS)
    result = candidate_metrics(FRAME, k=5, threshold=4)
    assert result["mse"] == pytest.approx(expected)
    assert result["rmse"] == pytest.approx(sqrt(expected))


def test_precision_divides_by_k_even_for_short_users():
    # A: a1 (5) and a3 (4) relevant in its top 5 -> 2/5; B: b1 -> 1/5 although B has 2 rows; C: 0/5.
    result = candidate_metrics(FRAME, k=5, threshold=4)
    assert result["precision@5"] == pytest.approx((2 / 5 + 1 / 5 + 0 / 5) / 3)
    assert result["users"] == 3


def test_ndcg_by_hand_skipping_users_with_zero_idcg():
    result = candidate_metrics(FRAME, k=5, threshold=4)
    assert result["ndcg@5"] == pytest.approx((DCG_A / IDCG_A + DCG_B / IDCG_B) / 2)


def test_ties_broken_by_item_id_ascending():
    # Top 1 of A is a1 (rating 5), not a2 (rating 3), although both predict 4.0; order of rows does not matter.
    result = candidate_metrics(FRAME.iloc[::-1], k=1, threshold=4)
    assert result["precision@1"] == pytest.approx((1 + 0 + 0) / 3)
    assert result["ndcg@1"] == pytest.approx((31 / 31 + 3 / 15) / 2)


def test_numeric_item_ids_tie_break_as_numbers():
    frame = pd.DataFrame({"user_id": [1, 1], "item_id": [10, 9], "rating": [1, 5], "prediction": [3.0, 3.0]})
    assert candidate_metrics(frame, k=1)["precision@1"] == 1.0


def test_k_larger_than_every_list():
    result = candidate_metrics(FRAME, k=10, threshold=4)
    assert result["precision@10"] == pytest.approx((3 / 10 + 1 / 10 + 0) / 3)  # A's a6 (5) now in the top 10


def write(tmp_path, frame, name="predictions.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False) if name.endswith(".csv") else frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("name", ["p.csv", "p.parquet"])
def test_cli_prints_one_json_object(tmp_path, name):
    result = runner.invoke(app, ["metrics", "--predictions", str(write(tmp_path, FRAME, name))])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert list(out) == ["mse", "rmse", "precision@5", "ndcg@5", "users"]
    assert out["ndcg@5"] == pytest.approx((DCG_A / IDCG_A + DCG_B / IDCG_B) / 2)


def test_cli_k_and_threshold(tmp_path):
    result = runner.invoke(app, ["metrics", "--predictions", str(write(tmp_path, FRAME)), "--k", "2",
                                 "--threshold", "3"])
    out = json.loads(result.stdout)
    # A's top 2: a1 (5), a2 (3) -> 2/2; B's: b2 (2), b1 (4) -> 1/2; C: 0.
    assert out["precision@2"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_cli_bad_input_names_file_row_and_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("user_id,item_id,rating,prediction\nA,a1,5,4\nA,a2,x,3\nB,b1,4,\n")
    result = runner.invoke(app, ["metrics", "--predictions", str(path)])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["bad.csv:2:rating: not a finite number: 'x'",
                                          "bad.csv:3:prediction: missing value"]
    assert "Traceback" not in result.output


def test_cli_missing_column_and_missing_file(tmp_path):
    path = write(tmp_path, FRAME.drop(columns=["prediction"]))
    result = runner.invoke(app, ["metrics", "--predictions", str(path)])
    assert result.exit_code == 1 and result.stderr.strip() == "predictions.csv:-:prediction: required column missing"
    result = runner.invoke(app, ["metrics", "--predictions", str(tmp_path / "none.csv")])
    assert result.exit_code == 1 and "file not found" in result.stderr


def test_ranking_metrics_by_hand():
    from fusionrec.metrics import ranking_metrics

    # user A: one hit (item 2, at position 2) of two relevant; user B: three hits of four relevant
    out = ranking_metrics([[1, 2, 3], [5, 6, 7]], [{2, 9}, {5, 6, 7, 8}], k=3)
    ndcg_a = (1 / log2(3)) / (1 + 1 / log2(3))  # DCG over the ideal of min(2, 3) hits
    assert out["hr@3"] == 1.0 and out["users"] == 2
    assert out["precision@3"] == pytest.approx((1 / 3 + 1) / 2)
    assert out["recall@3"] == pytest.approx((1 / 2 + 3 / 4) / 2)
    assert out["ndcg@3"] == pytest.approx((ndcg_a + 1) / 2) == pytest.approx(0.6934264)
    assert out["map@3"] == pytest.approx((0.5 / 2 + 3 / 3) / 2)  # precision at the hit 1/2, over min(K, 2)
    assert out["map_all@3"] == pytest.approx((0.5 / 2 + 3 / 4) / 2)  # ... over all relevant items


def test_leave_one_out_metrics_by_hand():
    from fusionrec.metrics import leave_one_out_metrics

    out = leave_one_out_metrics([0, 3, 12], k=10)
    assert out["hr@10"] == pytest.approx(2 / 3)
    assert out["ndcg@10"] == pytest.approx((1 + 1 / log2(5)) / 3) == pytest.approx(0.4768922)
    assert out["users"] == 3
