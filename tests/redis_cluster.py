"""A real Redis Cluster for tests: three masters (no replicas) on free loopback ports, started once
per test session by the `redis_cluster` fixture. Import the fixture into a test module to use it."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.servers import free_port

MASTERS = 3


@dataclass(frozen=True)
class RedisClusterNodes:
    url: str  # the store's URL for the cluster (CDT_REDIS_URL)
    node_urls: tuple[str, ...]  # each master on its own, to inspect the keys it holds

    def clients(self) -> list[redis.Redis]:
        return [redis.Redis.from_url(url) for url in self.node_urls]


def _free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def _start_node(directory: Path, port: int, bus_port: int) -> subprocess.Popen:
    with open(directory / f"redis-{port}.log", "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-port", str(bus_port), "--cluster-config-file", f"nodes-{port}.conf",
             "--dir", str(directory), "--save", "", "--appendonly", "no"],
            stdout=log, stderr=subprocess.STDOUT)


def _wait(check, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except redis.ConnectionError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} after {timeout_s} s")


def _cluster_ok(client: redis.Redis) -> bool:
    info = client.execute_command("CLUSTER", "INFO").decode()
    return "cluster_state:ok" in info and f"cluster_known_nodes:{MASTERS}" in info


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[RedisClusterNodes]:
    """Three cluster-enabled redis-server processes joined by `redis-cli --cluster create`; killed at
    the end of the session."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("needs redis-server and redis-cli to run a Redis Cluster")
    directory = tmp_path_factory.mktemp("redis-cluster")
    ports = _free_ports(2 * MASTERS)  # a client port and a cluster-bus port per node
    ports, bus_ports = ports[:MASTERS], ports[MASTERS:]
    processes = []
    try:
        for port, bus_port in zip(ports, bus_ports):
            processes.append(_start_node(directory, port, bus_port))
        clients = [redis.Redis(port=port) for port in ports]
        for client in clients:
            _wait(client.ping, "redis-server not answering")
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{port}" for port in ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        for client in clients:
            _wait(lambda: _cluster_ok(client), "cluster not ok")
        yield RedisClusterNodes(url=f"redis+cluster://127.0.0.1:{ports[0]}",
                                node_urls=tuple(f"redis://127.0.0.1:{port}" for port in ports))
    finally:
        for process in processes:
            process.kill()
            process.wait(10)
