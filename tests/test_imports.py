"""The import direction between our packages, read from every module's source with `ast`:
`model` imports nothing of ours; `media` imports neither `service`, `training` nor `cli`;
`training` does not import `service`; the client package `cdt_client` imports nothing of
ours but itself, and only the third-party packages its distribution depends on; its formats
import nothing of ours but each other, and neither torch nor the HTTP client; no module
takes a `_`-prefixed name from another package; and the other packages use `model` through
what its `__init__` exports.

Inside `model`, the network imports nothing of the streaming unit above it, which imports
nothing of the checkpoint loader above it; and no module of ours imports itself through
others (counting imports inside functions and under TYPE_CHECKING: a cycle hidden that
way is still one). The service's domain (sessions, bodies, errors, the worker pool) reaches
no HTTP module."""

from __future__ import annotations

import ast
import functools
import graphlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import model

ROOT = Path(__file__).resolve().parents[1]
# Each package of ours and the folder that holds it (the client's is its own distribution's).
HOMES = {"model": ROOT, "media": ROOT, "training": ROOT, "service": ROOT, "cli": ROOT, "benchmarks": ROOT,
         "cdt_client": ROOT / "client"}
PACKAGES = tuple(HOMES)
FORBIDDEN = {
    "model": {"media", "training", "service", "cli", "benchmarks", "cdt_client"},
    "media": {"service", "training", "cli", "benchmarks"},
    "training": {"service", "cli", "benchmarks"},
    "cdt_client": {"model", "media", "training", "service", "cli", "benchmarks"},
}
FORMATS = "cdt_client.formats"
FORMATS_THIRD_PARTY = {"numpy"}  # the formats are numpy and the standard library


def client_dependencies() -> set[str]:
    """The client distribution's dependencies and extras (each imports under its own name)."""
    project = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {re.match(r"[A-Za-z0-9_.-]+", requirement).group() for requirement in requirements}


def module_name(path: Path) -> str:
    package = next(name for name, home in HOMES.items() if path.is_relative_to(home / name))
    parts = path.relative_to(HOMES[package]).with_suffix("").parts
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


MODULES = {module_name(p): p for pkg, home in HOMES.items() for p in sorted((home / pkg).rglob("*.py"))}

# `model`'s layers, bottom up: a module imports modules of its own layer and those below.
MODEL_LAYERS = (
    ("network", {"model.config", "model.cache", "model.layers", "model.diffusion", "model.encoder",
                 "model.decoder", "model.tokenizer"}),
    ("streaming", {"model.streaming", "model.streaming.positions", "model.streaming.streams",
                   "model.streaming.receptive_field"}),
    ("loader", {"model.checkpoint", "model.growth"}),
    ("exports", {"model"}),
)


