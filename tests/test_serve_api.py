"""The HTTP API over real HTTP (uvicorn on loopback), one process, no Ray: answers and every 4xx."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import uvicorn
from PIL import Image

from fusionrec.serve.api import MAX_BODY_BYTES, plain_app


@contextlib.contextmanager
def serving(app, port: int):
    """`app` served by uvicorn on 127.0.0.1:`port` in a thread; yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            requests.get(f"{url}/healthz", timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def service(tiny_shop, served_bundles, free_port):
    with serving(plain_app(str(served_bundles["fusion"])), free_port()) as url:
        yield {"url": url, "ratings": served_bundles["ratings"], "shop": tiny_shop}


def png(colour="red", size=(16, 16)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def post(service, path, body=None, **kwargs):
    return requests.post(service["url"] + path, json=body, timeout=30, **kwargs)


def test_health_model_and_docs(service):
    assert requests.get(service["url"] + "/healthz").json() == {"status": "ok", "model_version": "local"}
    info = requests.get(service["url"] + "/model").json()
    assert info["version"] == "local" and info["model"] == "fusion" and info["users"] == 60 and info["items"] == 40
    assert info["user_encoders"]["text"]["encoder"] == "tiny-bert"
    assert set(info["attributes"]["categorical"]) and "age" in info["attributes"]["numeric"]
    assert requests.get(service["url"] + "/docs").status_code == 200
    assert "/recommend" in requests.get(service["url"] + "/openapi.json").json()["paths"]


def test_predict_and_recommend_for_a_known_user(service):
    ratings = service["ratings"]
    user = ratings["user_id"].iloc[0]
    seen = set(ratings.loc[ratings["user_id"] == user, "item_id"])
    out = post(service, "/predict", {"user_id": user, "item_ids": ["i00001", "i00002"]})
    assert out.status_code == 200, out.text
    body = out.json()
    assert [p["item_id"] for p in body["predictions"]] == ["i00001", "i00002"] and body["model_version"] == "local"
    assert all(1 <= p["rating"] <= 5 for p in body["predictions"])

    out = post(service, "/recommend", {"user_id": user, "k": 40}).json()
    ids = [i["item_id"] for i in out["items"]]
    assert len(ids) == 40 - len(seen) and not seen & set(ids)  # exclude_seen by default
    scores = [i["score"] for i in out["items"]]
    assert scores == sorted(scores, reverse=True)
    every = post(service, "/recommend", {"user_id": user, "k": 40, "exclude_seen": False}).json()["items"]
    assert len(every) == 40 and seen <= {i["item_id"] for i in every}
    # the ranking agrees with /predict's ratings for the same pairs
    predicted = post(service, "/predict", {"user_id": user, "item_ids": [i["item_id"] for i in every]}).json()
    assert np.allclose([p["rating"] for p in predicted["predictions"]],
                       np.clip([i["score"] for i in every], 1, 5), atol=1e-4)
    # ranked by the raw score; each rating is on the 1-5 scale and is what /predict answers
    assert np.allclose([i["rating"] for i in every], [p["rating"] for p in predicted["predictions"]], atol=1e-4)
    assert all(1 <= i["rating"] <= 5 for i in every)


def test_recommend_for_a_new_user_from_text_image_or_attributes(service):
    def recommend(user):
        out = post(service, "/recommend", {"user": user, "k": 5})
        assert out.status_code == 200, out.text
        return [i["item_id"] for i in out.json()["items"]]

    by_text = recommend({"text": "I love silk dresses for summer weddings"})
    assert len(by_text) == 5
    assert recommend({"text": "I love silk dresses for summer weddings"}) == by_text  # deterministic
    assert len(recommend({"image": png()})) == 5
    info = requests.get(service["url"] + "/model").json()
    name, levels = next(iter(info["attributes"]["categorical"].items()))
    assert len(recommend({"attributes": {name: levels[0], "age": 30}})) == 5


@pytest.mark.parametrize("path, body, status, field", [
    ("/predict", {"user_id": "nobody", "item_ids": ["i00001"]}, 404, "user_id"),
    ("/predict", {"user_id": "u00001", "item_ids": ["i00001", "nothing"]}, 404, "item_ids[1]"),
    ("/predict", {"user_id": "u00001", "item_ids": []}, 422, "item_ids"),
    ("/predict", {"user_id": "u00001", "item_ids": ["i00001"] * 10_001}, 422, "item_ids"),
    ("/predict", {"user_id": 7, "item_ids": ["i00001"]}, 422, "user_id"),
    ("/predict", {"item_ids": ["i00001"]}, 422, "user_id"),
    ("/predict", {"user_id": "u00001", "item_ids": ["i00001"], "extra": 1}, 422, "extra"),
    ("/recommend", {"user_id": "nobody"}, 404, "user_id"),
    ("/recommend", {"user_id": "u00001", "k": 0}, 422, "k"),
    ("/recommend", {"user_id": "u00001", "k": 1001}, 422, "k"),
    ("/recommend", {"user_id": "u00001", "k": "ten"}, 422, "k"),
    ("/recommend", {"user_id": "u00001", "exclude_seen": "yes"}, 422, "exclude_seen"),
    ("/recommend", {"k": 5}, 422, "user_id, user: give exactly one"),
    ("/recommend", {"user_id": "u00001", "user": {"text": "x"}}, 422, "give exactly one"),
    ("/recommend", {"user": {}}, 422, "user: give at least one"),
    ("/recommend", {"user": {"image": "not base64!"}}, 422, "user.image"),
    ("/recommend", {"user": {"image": base64.b64encode(b"not an image").decode()}}, 422, "user.image"),
    ("/recommend", {"user": {"attributes": {"shoe_size": 3}}}, 422, "user.attributes.shoe_size"),
    ("/recommend", {"user": {"attributes": {"age": "old"}}}, 422, "user.attributes.age"),
    ("/recommend", {"user": {"attributes": {"age": True}}}, 422, "user.attributes.age"),
    ("/recommend", {"user": {"text": 5}}, 422, "user.text"),
    # numbers a float cannot hold, or far outside the training data: named, never a 500 or an empty list
    ("/recommend", {"user": {"attributes": {"age": 10**400}}}, 422, "user.attributes.age: 1000000"),
    ("/recommend", {"user": {"attributes": {"age": 1e300}}}, 422, "user.attributes.age: 1e+300 is out of range"),
    ("/recommend", {"user": {"attributes": {"age": -1e300}}}, 422, "user.attributes.age"),
])
def test_bad_requests_get_a_4xx_naming_the_field(service, path, body, status, field):
    out = post(service, path, body)
    assert out.status_code == status, out.text
    assert field in out.json()["error"]


def test_unknown_attribute_values_malformed_json_big_images_and_bodies(service):
    info = requests.get(service["url"] + "/model").json()
    name = next(iter(info["attributes"]["categorical"]))
    out = post(service, "/recommend", {"user": {"attributes": {name: "no-such-level"}}})
    assert out.status_code == 422 and f"user.attributes.{name}" in out.json()["error"]

    out = requests.post(service["url"] + "/recommend", data=b'{"user_id": ', timeout=10,
                        headers={"content-type": "application/json"})
    assert out.status_code == 400 and "invalid JSON" in out.json()["error"]

    big = base64.b64encode(np.random.default_rng(0).bytes(5 * 1024**2 + 10)).decode()
    out = post(service, "/recommend", {"user": {"image": big}})
    assert out.status_code == 413 and "user.image" in out.json()["error"]

    out = requests.post(service["url"] + "/predict", data=b"x" * (MAX_BODY_BYTES + 1), timeout=30,
                        headers={"content-type": "application/json"})
    assert out.status_code == 413 and "body" in out.json()["error"]

    def chunks():  # no content-length: the limit is enforced while streaming
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536

    out = requests.post(service["url"] + "/predict", data=chunks(), timeout=30,
                        headers={"content-type": "application/json"})
    assert out.status_code == 413
    assert requests.get(service["url"] + "/nowhere").json() == {"error": "Not Found"}
    assert requests.get(service["url"] + "/predict").status_code == 405


def test_serve_config_parses_and_bad_configs_are_one_line_errors(tmp_path):
    from ray.serve.config import AutoscalingConfig

    from fusionrec.serve.app import DEPLOYMENTS, read_config
    from fusionrec.serve.ranker import CANDIDATES, CANDIDATES_ABOVE

    config = read_config(Path("serve/config.yaml"))
    assert set(config["deployments"]) == set(DEPLOYMENTS) and config["http"]["host"] == "127.0.0.1"
    for options in config["deployments"].values():
        AutoscalingConfig(**options["autoscaling_config"])
    assert config["args"]["model_uri"] == "models:/fusionrec@champion"
    assert config["args"]["candidates_above"] == CANDIDATES_ABOVE and config["args"]["candidates"] == CANDIDATES
    bad = tmp_path / "bad.yaml"
    negative = "applications: [{name: fusionrec, import_path: x:y, deployments: [{name: Ranker, num_replicas: -1}]}]"
    for text, message in ((negative, "not a valid Serve"),
                          ("applications: [{name: other, import_path: x:y}]", "no application named"),
                          ("applications: [{name: fusionrec, import_path: x:y, deployments: [{name: Nope}]}]",
                           "unknown deployment 'Nope'"),
                          ("applications: [", "not a valid Serve"),
                          ("applications: [{name: fusionrec, import_path: x:y, args: {candidates: 0}}]",
                           "args.candidates: expected a whole number >= 1, got 0"),
                          ("applications: [{name: fusionrec, import_path: x:y, args: {candidates_above: '5e4'}}]",
                           "args.candidates_above: expected a whole number >= 0, got '5e4'")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=message) as error:
            read_config(bad)
        assert "\n" not in str(error.value)


def test_cli_serve_fails_in_one_line_without_a_model_or_config(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fusionrec.cli import app

    monkeypatch.setenv("FUSIONREC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")  # undone afterwards
    for args, message in ((["serve", "--plain"], "no such registered model version"),
                          (["serve"], "no such registered model version"),
                          (["serve", "--model-uri", "models:/fusionrec"], "expected models:/NAME@ALIAS"),
                          (["serve", "--config", str(tmp_path / "missing.yaml")], "no such Serve config")):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and "Traceback" not in result.output


def test_non_finite_numbers_are_refused_and_the_edge_of_the_range_scores_finitely(service, served_bundles):
    out = requests.post(service["url"] + "/recommend", data=b'{"user": {"attributes": {"age": NaN}}}', timeout=10,
                        headers={"content-type": "application/json"})
    assert out.status_code == 422 and "user.attributes.age" in out.json()["error"]
    meta = json.loads((served_bundles["fusion"] / "bundle.json").read_text())
    mean, std = meta["users"]["structured"]["numeric"]["age"]
    for age in (mean + 99.9 * std, mean - 99.9 * std):
        out = post(service, "/recommend", {"user": {"attributes": {"age": age}}, "k": 40})
        assert out.status_code == 200, out.text
        scores = [i["score"] for i in out.json()["items"]]
        assert len(scores) == 40 and all(math.isfinite(s) for s in scores)


def test_a_model_that_scores_nan_is_an_error_not_a_shorter_list(served_bundles):
    from fusionrec.serve.ranker import Ranker

    ranker = Ranker(str(served_bundles["fusion"]))
    ranker.current.model.out.bias.data.fill_(float("nan"))
    for call in ({"method": "recommend", "user_id": "u00001", "k": 5},
                 {"method": "predict", "user_id": "u00001", "item_ids": ["i00001"]}):
        answer = ranker.answer(call)
        assert answer["status"] == 500 and "non-finite score" in answer["error"], answer


def test_health_and_new_users_when_an_encoder_cannot_be_loaded(served_bundles, tiny_models, tmp_path, free_port):
    """An encoder path missing where the service runs: /healthz is 503 and says which; a new user with
    text gets a 503 naming user.text; everything else is served; the model put in place, all is well."""
    bundle = tmp_path / "bundle"
    shutil.copytree(served_bundles["fusion"], bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    encoder_path = tmp_path / "moved-away-bert"
    meta["encoders"]["users.text"]["model"] = str(encoder_path)
    (bundle / "bundle.json").write_text(json.dumps(meta))
    with serving(plain_app(str(bundle)), free_port()) as url:
        health = requests.get(f"{url}/healthz", timeout=30)
        assert health.status_code == 503 and str(encoder_path) in health.json()["error"]
        out = requests.post(f"{url}/recommend", json={"user": {"text": "I love silk"}}, timeout=30)
        assert out.status_code == 503 and out.json()["error"].startswith("user.text: ")
        assert requests.post(f"{url}/recommend", json={"user": {"image": png()}}, timeout=30).status_code == 200
        assert requests.post(f"{url}/recommend", json={"user_id": "u00001"}, timeout=30).status_code == 200
        shutil.copytree(tiny_models["bert"], encoder_path)
        assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok", "model_version": "local"}
        assert requests.post(f"{url}/recommend", json={"user": {"text": "I love silk"}}, timeout=30).status_code == 200


def test_the_openapi_document_describes_the_answers(service):
    document = requests.get(service["url"] + "/openapi.json", timeout=10).json()
    paths = document["paths"]
    statuses = {(path, method): set(operation["responses"]) for path, item in paths.items()
                for method, operation in item.items()}
    assert statuses == {("/predict", "post"): {"200", "400", "404", "413", "422"},
                        ("/recommend", "post"): {"200", "400", "404", "409", "413", "422", "503"},
                        ("/healthz", "get"): {"200", "503"}, ("/model", "get"): {"200"}}
    error = paths["/recommend"]["post"]["responses"]["409"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorBody"}
    request = document["components"]["schemas"]["RecommendRequest"]
    assert [branch["required"] for branch in request["oneOf"]] == [["user_id"], ["user"]]
    out = requests.delete(service["url"] + "/predict", timeout=10)
    assert out.status_code == 405 and out.headers["allow"] == "POST" and "error" in out.json()


def test_schemathesis_finds_the_api_as_documented(service, tmp_path):
    """Every documented operation fuzzed (examples, coverage and fuzzing phases, all checks): no 5xx,
    every answer's status, headers and body as the document says. Schema-valid requests may still get
    a 413 or a 422: the document cannot know which attributes, values and images a model accepts."""
    config = tmp_path / "schemathesis.toml"
    config.write_text('[checks.positive_data_acceptance]\n'
                      'expected-statuses = ["2xx", "404", "409", "413", "422"]\n')
    command = [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config), "--no-color",
               "run", service["url"] + "/openapi.json", "--checks", "all", "--max-examples", "10", "--seed", "1",
               "--phases", "examples,coverage,fuzzing", "--workers", "1", "--request-timeout", "30"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # (its cache)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "Tested: 4" in out.stdout and "Examples (in" in out.stdout, out.stdout[-3000:]
