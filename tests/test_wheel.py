"""The wheel built from this tree, installed into a fresh environment, serves: `cdt serve`
there, run outside any source tree, loads the shipped checkpoint the wheel carries and
serves the API and the web page; given the directory the wheel installs its checkpoints in
(`CDT_MODELS`), it serves all of them. The wheel carries the client's package (`cdt_client`,
from client/) too, whose formats the server imports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import httpx

from model import DEFAULT_CHECKPOINT
from tests.servers import REPO, Server

PACKAGES = ("model", "media", "training", "service", "cli", "cdt_client")
SHIPPED = (DEFAULT_CHECKPOINT, DEFAULT_CHECKPOINT.parent / "cdt-tiny-t8")


def source_tree(destination: Path) -> Path:
    """The repository's files as git sees them (tracked, and untracked but not ignored), copied
    out: a build in the repository itself would reuse whatever its build/ directory holds."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for name in files:
        if (REPO / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)
    return destination


def test_installed_wheel_serves_the_shipped_checkpoint(tmp_path):
    source = source_tree(tmp_path / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("cdt_tokenizer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if "/" in name and ".dist-info" not in name
            and ".data" not in name} == set(PACKAGES)  # no tests, benchmarks or scripts
    for checkpoint in SHIPPED:
        shipped = sorted(path.name for path in checkpoint.iterdir())
        assert sorted(n.rsplit("/", 1)[1] for n in names if f"/checkpoints/{checkpoint.name}/" in n) == shipped
    assert any(name.startswith("service/web/static/") for name in names)
    client = REPO / "client"
    assert {name for name in names if name.startswith("cdt_client/")} == {
        path.relative_to(client).as_posix() for path in (client / "cdt_client").rglob("*.py")}

    # A fresh environment: the wheel alone, its dependencies seen through a .pth file (they are
    # what this environment has; this project's editable install there is not processed).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.run([python, "-c", "import model; print(model.DEFAULT_CHECKPOINT, model.__file__)"],
                           cwd=tmp_path, check=True, capture_output=True, text=True).stdout.split()
    assert where[0].startswith(str(venv)) and where[1].startswith(site), where

    with Server(None, tmp_path / "serve.log", repo=tmp_path, python=python) as server:
        server.wait_ready()
        (card,) = httpx.get(f"{server.url}/v1/models").json()["models"]
        assert card["hash"] == (DEFAULT_CHECKPOINT / "model.sha256").read_text().split()[0]
        page = httpx.get(f"{server.url}/")
        assert page.status_code == 200 and "<html" in page.text.lower()

    # Every checkpoint the wheel carries, served from the directory it installs them in.
    installed = venv / "share" / "cdt-tokenizer" / "checkpoints"
    with Server(None, tmp_path / "serve-all.log", repo=tmp_path, python=python, models=str(installed)) as server:
        server.wait_ready()
        cards = httpx.get(f"{server.url}/v1/models").json()["models"]
        assert [(card["name"], card["hash"]) for card in cards] == [
            (checkpoint.name, (checkpoint / "model.sha256").read_text().split()[0]) for checkpoint in SHIPPED]