def dependencies(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Each module's imports among `modules`: `from pkg import name` counts as importing the
    module pkg.name where there is one, else pkg."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        for module, names in imports(path):
            submodules = {f"{module}.{n}" for n in names} & set(modules)
            targets |= submodules
            if module in modules and (not names or len(submodules) < len(names)):
                targets.add(module)
        graph[name] = targets - {name}
    return graph


@functools.cache
def our_dependencies() -> dict[str, set[str]]:
    return dependencies(MODULES)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def test_the_modules_are_found():
    assert {"model.tokenizer", "media.tokenize", "service.app", "training.trainer", "cli.main", "cdt_client.client",
            "cdt_client.formats.tensors"} <= set(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layers(name):
    package = name.split(".")[0]
    problems = []
    for module, names in imports(MODULES[name]):
        target = module.split(".")[0]
        if target in FORBIDDEN.get(package, ()):
            problems.append(f"imports {module} ({package} may not import {target})")
        if package == "cdt_client" and target not in PACKAGES and not _standard(target) \
                and target not in client_dependencies():
            problems.append(f"imports {module}, which the client distribution does not depend on")
        if name.startswith(FORMATS) and not (module.startswith(FORMATS) or _standard(target)
                                             or target in FORMATS_THIRD_PARTY):
            problems.append(f"imports {module} (the formats take numpy and the standard library only)")
        if target in PACKAGES and target != package:
            problems += [f"takes the private {n} from {module}" for n in names if n.startswith("_")]
        if target == "model" and package != "model" and (module != "model" or not set(names) <= set(model.__all__)):
            problems.append(f"imports {sorted(set(names) - set(model.__all__)) or module} past model's exports")
    assert not problems, f"{name}: " + "; ".join(problems)


def _standard(module: str) -> bool:
    return module in sys.stdlib_module_names or module == "__future__"


def test_the_client_dependencies_are_read():
    assert client_dependencies() == {"httpx", "numpy", "safetensors", "av"}


def test_the_formats_load_without_torch_or_the_http_client():
    """What importing the formats loads, in a fresh interpreter: the package's `__init__` keeps
    the HTTP client out of the server's media and service."""
    folder = HOMES["cdt_client"] / "cdt_client" / "formats"
    formats = ", ".join(f"{FORMATS}.{path.stem}" for path in folder.glob("[!_]*.py"))
    assert formats.count(FORMATS) == 4
    code = f"import sys, {formats}; print([m for m in ('torch', 'httpx', 'safetensors', 'av') if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    assert loaded.stdout.strip() == "[]"


def test_the_checker_sees_relative_and_private_imports(tmp_path, monkeypatch):
    """The rules above would pass vacuously if `imports` resolved nothing."""
    monkeypatch.setitem(HOMES, "service", tmp_path)
    (tmp_path / "service").mkdir()
    module = tmp_path / "service" / "bodies.py"
    module.write_text("from .app import create_app\nfrom media.lpips import _ALEX\nimport model.cache\n")
    assert imports(module) == [("service.app", ["create_app"]), ("media.lpips", ["_ALEX"]), ("model.cache", [])]


def test_no_module_imports_itself_through_others():
    cycle = find_cycle(our_dependencies())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_a_cycle_through_a_package_init(tmp_path, monkeypatch):
    """`from . import b` in a package's __init__, and b importing the package back."""
    monkeypatch.setitem(HOMES, "pkg", tmp_path)
    (tmp_path / "pkg").mkdir()
    modules = {"pkg": tmp_path / "pkg" / "__init__.py", "pkg.a": tmp_path / "pkg" / "a.py",
               "pkg.b": tmp_path / "pkg" / "b.py"}
    modules["pkg"].write_text("from . import b\n")
    modules["pkg.a"].write_text("import os\n")
    modules["pkg.b"].write_text("def f():\n    from pkg import a, VALUE\n")
    graph = dependencies(modules)
    assert graph == {"pkg": {"pkg.b"}, "pkg.a": set(), "pkg.b": {"pkg", "pkg.a"}}
    assert set(find_cycle(graph)) == {"pkg", "pkg.b"}


def test_every_model_module_has_a_layer():
    layered = set().union(*(modules for _, modules in MODEL_LAYERS))
    assert layered == {name for name in MODULES if name.split(".")[0] == "model"}


@pytest.mark.parametrize("layer", range(len(MODEL_LAYERS)), ids=[name for name, _ in MODEL_LAYERS])
def test_model_modules_import_only_their_layer_and_those_below(layer):
    allowed = set().union(*(modules for _, modules in MODEL_LAYERS[: layer + 1]))
    graph = our_dependencies()
    name, modules = MODEL_LAYERS[layer]
    above = {module: sorted(graph[module] - allowed) for module in sorted(modules) if graph[module] - allowed}
    assert not above, f"{name} modules import from a layer above: {above}"


# The domain of the service: nothing these import, directly or through other modules, is an HTTP
# framework or the HTTP edge (routes, dependencies, auth, the error table, the app).
HTTP_MODULES = ("fastapi", "starlette", "service.app", "service.auth", "service.deps", "service.errors",
                "service.request_metrics", "service.routes")
DOMAIN_MODULES = sorted(name for name in MODULES
                        if name.startswith("service.sessions") or name in (
                            "service.bodies", "service.domain_errors", "service.memory", "service.metrics",
                            "service.ops", "service.responses", "service.workers"))


def is_http(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in HTTP_MODULES)


def test_the_domain_modules_are_found():
    assert {"service.sessions.protocol", "service.sessions.record", "service.sessions.window",
            "service.sessions.service", "service.sessions.store.redis_store", "service.bodies"} <= set(DOMAIN_MODULES)


@pytest.mark.parametrize("name", DOMAIN_MODULES)
def test_the_domain_reaches_no_http(name):
    graph, reached, pending = our_dependencies(), set(), [name]
    while pending:
        module = pending.pop()
        if module not in reached:
            reached.add(module)
            pending += graph[module]
    imported = {module for m in reached for module, _ in imports(MODULES[m])}
    http = sorted(m for m in reached | imported if is_http(m))
    assert not http, f"{name} reaches {http}"
