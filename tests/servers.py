"""Real service processes for end-to-end tests and benchmarks: `cdt serve` under uvicorn
on a free port, configured by CDT_* variables, and a private `redis-server` a test may stop
and restart."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"  # .ci/run starts it; shared, so never flushed


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` (as exposed: `_total`, `_sum`, `_count`
    included) whose labels include `labels`, in Prometheus text."""
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, timeout_s: float = 30.0, every_s: float = 0.005) -> None:
    """Poll `condition()` until it is true; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} (waited {timeout_s} s)")
        time.sleep(every_s)


class Server:
    """One `cdt serve` process. Use as a context manager; `kill()` simulates a crash."""

    def __init__(self, checkpoint: Path | None, log: Path, repo: Path = REPO, python: str = sys.executable,
                 **env: str) -> None:
        """`checkpoint` None serves the default one; `python` and `repo` (the working directory)
        choose which installation of the service runs."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {**os.environ, **{f"CDT_{k.upper()}": str(v) for k, v in env.items()}}
        if checkpoint is not None:
            environ["CDT_CHECKPOINT"] = str(checkpoint)
        self._log = open(log, "wb")
        self.process = subprocess.Popen(
            [python, "-m", "cli.main", "serve", "--port", str(self.port), "--log-level", "warning"],
            cwd=repo, env=environ, stdout=self._log, stderr=subprocess.STDOUT)
        self.log_path = log

    def wait_ready(self, timeout_s: float = 120.0, path: str = "/readyz") -> "Server":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout_s} s: {self.log_path.read_text()[-2000:]}")

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics").text

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(self.metrics(), name, **labels)

    def computing(self) -> bool:
        """Whether a model job runs now (False once the process no longer answers)."""
        try:
            return self.metric("cdt_jobs_in_flight") > 0
        except httpx.TransportError:
            return False

    def peak_rss_bytes(self) -> int:
        """The process's resident high-water mark (VmHWM)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def __enter__(self) -> "Server":
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_replicas(checkpoint: Path, logs: Path, count: int = 2, **env: str) -> list[Server]:
    """`count` servers started side by side (their model loads overlap), all ready."""
    servers = [Server(checkpoint, logs / f"r{i}.log", **env) for i in range(count)]
    try:
        return [s.wait_ready() for s in servers]
    except BaseException:
        for s in servers:
            s.stop()
        raise


class RedisServer:
    """A private `redis-server` on a free loopback port, in `directory`; `stop()` or `kill()`
    then `start()` restarts it on the same port. A `persistent` start keeps an append-only
    file fsynced on every write, so a restart keeps the data; otherwise it runs as the deploy
    files run it (no RDB, no AOF) and a restart loses everything."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not on PATH (.ci/run installs it)")
        self.directory, self.port = directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self, persistent: bool = False) -> "RedisServer":
        durability = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *durability,
                "--dir", str(self.directory)]
        with open(self.directory / "redis.log", "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port)

        def answers() -> bool:
            try:
                return client.ping()
            except redis.ConnectionError:
                return False

        wait_for(answers, "redis-server did not answer", timeout_s=10, every_s=0.02)
        return self

    def stop(self) -> None:
        """A clean shutdown (SIGTERM: Redis finishes within its next cron tick, ~100 ms)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def kill(self) -> None:
        """A crash (SIGKILL): gone at once; with `persistent`, every acknowledged write is on disk."""
        self.process.kill()
        self.process.wait(10)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
