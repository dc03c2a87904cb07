"""The package's rooms import one way: from the public face down to the engine, never back.

Read from the source with `ast`: module-level imports only (one inside a function runs later,
or never, to keep a heavy library off a path that does not need it), and those under
`if TYPE_CHECKING:` only for circles, where a type-only circle is a circle all the same.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import ladle

PACKAGE = Path(ladle.__file__).parent

# each room, and the rooms it may import (besides itself); the ground floor is open to all
GROUND = {"errors", "envconfig", "devices"}
MAY_IMPORT = {
    "errors": set(),
    "envconfig": set(),
    "devices": set(),
    "engine": set(),
    "protocol": set(),
    "store": set(),
    "messages": {"protocol"},
    "tools": {"protocol", "engine"},
    "cores": {"tools", "protocol", "engine", "messages"},
    "model": {"cores", "protocol", "engine", "messages", "tools"},
    "builders": {"model", "cores", "engine", "store", "tools"},
    "perplexity": {"model"},
    "manager": {"protocol", "store"},
    "server": {"builders", "model", "cores", "protocol", "engine", "store", "manager", "tools"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, *, typing: bool = False) -> set[str]:
    """The `ladle.*` modules `path` imports when it is imported (or type-checked, if `typing`)."""
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.body if typing else node.orelse)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("ladle"))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ladle"):
                module = node.module or ""
                for alias in node.names:  # `from ladle import envconfig` imports a module
                    sub = f"{module}.{alias.name}"
                    is_module = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py")
                    found.add(sub if is_module.is_file() else module)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def _room(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


GRAPH = {_module_name(p): _top_level_imports(p) for p in PACKAGE.rglob("*.py")}
TYPED_GRAPH = {_module_name(p): _top_level_imports(p, typing=True) for p in PACKAGE.rglob("*.py")}


def test_every_room_is_known() -> None:
    rooms = {_room(m) for m in GRAPH} - {"", "__main__", "cli"}
    assert rooms == set(MAY_IMPORT), "a new room needs its place in MAY_IMPORT"


def test_no_room_imports_upward() -> None:
    wrong = []
    for module, imports in sorted(GRAPH.items()):
        room = _room(module)
        if room not in MAY_IMPORT:  # the package itself, `python -m ladle` and the CLI: the top
            continue
        allowed = MAY_IMPORT[room] | GROUND | {room}
        wrong += [f"{module} -> {i}" for i in sorted(imports) if _room(i) not in allowed]
    assert wrong == []


def test_store_and_protocol_stand_alone() -> None:
    """Wire types and model files are read by clients that run no model: no torch here."""
    for module, imports in GRAPH.items():
        if _room(module) in ("store", "protocol"):
            assert {_room(i) for i in imports} <= GROUND | {_room(module)}, module


def test_no_module_imports_in_a_circle() -> None:
    # a package's __init__ runs before its modules, so a module's edge to its own package
    # (`from ladle.manager import service`) is no circle
    graph = {m: {i for i in imports if i in GRAPH and i != m} for m, imports in TYPED_GRAPH.items()}
    graph = {m: deps - {p for p in deps if m.startswith(f"{p}.")} for m, deps in graph.items()}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the circle
