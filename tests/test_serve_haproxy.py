"""`fusionrec serve --haproxy`: the same API, answered through Ray's HAProxy straight from a ranker
replica's own port instead of through Serve's Python proxy (ops/ray_runtime.serve_behind_haproxy)."""

from __future__ import annotations

import os

import psutil
import pytest
import requests

from conftest import fusionrec_serve

pytestmark = pytest.mark.integration


def test_serve_behind_haproxy_answers_the_same_api(registered, served_bundles):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, started with the flag
    with fusionrec_serve(["--haproxy", "--config", "serve/config.yaml"], env, seconds=150) as url:
        # HAProxy, not Serve's proxy, holds the port: a process of the server's own Ray
        port = int(url.rsplit(":", 1)[1])
        listening = {c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
        names = {psutil.Process(pid).name() for pid in listening if pid}
        assert names == {"haproxy"}, names

        user = str(served_bundles["ratings"]["user_id"].iloc[0])
        answer = requests.post(f"{url}/recommend", json={"user_id": user, "k": 3}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["items"]) == 3, answer.text
        wrong = requests.post(f"{url}/recommend", json={"user_id": "nobody", "k": 3}, timeout=30)
        assert wrong.status_code == 404 and wrong.json()["error"].startswith("user_id: unknown user")
