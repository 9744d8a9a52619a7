"""Which proxy the Ray nodes fusionrec starts put in front of Serve (ops/ray_runtime.serve_proxy_env):
HAProxy where it is installed, unless the environment says otherwise; behaviour over HTTP is in
test_serve_autoscale (HAProxy, the default) and test_serve_python_proxy."""

from __future__ import annotations

import os
from pathlib import Path

from fusionrec.ops import ray_runtime
from fusionrec.ops.cluster import node_env
from fusionrec.ops.ray_runtime import environment, serve_proxy_env


def test_haproxy_by_default_with_ports_of_its_own():
    assert ray_runtime.haproxy_installed()  # ray[serve] ships it on Linux
    first, second = serve_proxy_env({}), serve_proxy_env({})
    assert first["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and first["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "5"
    ports = {first["RAY_SERVE_HAPROXY_STATS_PORT"], first["RAY_SERVE_HAPROXY_METRICS_PORT"]}
    assert len(ports) == 2 and not ports & {"8404", "9101"}  # not Ray's fixed ports, which a second Ray would clash on
    assert first["RAY_SERVE_HAPROXY_STATS_PORT"] != second["RAY_SERVE_HAPROXY_STATS_PORT"]


def test_the_environment_decides_what_it_sets(monkeypatch):
    assert serve_proxy_env({"RAY_SERVE_ENABLE_HA_PROXY": "0"}) == {}
    mine = {"RAY_SERVE_HAPROXY_STATS_PORT": "18404", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "30"}
    assert serve_proxy_env(mine).items() >= mine.items()
    monkeypatch.setattr(ray_runtime, "haproxy_installed", lambda: False)
    assert serve_proxy_env({}) == {}


def test_cluster_nodes_start_behind_haproxy(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    assert node_env()["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in node_env()


def test_environment_is_restored_after_the_block(monkeypatch):
    monkeypatch.setenv("FUSIONREC_TEST_KEPT", "mine")
    monkeypatch.delenv("FUSIONREC_TEST_ADDED", raising=False)
    with environment({"FUSIONREC_TEST_KEPT": "theirs", "FUSIONREC_TEST_ADDED": "1"}):
        assert os.environ["FUSIONREC_TEST_KEPT"] == "theirs" and os.environ["FUSIONREC_TEST_ADDED"] == "1"
    assert os.environ["FUSIONREC_TEST_KEPT"] == "mine" and "FUSIONREC_TEST_ADDED" not in os.environ


def test_ports_handed_out_lie_outside_the_ephemeral_range_and_skip_taken_ones(monkeypatch):
    """A port from the kernel's ephemeral range can be taken by any outgoing connection before the
    server it was picked for binds it (it happened to HAProxy's stats port in the load benchmark)."""
    import socket

    from fusionrec.ops import processes

    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [processes.free_port() for _ in range(20)]
    assert len(set(ports)) == 20 and all(p in processes.SERVICE_PORTS and not low <= p <= high for p in ports)
    port = processes.free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.2", port))  # on one address only: not free for a server on every interface
        taken.listen()
        monkeypatch.setattr(processes, "SERVICE_PORTS", range(port, port + 2))
        monkeypatch.setattr(processes, "_handed_out", set())
        assert processes.free_port() == port + 1
