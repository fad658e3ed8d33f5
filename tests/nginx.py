"""Debian's nginx running the shipped deploy/nginx.conf in front of real replicas: the
topology of docker-compose.yml (Redis, two `cdt serve` replicas, the `lb`) on loopback.

The shipped config runs unchanged except for what a test cannot keep, each rewrite
explicit below: the replicas' compose names become loopback ports, the listen port a
free loopback port, and the files nginx writes (pid, logs, temp files) move into a
scratch directory. Every rewrite must match exactly where expected, so a change to
deploy/nginx.conf that would slip past one fails here instead of testing another config.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
from pathlib import Path

import httpx

from tests.servers import REPO, Server, free_port, start_replicas, wait_for

CONFIG = REPO / "deploy" / "nginx.conf"
REPLICA_PORT = 8000  # the replicas' port in the compose network
LISTEN = "listen 8080;"
TEMP_PATHS = ("client_body_temp_path", "proxy_temp_path", "fastcgi_temp_path", "uwsgi_temp_path",
              "scgi_temp_path")


def _replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise AssertionError(f"deploy/nginx.conf: expected {old!r} exactly once, found {text.count(old)}; "
                             "update tests/nginx.py with the config")
    return text.replace(old, new)


def loopback_config(text: str, replicas: list[int], port: int, scratch: Path) -> str:
    """deploy/nginx.conf with replica i (compose's `cdt-{i+1}`) at 127.0.0.1:replicas[i],
    listening on 127.0.0.1:port, writing only under `scratch`."""
    found = re.findall(rf"^\s*server\s+(\S+):{REPLICA_PORT}\b", text, re.MULTILINE)
    names = sorted(set(found))
    if names != [f"cdt-{i + 1}" for i in range(len(replicas))]:
        raise AssertionError(f"deploy/nginx.conf lists replicas {names}; the test runs {len(replicas)}")
    for name, replica in zip(names, replicas):
        text = re.sub(rf"(^\s*server\s+){re.escape(name)}:{REPLICA_PORT}\b", rf"\g<1>127.0.0.1:{replica}", text,
                      flags=re.MULTILINE)
    text = _replace_once(text, LISTEN, f"listen 127.0.0.1:{port};")
    scratch_http = "".join(f"  {d} {scratch / d};\n" for d in TEMP_PATHS) + f"  access_log {scratch / 'access.log'};\n"
    text = _replace_once(text, "http {\n", "http {\n" + scratch_http)
    # Workers run as the user the tests run as (as root nginx would switch to `nobody`, who
    # cannot enter the scratch directory; as anyone else the directive is ignored).
    return f"user {pwd.getpwuid(os.getuid()).pw_name};\npid {scratch / 'nginx.pid'};\n" + text


class Nginx:
    """nginx (master in the foreground, as the test's child) serving deploy/nginx.conf
    rewritten by `loopback_config`."""

    def __init__(self, replicas: list[int], scratch: Path) -> None:
        binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if binary is None:
            raise RuntimeError("nginx is not installed: apt-get install nginx (.ci/run does)")
        self.port, self.scratch = free_port(), scratch
        self.url = f"http://127.0.0.1:{self.port}"
        self.error_log = scratch / "error.log"
        config = scratch / "nginx.conf"
        config.write_text(loopback_config(CONFIG.read_text(), replicas, self.port, scratch))
        self.process = subprocess.Popen([binary, "-c", str(config), "-p", str(scratch), "-e", str(self.error_log),
                                         "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 30.0) -> "Nginx":
        def answers() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.errors()}")
            try:
                return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(answers, "nginx did not pass /healthz through", timeout_s, every_s=0.05)
        return self

    def errors(self) -> str:
        return self.error_log.read_text()[-3000:] if self.error_log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # fast shutdown
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class Deployment:
    """Two replicas behind nginx, sharing the session store at `redis_url` under `prefix`:
    docker-compose.yml's topology on loopback. `env` are further CDT_* settings of both replicas."""

    def __init__(self, checkpoint: Path, scratch: Path, redis_url: str, prefix: str, **env: str) -> None:
        self.replicas: list[Server] = start_replicas(checkpoint, scratch, redis_url=redis_url,
                                                     session_key_prefix=prefix, **env)
        self.lb: Nginx | None = None
        try:
            self.lb = Nginx([r.port for r in self.replicas], scratch)
            self.url = self.lb.url
            self.lb.wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.lb is not None:
            self.lb.stop()
        for replica in self.replicas:
            replica.stop()

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
