"""Import layering of vaultfs/ and cli/, read from the source (the AST), not from sys.modules.

An edge A → B is any ``import`` or ``from … import`` of B in A, at the top level or inside a
function (a lazy import is still a dependency), except under ``if TYPE_CHECKING:`` (those
exist for annotations only and never run). The layers, bottom up (docs/design.md):

- pure format modules: bytes in, bytes out, no I/O policy;
- the engine: the vault and what reads, checks, repairs or prunes it, and the remote stack;
- the FUSE layer: the mount, which may use the engine but is never used by it;
- the CLI, which nothing in vaultfs/ imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vaultfs", "cli")

#: bytes in, bytes out: the on-remote format
FORMAT = set(
    "chunker envelope erasure merkle segment manifest audittag names errors kdf indexblocks".split()
)
#: what the format modules must not reach
ABOVE_FORMAT = set(
    "vault fs restore repair verify prune sealer daemon livetree cache snapview backends remotes"
    " chunkreader readcache".split()
)
#: the mount
FUSE = {"fs", "livetree", "cache", "snapview", "daemon", "chunkreader", "readcache"}
#: must work without a mount
ENGINE = {"vault", "restore", "repair", "verify", "prune", "sealer", "chain"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports (see the module docstring for what counts)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:
                    visit_one(stmt)
            else:
                visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                if f"{module}.{alias.name}" in MODULES:  # `from pkg import module`
                    found.add(f"{module}.{alias.name}")
                elif module in MODULES:
                    found.add(module)
        visit(node)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _unit(name: str) -> str:
    """The top-level module or package a module belongs to (vaultfs.vault.commit →
    vaultfs.vault): the layering rules speak of these."""
    return ".".join(name.split(".")[:2])


#: GRAPH with each package collapsed into one node (edges inside a package dropped)
UNITS: dict[str, set[str]] = {}
for _name, _deps in GRAPH.items():
    UNITS.setdefault(_unit(_name), set()).update(
        _unit(d) for d in _deps if _unit(d) != _unit(_name)
    )


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def connect(v: str) -> None:
        order[v] = low[v] = len(order)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in order:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in order:
            connect(v)
    return out


def _reach(start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for w in UNITS[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def _in(pkg: str, names: set[str]) -> set[str]:
    return {f"{pkg}.{n}" for n in names}


def test_the_graph_sees_lazy_imports_and_skips_type_checking_ones() -> None:
    """The reader itself: top-level, function-level and `from . import` edges are found;
    an import under ``if TYPE_CHECKING:`` is not."""
    assert "vaultfs.sealer" in GRAPH["vaultfs.vault.writer"]  # top level
    assert "vaultfs.fs" in GRAPH["vaultfs.daemon"]  # inside a function
    assert "vaultfs.envelope" in GRAPH["vaultfs.manifest"]  # from . import envelope
    assert "vaultfs.vault" not in GRAPH["vaultfs.verify"]  # TYPE_CHECKING only
    assert "vaultfs.index.segments" in GRAPH["vaultfs.index.manifests"]  # from . import x
    assert _in("vaultfs", FORMAT | ABOVE_FORMAT | FUSE | ENGINE) <= set(MODULES)


def test_no_import_cycle_in_vaultfs() -> None:
    """No cycle between modules, nor between top-level modules and packages."""
    for graph in (GRAPH, UNITS):
        sub = {
            v: {w for w in ws if w.startswith("vaultfs.")}
            for v, ws in graph.items()
            if v.startswith("vaultfs.")
        }
        assert _cycles(sub) == []


def test_no_import_cycle_in_cli() -> None:
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("module", sorted(FORMAT))
def test_format_modules_import_nothing_from_the_engine(module: str) -> None:
    assert _reach(f"vaultfs.{module}") & _in("vaultfs", ABOVE_FORMAT) == set()


def test_vaultfs_never_imports_the_cli() -> None:
    edges = {(v, w) for v, ws in GRAPH.items() for w in ws}
    assert {(v, w) for v, w in edges if v.startswith("vaultfs") and w.startswith("cli")} == set()


@pytest.mark.parametrize("module", sorted(ENGINE))
def test_the_engine_never_imports_the_fuse_layer(module: str) -> None:
    assert _reach(f"vaultfs.{module}") & _in("vaultfs", FUSE) == set()
