"""The import direction between our packages, read from every module's source with `ast`:
`model` imports nothing of ours; `media` imports neither `service`, `training` nor `cli`;
`training` does not import `service`; the client modules import no server module; no
module takes a `_`-prefixed name from another package; and the other packages use `model`
through what its `__init__` exports.

Inside `model`, the network imports nothing of the streaming unit above it, which imports
nothing of the checkpoint loader above it; and no module of ours imports itself through
others (counting imports inside functions and under TYPE_CHECKING: a cycle hidden that
way is still one)."""

from __future__ import annotations

import ast
import graphlib
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

# `model`'s layers, bottom up: a module imports modules of its own layer and those below.
MODEL_LAYERS = (
    ("network", {"model.config", "model.cache", "model.layers", "model.diffusion", "model.encoder",
                 "model.decoder", "model.tokenizer"}),
    ("streaming", {"model.streaming", "model.streaming.positions", "model.streaming.streams",
                   "model.streaming.receptive_field"}),
    ("loader", {"model.checkpoint"}),
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


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


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


def test_no_module_imports_itself_through_others():
    cycle = find_cycle(dependencies(MODULES))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_a_cycle_through_a_package_init(tmp_path, monkeypatch):
    """`from . import b` in a package's __init__, and b importing the package back."""
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
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
    graph = dependencies(MODULES)
    name, modules = MODEL_LAYERS[layer]
    above = {module: sorted(graph[module] - allowed) for module in sorted(modules) if graph[module] - allowed}
    assert not above, f"{name} modules import from a layer above: {above}"
