"""The import direction between our packages, read from every module's source with `ast`:
`model` imports nothing of ours; `media` imports neither `service`, `training` nor `cli`;
`training` does not import `service`; the client modules import no server module; no
module takes a `_`-prefixed name from another package; the other packages use `model`
through what its `__init__` exports; the service's domain (sessions, bodies, errors, the
worker pool) reaches no HTTP module; and no module imports itself through others."""

from __future__ import annotations

import ast
import functools
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


# The domain of the service: nothing these import, directly or through other modules, is an HTTP
# framework or the HTTP edge (routes, dependencies, auth, the error table, the app).
HTTP_MODULES = ("fastapi", "starlette", "service.app", "service.auth", "service.deps", "service.errors",
                "service.request_metrics", "service.routes")
DOMAIN_MODULES = sorted(name for name in MODULES
                        if name.startswith("service.sessions") or name in (
                            "service.bodies", "service.domain_errors", "service.memory", "service.metrics",
                            "service.ops", "service.responses", "service.wire", "service.workers"))


def is_http(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in HTTP_MODULES)


def test_the_domain_modules_are_found():
    assert {"service.sessions.protocol", "service.sessions.record", "service.sessions.window",
            "service.sessions.service", "service.sessions.store.redis_store", "service.bodies"} <= set(DOMAIN_MODULES)


def type_checking_only(node: ast.stmt) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def module_level_imports(path: Path) -> list[tuple[str, list[str]]]:
    """`imports`, without those inside functions and classes or for type checkers only: what
    importing the module runs."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found, pending = [], list(ast.parse(path.read_text(), str(path)).body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            found.append((module, [alias.name for alias in node.names]))
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and \
                not type_checking_only(node):
            pending += [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports when it is imported (`from p import m` names the
    module p.m when there is one)."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        for module, names in module_level_imports(path):
            submodules = {f"{module}.{n}" for n in names} & modules.keys()
            targets |= submodules or ({module} & modules.keys())
        graph[name] = targets - {name}
    return graph


@functools.cache
def our_import_graph() -> dict[str, set[str]]:
    return import_graph(MODULES)


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports in `graph`, or None."""
    state: dict[str, str] = {}  # "open" while its imports are being followed, then "done"
    path: list[str] = []

    def follow(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (found := follow(target)):
                return found
        path.pop()
        state[node] = "done"
        return None

    return next((found for node in sorted(graph) if node not in state and (found := follow(node))), None)


def test_no_module_imports_itself_in_a_circle():
    circle = cycle(our_import_graph())
    assert circle is None, " -> ".join(circle)


@pytest.mark.parametrize("name", DOMAIN_MODULES)
def test_the_domain_reaches_no_http(name):
    graph, reached, pending = our_import_graph(), set(), [name]
    while pending:
        module = pending.pop()
        if module not in reached:
            reached.add(module)
            pending += graph[module]
    imported = {module for m in reached for module, _ in imports(MODULES[m])}
    http = sorted(m for m in reached | imported if is_http(m))
    assert not http, f"{name} reaches {http}"


def test_the_cycle_checker_sees_a_circle(tmp_path, monkeypatch):
    """The circle test would pass vacuously if the graph missed imports."""
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "service" / "sessions").mkdir(parents=True)
    files = {"service/__init__.py": "", "service/sessions/__init__.py": "",
             "service/sessions/a.py": "from . import b\n",
             "service/sessions/b.py": "def later():\n    from .a import x\nif TYPE_CHECKING:\n    from .a import z\n"
                                      "from ..wire import Y\n",
             "service/wire.py": "import service.sessions.a\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    modules = {module_name(tmp_path / name): tmp_path / name for name in files}
    graph = import_graph(modules)
    assert graph["service.sessions.b"] == {"service.wire"}  # the others run later, or never
    assert cycle(graph) == ["service.sessions.a", "service.sessions.b", "service.wire", "service.sessions.a"]
    del files["service/wire.py"]
    assert cycle(import_graph({module_name(tmp_path / name): tmp_path / name for name in files})) is None
