"""The layout of ``server/``: five parts whose dependencies point downward only
(service and bench -> pipeline -> degradation and codecs; codecs -> degradation's codec
vocabulary), each subpackage's exports resolve, and light entry points stay light.
Across the library (``server``, ``client``, ``model``): no import cycles between the modules
of one package, and nothing imports ``benchmarks/`` or ``tests/``."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("degradation", "codecs", "pipeline", "service", "bench")
#: What each part may import from the others (anything else is a dependency pointing the wrong way).
ALLOWED = {
    "degradation": set(),
    "codecs": {"degradation"},
    "pipeline": {"degradation", "codecs"},
    "service": {"degradation", "codecs", "pipeline"},
    "bench": {"degradation", "codecs", "pipeline"},  # runs the service as a subprocess, never imports it
}
#: The installed packages; ``benchmarks/`` and ``tests/`` sit above them.
LIBRARY = ("server", "client", "model")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_statements(path: Path, *, type_checking: bool = True) -> list[tuple[str, list[str]]]:
    """(absolute module, names taken from it) of every import in ``path``, at any depth of the file
    (function-level imports too); ``type_checking=False`` leaves out ``if TYPE_CHECKING:`` blocks."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: list[tuple[str, list[str]]] = []
    todo: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((mod, [alias.name for alias in node.names]))
        if type_checking or not _is_type_checking(node):
            todo.extend(ast.iter_child_nodes(node))
        else:
            todo.extend(node.orelse)
    return found


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (function-level imports too), absolute."""
    found: set[str] = set()
    for mod, names in _import_statements(path):
        found.add(mod)
        found.update(f"{mod}.{n}" for n in names)  # `from . import x` names modules
    return found


def _part(module: str) -> str | None:
    bits = module.split(".")
    if len(bits) >= 2 and bits[0] == "server" and bits[1] in PARTS:
        return bits[1]
    if module in ("server.cli", "server.__main__"):
        return "cli"
    return None


@pytest.mark.parametrize("part", PARTS)
def test_dependencies_point_downward(part):
    wrong = []
    for path in sorted((ROOT / "server" / part).rglob("*.py")):
        for mod in _imports(path):
            other = _part(mod)
            if other and other != part and other not in ALLOWED[part]:
                wrong.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not wrong, "\n".join(wrong)


def test_server_top_level_holds_only_the_command():
    modules = sorted(p.name for p in (ROOT / "server").glob("*.py"))
    assert modules == ["__init__.py", "__main__.py", "cli.py"]
    folders = sorted(p.name for p in (ROOT / "server").iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(PARTS)


def _fresh_modules(code: str) -> dict:
    """Run ``code`` in a new interpreter; the JSON it prints."""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_importing_the_whole_degradation_package_loads_no_other_part():
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import server.degradation as d\n"
        "for m in pkgutil.iter_modules(d.__path__):\n"
        "    importlib.import_module('server.degradation.' + m.name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('server.'))))\n"
    )
    loaded = _fresh_modules(code)
    assert "server.degradation.engine" in loaded and "server.degradation.video" in loaded
    assert [m for m in loaded if not m.startswith("server.degradation")] == []


def test_light_entry_points_do_not_import_torch_or_the_pipeline():
    code = (
        "import json, sys\n"
        "import server.service.health_probe, server.degradation.video, server.codecs.base\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'server'))))\n"
    )
    loaded = _fresh_modules(code)
    assert not [m for m in loaded if m == "torch" or m.startswith("torch.")]
    assert not [m for m in loaded if m.startswith(("server.pipeline", "server.degradation.engine"))]


def test_importing_the_client_library_does_not_import_torch():
    """``client.wire`` (torch) sits below ``client.client``, imported where a client first needs it."""
    code = (
        "import json, sys\n"
        "import client, client.errors\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'client'))))\n"
    )
    loaded = _fresh_modules(code)
    assert "client.client" in loaded and "client.errors" in loaded
    assert not [m for m in loaded if m == "torch" or m.startswith("torch.") or m == "client.wire"]


@pytest.mark.parametrize("part", PARTS)
def test_each_part_says_what_it_holds_and_its_exports_resolve(part):
    import importlib

    pkg = importlib.import_module(f"server.{part}")
    assert pkg.__doc__ and len(pkg.__doc__.split()) >= 20
    assert pkg.__all__, f"server.{part} exports nothing"
    for name in pkg.__all__:
        obj = getattr(pkg, name)
        assert obj is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        getattr(pkg, "nope")


def test_the_library_example_of_the_degradation_package(photo_dir):
    """The example in ``server.degradation``'s docstring, on the test photographs: the codec is
    injected, and an engine without one says what to pass when a batch needs the video block."""
    from server.codecs import VideoRoundTrip
    from server.degradation import DegradationConfig, Engine, ImageFolder, make_epoch_plan
    from server.pipeline import BatchProducer

    cfg = DegradationConfig(video_batch_size=4, first_batch_range=(4, 4), v2_prob=1.0)
    folder = ImageFolder(photo_dir, cfg.patch_size)
    plan = make_epoch_plan(folder.images, cfg, seed=0, epoch=0)
    batch = Engine(cfg, codec=VideoRoundTrip()).make_batch(folder, plan, 0)
    assert all(r["ending"] == "v2" and r["backend"] == "software" for r in batch.records)
    same = next(iter(BatchProducer(folder, cfg, workers=0).produce(0, 0, [0])))
    assert np.array_equal(batch.lr, same.lr) and batch.records == same.records
    with pytest.raises(RuntimeError, match=r"codec=server\.codecs\.VideoRoundTrip\(\)"):
        Engine(cfg).make_batch(folder, plan, 0)
    v1 = DegradationConfig(video_batch_size=4, first_batch_range=(4, 4), v2_prob=0.0)
    out = Engine(v1).make_batch(folder, make_epoch_plan(folder.images, v1, 0, 0), 0)
    assert all(r["ending"] == "v1" for r in out.records)


def test_lazy_exports_are_the_defining_modules_objects():
    from server.degradation import Engine
    from server.degradation.engine import Engine as DefinedEngine
    from server.pipeline import SplitProducer
    from server.pipeline.split import SplitProducer as DefinedSplit

    assert Engine is DefinedEngine and SplitProducer is DefinedSplit
    import server.degradation

    assert "Engine" in dir(server.degradation) and server.degradation.__all__ == sorted(server.degradation.__all__)


def _module_graph(package: str) -> tuple[dict[str, set[str]], dict[str, Path]]:
    """Which modules of ``package`` each of its modules imports (at run time: function-level imports
    count, ``if TYPE_CHECKING:`` blocks never run and do not); ``from p import m`` points at module
    ``p.m`` when there is one, else at ``p``."""
    paths = {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}

    def resolve(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        targets = set()
        for mod, names in _import_statements(path, type_checking=False):
            for target in [f"{mod}.{n}" if f"{mod}.{n}" in paths else mod for n in names] or [mod]:
                if (found := resolve(target)) and found != module:
                    targets.add(found)
        graph[module] = targets
    return graph, paths


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("package", LIBRARY)
def test_no_import_cycles_between_the_modules_of_a_package(package):
    graph, paths = _module_graph(package)
    assert len(graph) > 3 and any(graph.values())  # the graph was read at all
    wrong = []
    for component in _cycles(graph):
        edges = [f"  {paths[a].relative_to(ROOT)} imports {b}" for a in component for b in sorted(graph[a])
                 if b in component]
        wrong.append("cycle between " + ", ".join(component) + ":\n" + "\n".join(edges))
    assert not wrong, "\n".join(wrong)


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_library_imports_neither_benchmarks_nor_tests():
    test_modules = {p.stem for p in (ROOT / "tests").glob("*.py")}  # tests import their helpers by bare name
    wrong = []
    for package in LIBRARY:
        for path in sorted((ROOT / package).rglob("*.py")):
            for mod in _imports(path):
                top = mod.split(".")[0]
                if top in ("benchmarks", "tests") or top in test_modules:
                    wrong.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not wrong, "\n".join(wrong)
