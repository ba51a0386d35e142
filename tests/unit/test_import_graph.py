"""The import graph keeps its shape: `core` imports no service, and services import each other one way only.

Every `import` and `from … import` in `src/hackboot/**/*.py` counts, at module level or inside a
function (a lazy import is still a dependency; it only hides a cycle from the interpreter until the
day it runs), and so do `importlib.import_module("hackboot.…")` / `__import__("hackboot.…")` calls
on a literal name. Services register hooks with `core` instead (see CONTRIBUTING.md).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support import import_cycles

SRC = Path(__file__).resolve().parents[2] / "src" / "hackboot"

# Top-level packages of hackboot that are not services, and why they may import services.
NOT_SERVICES = {
    "core": "the shared kernel: imports no service (the first rule below)",
    "cli": "a client of the REST API through the SDK",
    "sdk": "a client of the REST API",
    "migrations": "Alembic's environment: sees every service's tables through hackboot.models",
}
# Top-level modules that compose services (importing one imports every service it names).
COMPOSERS = {
    "server": "composes the apps and starts the workers",
    "models": "imports every service's tables for Alembic and the tests",
}

# (importer package, imported package) pairs allowed although they close a cycle, with the reason.
# Ideally none: a service that must reach back registers a hook with the other one instead.
ALLOWED_CYCLE_EDGES: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    module: str  # importing module, e.g. hackboot.compute.service
    target: str  # imported module, e.g. hackboot.images.service
    where: str  # path:line
    dynamic: bool = False  # importlib.import_module / __import__: `target` is only the literal start of the name

    @property
    def source_package(self) -> str:
        return package_of(self.module)

    @property
    def target_package(self) -> str:
        return package_of(self.target)


def package_of(module: str) -> str:
    """`hackboot.compute.service` → `compute`; `hackboot.server` → `server`; `hackboot` → ``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _literal_prefix(node: ast.expr) -> str | None:
    """The constant start of a string argument: "hackboot.x" or f"hackboot.{name}.api" → its prefix."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        first = node.values[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
    return None


def imports_of(path: Path, module: str | None = None) -> Iterator[Import]:
    """The imports in one file; `module` is its dotted name (default: from its place under src/)."""
    module = module or module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(SRC.parent).as_posix() if path.is_relative_to(SRC.parent) else path.name
    for node in ast.walk(tree):  # every scope: functions, methods, `if TYPE_CHECKING` blocks
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, where)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield Import(module, target, where)
            if target == "hackboot":
                # `from hackboot import compute`: each name is a package of its own
                for alias in node.names:
                    yield Import(module, f"hackboot.{alias.name}", where)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                prefix = _literal_prefix(node.args[0]) or ""
                yield Import(module, prefix.rstrip(".") or "?", where, dynamic=True)


def all_imports() -> list[Import]:
    """Every import of a hackboot module, and every dynamic import (its target may be one)."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        found.extend(i for i in imports_of(path)
                     if i.dynamic or i.target == "hackboot" or i.target.startswith("hackboot."))
    return found


def services() -> set[str]:
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return packages - set(NOT_SERVICES)


def service_graph(imports: list[Import]) -> dict[tuple[str, str], list[str]]:
    """Package-level edges between services, each with the places that make it.

    Importing a composer (`import hackboot.models`) imports every service it imports: it counts as
    an edge to each of them, so a cycle cannot hide behind it.
    """
    known = services()
    through: dict[str, set[str]] = {c: {i.target_package for i in imports if i.source_package == c} & known
                                    for c in COMPOSERS}
    edges: dict[tuple[str, str], list[str]] = {}
    for i in imports:
        a, b = i.source_package, i.target_package
        for target in through.get(b, {b}):
            if a in known and target in known and a != target:
                edges.setdefault((a, target), []).append(i.where if b == target else f"{i.where} (via {b})")
    return edges


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one package, each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    return import_cycles(graph)


# --- the rules -------------------------------------------------------------------------------------

def test_the_graph_is_read() -> None:
    """The parser sees what it must (a guard against a test that silently checks nothing)."""
    imports = all_imports()
    assert {"identity", "events", "catalog", "compute", "images", "volumes", "objectstore"} <= services()
    assert any(i.module == "hackboot.server" and i.target_package == "compute" for i in imports)
    assert any(i.source_package == "core" and i.target.startswith("hackboot.core.") for i in imports)
    assert cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]
    assert cycles({("a", "b"), ("b", "c")}) == []


def test_function_level_and_relative_imports_are_seen(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from hackboot.events.models import AuditRecord\n"
                     "import importlib\nimportlib.import_module(f'hackboot.images.{x}')\n"
                     "from ..compute import service\nfrom hackboot import volumes\n")
    refused = {i.target for i in imports_of(probe, "hackboot.core.probe") if not _core_may_import(i)}
    assert refused == {"hackboot.events.models", "hackboot.images", "hackboot.compute", "hackboot.volumes"}
    assert not _core_may_import(Import("hackboot.core.x", "?", "x.py:1", dynamic=True))  # a computed name
    assert _core_may_import(Import("hackboot.core.x", "hackboot.core.db", "x.py:1", dynamic=True))


def _core_may_import(i: Import) -> bool:
    if i.dynamic:  # a name built at run time could be any service's
        return i.target.startswith("hackboot.core.") or not i.target.startswith(("hackboot", "?"))
    return i.target_package in ("core", "")


def test_core_imports_no_service() -> None:
    offenders = [f"{i.where}: {i.module} imports {i.target}{' (dynamically)' if i.dynamic else ''}"
                 for i in all_imports() if i.source_package == "core" and not _core_may_import(i)]
    assert not offenders, ("core must not import services, clients or composers; let the service register "
                           "a hook with core instead:\n" + "\n".join(offenders))


def test_no_cycles_between_services() -> None:
    edges = service_graph(all_imports())
    stale = [edge for edge in ALLOWED_CYCLE_EDGES if edge not in edges]
    assert not stale, f"allowed exceptions that no longer occur (remove them): {stale}"
    checked = {e for e in edges if e not in ALLOWED_CYCLE_EDGES}
    found = cycles(checked)
    details = []
    for component in found:
        for (a, b), places in sorted(edges.items()):
            if a in component and b in component:
                details.append(f"  {a} → {b}: {', '.join(places[:3])}")
    assert not found, (f"import cycles between services {found}; one direction must go (register a hook "
                       "with the other service instead):\n" + "\n".join(details))
