"""Real service processes for end-to-end tests and benchmarks: `cdt serve` under uvicorn
on a free port, configured by CDT_* variables."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` (as exposed: `_total`, `_sum`, `_count`
    included) whose labels include `labels`, in Prometheus text."""
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `cdt serve` process. Use as a context manager; `kill()` simulates a crash."""

    def __init__(self, checkpoint: Path, log: Path, repo: Path = REPO, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {**os.environ, "CDT_CHECKPOINT": str(checkpoint), **{f"CDT_{k.upper()}": str(v)
                                                                       for k, v in env.items()}}
        self._log = open(log, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--port", str(self.port), "--log-level", "warning"],
            cwd=repo, env=environ, stdout=self._log, stderr=subprocess.STDOUT)
        self._log_path = log

    def wait_ready(self, timeout_s: float = 120.0, path: str = "/readyz") -> "Server":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self._log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout_s} s: {self._log_path.read_text()[-2000:]}")

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics").text

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(self.metrics(), name, **labels)

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
