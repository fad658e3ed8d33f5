"""The repository's shell scripts run as a user runs them, for their end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def script_env(tmp_path: Path, **values: str | None) -> dict:
    """This environment with this interpreter as PYTHON, temp files under `tmp_path`, and
    `values` (None unsets a variable)."""
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path), **values}
    return {key: value for key, value in env.items() if value is not None}


def run_script(name: str, env: dict, timeout_s: float = 240) -> subprocess.CompletedProcess:
    """scripts/NAME under bash, started outside the repository (a script finds it from its own path)."""
    return subprocess.run(["bash", str(REPO / "scripts" / name)], cwd=env["TMPDIR"], env=env, capture_output=True,
                          text=True, timeout=timeout_s)
