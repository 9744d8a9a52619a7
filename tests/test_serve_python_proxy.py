"""`fusionrec serve --proxy python`: the same API through Serve's Python proxy, the way out of the
default (HAProxy, which the session's Ray runs: tests/test_serve_autoscale.py checks it holds the port)."""

from __future__ import annotations

import os

import psutil
import pytest
import requests

from conftest import fusionrec_serve, port_holders, port_processes

pytestmark = pytest.mark.integration


def test_serve_behind_the_python_proxy_answers_the_same_api(registered, served_bundles):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, started with the flag
    with fusionrec_serve(["--proxy", "python", "--config", "serve/config.yaml"], env, seconds=150) as url:
        # Serve's proxy actor, not HAProxy, holds the port: a process of the server's own Ray, its
        # title the actor's name and the method it runs (ray::ProxyActor.receive_asgi_messages)
        holders = port_holders(url)
        assert holders and all(name.startswith("ray::ProxyActor") for name in holders), holders
        # A Ray worker (the proxy actor, as the replicas) of the Ray `fusionrec serve` started runs at
        # this process's nice value, not Ray's default of 15 more
        assert {p.nice() for p in port_processes(url)} == {psutil.Process().nice()}

        user = str(served_bundles["ratings"]["user_id"].iloc[0])
        answer = requests.post(f"{url}/recommend", json={"user_id": user, "k": 3}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["items"]) == 3, answer.text
        wrong = requests.post(f"{url}/recommend", json={"user_id": "nobody", "k": 3}, timeout=30)
        assert wrong.status_code == 404 and wrong.json()["error"].startswith("user_id: unknown user")
