"""The Ray Serve application end to end over real HTTP: answers, 4xx through the ingress,
promotion under load without a failed request, and a killed ranker replica under load."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
import yaml
from typer.testing import CliRunner

from conftest import kill_one_ranker
from fusionrec.cli import app as cli

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.integration]


@pytest.fixture(scope="module")
def service(registered, tmp_path_factory, free_port):
    """The application from serve/config.yaml, with two fixed ranker replicas and a 1 s alias check."""
    from fusionrec.serve import app as serve_app

    config = yaml.safe_load(Path("serve/config.yaml").read_text())
    application = config["applications"][0]
    application["args"]["refresh_s"] = 1
    for deployment in application["deployments"]:
        if deployment["name"] == "Ranker":
            deployment.pop("autoscaling_config")
            deployment["num_replicas"] = 2
    path = tmp_path_factory.mktemp("serve-config") / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    info = serve_app.start(port=port, config=path)
    yield {"url": f"http://127.0.0.1:{port}", "info": info}
    serve_app.stop()


def test_the_encoder_loads_the_models_encoders_before_its_first_request(service):
    # First in this module: no new user has been encoded yet, and start() does not ask the Encoder.
    from ray import serve

    from fusionrec.serve.app import APP_NAME

    needed = [kind for kind, spec in service["info"]["user_encoders"].items() if spec]
    loaded = serve.get_deployment_handle("Encoder", APP_NAME).loaded.remote().result(timeout_s=30)
    assert needed and sorted(spec["kind"] for spec in loaded) == sorted(needed)


def test_answers_and_rejects_through_serve(service, served_bundles):
    url = service["url"]
    assert service["info"]["version"] == "1" and service["info"]["alias"] == "champion"
    model = requests.get(f"{url}/model", timeout=10).json()
    assert model["version"] == "1" and model["training_metrics"]["val_mse"] == 1.0
    user = served_bundles["ratings"]["user_id"].iloc[0]
    out = requests.post(f"{url}/recommend", json={"user_id": user, "k": 3}, timeout=10)
    assert out.status_code == 200 and len(out.json()["items"]) == 3 and out.json()["model_version"] == "1"
    out = requests.post(f"{url}/recommend", json={"user": {"text": "linen for the beach"}, "k": 3}, timeout=60)
    assert out.status_code == 200, out.text  # through the Encoder deployment
    out = requests.post(f"{url}/predict", json={"user_id": user, "item_ids": ["i00001", "i00002"]}, timeout=10)
    assert out.status_code == 200 and len(out.json()["predictions"]) == 2
    assert requests.post(f"{url}/recommend", json={"user_id": "nobody"}, timeout=10).status_code == 404
    out = requests.post(f"{url}/recommend", json={"user_id": user, "k": 0}, timeout=10)
    assert out.status_code == 422 and out.json()["error"].startswith("k:")
    assert requests.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"


def test_promotion_and_a_lost_replica_under_load(service, served_bundles):
    url = service["url"]
    users = list(served_bundles["ratings"]["user_id"].unique()[:10])
    log: list[tuple[float, int, str | None]] = []  # (time, status, model version)
    stop = threading.Event()

    def client(n: int) -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                out = session.post(f"{url}/recommend", json={"user_id": users[n % len(users)], "k": 5}, timeout=30)
                log.append((time.monotonic(), out.status_code, out.json().get("model_version")))
            except requests.RequestException:
                log.append((time.monotonic(), 0, None))
            n += 1

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    result = CliRunner().invoke(cli, ["promote", "--version", "2"])
    assert result.exit_code == 0 and "version 1 -> 2" in result.stdout
    promoted, switched = time.monotonic(), None
    while time.monotonic() - promoted < 30 and switched is None:
        if requests.get(f"{url}/model", timeout=10).json()["version"] == "2":
            switched = time.monotonic()
        time.sleep(0.5)
    assert switched is not None, "the service did not switch to version 2 within 30 s"
    time.sleep(3)  # both replicas poll every second
    killed = time.monotonic()
    assert kill_one_ranker() == 2
    time.sleep(8)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)

    during_promotion = [s for t, s, _ in log if t < killed]
    after_kill = [s for t, s, _ in log if t >= killed]
    assert len(during_promotion) > 20 and set(during_promotion) == {200}, Counter(during_promotion)
    assert {v for t, _, v in log if switched + 2 < t < killed} == {"2"}  # every replica on the new version
    failed = sum(s != 200 for s in after_kill)
    assert failed <= 0.01 * len(after_kill), Counter(after_kill)
    recovered = [s for t, s, _ in log if t > killed + 4]
    assert recovered and set(recovered) == {200}


def test_promote_rejects_an_unknown_version(registered):
    result = CliRunner().invoke(cli, ["promote", "--version", "99"])
    assert result.exit_code == 1 and "no version 99" in result.output and "Traceback" not in result.output
