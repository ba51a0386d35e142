"""The object store's module layout, read from the source (nothing is imported): no import cycle among its
modules, function-local imports included (a local import is how a cycle usually hides), and no module
reaching for another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import hackboot.objectstore
from tests.support import import_cycles

PACKAGE = "hackboot.objectstore"
ROOT = Path(hackboot.objectstore.__file__).parent
MODULES = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "__init__")
PROTOCOL = {"s3app", "s3buckets", "s3objects", "postupload", "cors"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _trees() -> dict[str, ast.Module]:
    return {m: ast.parse((ROOT / f"{m}.py").read_text(), filename=f"{m}.py") for m in MODULES}


def _imports(tree: ast.Module) -> tuple[set[str], list[str], dict[str, str]]:
    """(package modules imported anywhere in the file, private names imported from them,
    local names bound to package modules)."""
    deps: set[str] = set()
    private: list[str] = []
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(PACKAGE + "."):
                    mod = a.name.split(".")[2]
                    deps.add(mod)
                    if a.asname:
                        aliases[a.asname] = mod
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: "from . import x" / "from .x import y"
                base = f"{PACKAGE}.{base}" if base else PACKAGE
            if base == PACKAGE:
                for a in node.names:
                    if a.name in MODULES:
                        deps.add(a.name)
                        aliases[a.asname or a.name] = a.name
            elif base.startswith(PACKAGE + "."):
                mod = base.split(".")[2]
                deps.add(mod)
                private += [f"{mod}.{a.name}" for a in node.names if _private(a.name)]
    return deps, private, aliases


def _graph() -> dict[str, set[str]]:
    graph = {}
    for mod, tree in _trees().items():
        deps, _, _ = _imports(tree)
        graph[mod] = deps - {mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module."""
    return import_cycles(graph)


def test_no_import_cycle_among_objectstore_modules() -> None:
    graph = _graph()
    assert {"s3app", "s3proto", "s3errors", "engine"} <= set(graph)
    assert _cycles(graph) == []


def test_no_module_reads_another_modules_private_names() -> None:
    found = []
    for mod, tree in _trees().items():
        _, private, aliases = _imports(tree)
        found += [f"{mod}: from {p}" for p in private]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in aliases and _private(node.attr):
                found.append(f"{mod}: {aliases[node.value.id]}.{node.attr} (line {node.lineno})")
    assert found == []


def test_leaf_modules() -> None:
    graph = _graph()
    assert graph["s3errors"] == set()  # everything may raise S3 errors: it depends on nothing
    assert graph["s3proto"] & PROTOCOL == set()  # shared by the protocol modules, importing none of them
    for mod in ("engine", "policy", "sigv4", "s3xml"):  # the layers under the protocol never reach up
        assert graph[mod] & (PROTOCOL | {"s3proto"}) == set(), mod


def test_the_checks_see_what_they_look_for() -> None:
    """The walker itself: function-local imports and private reads are found, cycles are reported."""
    tree = ast.parse("def f():\n    from hackboot.objectstore import engine\n    return engine._buckets\n"
                     "def g():\n    from hackboot.objectstore.sigv4 import _parse\n")
    deps, private, aliases = _imports(tree)
    assert deps == {"engine", "sigv4"} and private == ["sigv4._parse"] and aliases == {"engine": "engine"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
