"""`fusionrec serve --haproxy`: the same API, answered through Ray's HAProxy straight from a ranker
replica's own port instead of through Serve's Python proxy (ops/ray_runtime.serve_behind_haproxy)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

pytestmark = pytest.mark.integration


def test_serve_behind_haproxy_answers_the_same_api(registered, served_bundles, free_port):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, started with the flag
    server = subprocess.Popen([str(Path(sys.executable).parent / "fusionrec"), "serve", "--haproxy", "--config",
                               "serve/config.yaml", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            assert server.poll() is None, f"fusionrec serve exited: {server.stdout.read()}"
            assert time.monotonic() < deadline, "fusionrec serve --haproxy did not answer /healthz within 150 s"
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        # HAProxy, not Serve's proxy, holds the port: a process of the server's own Ray
        listening = {c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
        names = {psutil.Process(pid).name() for pid in listening if pid}
        assert names == {"haproxy"}, names

        user = str(served_bundles["ratings"]["user_id"].iloc[0])
        answer = requests.post(f"{url}/recommend", json={"user_id": user, "k": 3}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["items"]) == 3, answer.text
        wrong = requests.post(f"{url}/recommend", json={"user_id": "nobody", "k": 3}, timeout=30)
        assert wrong.status_code == 404 and wrong.json()["error"].startswith("user_id: unknown user")
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=90) == 0
