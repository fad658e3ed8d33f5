"""The import direction between our packages, read from every module's source with `ast`:
`model` imports nothing of ours; `media` imports neither `service`, `training` nor `cli`;
`training` does not import `service`; the client modules import no server module; no
module takes a `_`-prefixed name from another package; and the other packages use `model`
through what its `__init__` exports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import model

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "media", "training", "service", "cli", "benchmarks")
FORBIDDEN = {
    "model": {"media", "training", "service", "cli", "benchmarks"},
    "media": {"service", "training", "cli", "benchmarks"},
    "training": {"service", "cli", "benchmarks"},
}
CLIENT_MODULES = ("service.client", "service.client_retry", "service.stream_client")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, names taken from it) for every import in the file, wherever it is."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((module, [alias.name for alias in node.names]))
    return found


MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def test_the_modules_are_found():
    assert {"model.tokenizer", "media.tokenize", "service.app", "training.trainer", "cli.main"} <= set(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layers(name):
    package = name.split(".")[0]
    problems = []
    for module, names in imports(MODULES[name]):
        target = module.split(".")[0]
        if target in FORBIDDEN.get(package, ()):
            problems.append(f"imports {module} ({package} may not import {target})")
        if name in CLIENT_MODULES and target == "service" and module not in CLIENT_MODULES:
            problems.append(f"imports the server module {module} (a client imports clients only)")
        if target in PACKAGES and target != package:
            problems += [f"takes the private {n} from {module}" for n in names if n.startswith("_")]
        if target == "model" and package != "model" and (module != "model" or not set(names) <= set(model.__all__)):
            problems.append(f"imports {sorted(set(names) - set(model.__all__)) or module} past model's exports")
    assert not problems, f"{name}: " + "; ".join(problems)


def test_the_checker_sees_relative_and_private_imports(tmp_path, monkeypatch):
    """The rules above would pass vacuously if `imports` resolved nothing."""
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "service").mkdir()
    module = tmp_path / "service" / "client.py"
    module.write_text("from .app import create_app\nfrom media.lpips import _ALEX\nimport model.cache\n")
    assert imports(module) == [("service.app", ["create_app"]), ("media.lpips", ["_ALEX"]), ("model.cache", [])]
