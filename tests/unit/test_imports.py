"""The package's import graph has no circles (architecture: layers import downwards).

Every ``import`` and ``from ... import`` in ``pyproxy/`` counts, wherever it sits:
at module level, inside a function (a lazy import is still a dependency) and under
``if TYPE_CHECKING:`` (a type-only import still means each side knows the other's
concrete type). Only edges listed in ``ALLOWED_TYPE_ONLY`` are exempt, each with the
reason it stays; anything else that closes a circle fails this test. The exempt edges
form one loop, inside ``upstream/``: the cluster and the parts it composes (connection
pool, balancer, outlier detector), which name ``ClusterEndpoint``/``Cluster`` in
annotations; at run time imports go one way (cluster -> connection, settings).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pyproxy"

# (importer, imported): type-only edges that are allowed to close a circle.
ALLOWED_TYPE_ONLY: dict[tuple[str, str], str] = {
    # The balancer and the outlier detector name the endpoint/cluster types they are
    # handed in their annotations; the cluster constructs them. Two Protocols would
    # close it, at the cost of restating ClusterEndpoint's fields in two places.
    ("pyproxy.upstream.lb", "pyproxy.upstream.cluster"): "annotations only",
    ("pyproxy.upstream.outlier", "pyproxy.upstream.cluster"): "annotations only",
    # The connection hands itself back to its pool when it closes and is typed
    # against the endpoint that owns it; the Exchange and the mirror read that
    # endpoint (release, cluster, outlier counters) through ``conn.endpoint``.
    ("pyproxy.upstream.connection", "pyproxy.upstream.cluster"): "annotations only",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, name: str, modules: set[str]) -> dict[str, bool]:
    """The pyproxy modules ``path`` imports -> True when every import of it is type-only."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges: dict[str, bool] = {}

    def add(target: str, type_only: bool) -> None:
        # "from a.b import c" names either the module a.b.c or an attribute of a.b.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            edges[target] = edges.get(target, True) and type_only

    def visit(node: ast.AST, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit_stmt(stmt, True)
                for stmt in child.orelse:
                    visit_stmt(stmt, type_only)
            else:
                visit_stmt(child, type_only)

    def visit_stmt(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pyproxy"):
                    add(alias.name, type_only)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("pyproxy"):
                for alias in node.names:
                    add(f"{mod}.{alias.name}", type_only)
        else:
            visit(node, type_only)

    visit(ast.parse(path.read_text(), str(path)), False)
    return edges


def import_graph() -> dict[str, dict[str, bool]]:
    """module -> {imported pyproxy module: True when every import of it is type-only}."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, name, set(paths)) for name, path in paths.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; only components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def connect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_graph_sees_module_level_lazy_and_type_only_imports() -> None:
    graph = import_graph()
    # Module level, relative.
    assert graph["pyproxy.http.exchange"]["pyproxy.errors"] is False
    # Under TYPE_CHECKING.
    assert graph["pyproxy.upstream.lb"]["pyproxy.upstream.cluster"] is True
    # Inside a function (cli.py imports the process lazily to keep `--help` fast).
    assert "pyproxy.process" in graph["pyproxy.cli"]


def test_the_package_has_no_import_circles() -> None:
    graph = import_graph()
    allowed = {edge for edge in ALLOWED_TYPE_ONLY if graph.get(edge[0], {}).get(edge[1])}
    pruned = {m: {t for t in targets if (m, t) not in allowed} for m, targets in graph.items()}
    assert strongly_connected(pruned) == []


def test_the_only_type_only_loop_is_the_upstream_cluster_and_its_parts() -> None:
    graph = import_graph()
    assert strongly_connected({m: set(t) for m, t in graph.items()}) == [[
        "pyproxy.upstream.cluster", "pyproxy.upstream.connection", "pyproxy.upstream.lb",
        "pyproxy.upstream.outlier"]]


def test_every_allowed_edge_still_exists_and_is_type_only() -> None:
    # An exemption for an edge that is gone (or became a runtime import) must go too.
    graph = import_graph()
    for (src, dst), why in ALLOWED_TYPE_ONLY.items():
        assert graph[src].get(dst) is True, f"{src} -> {dst} ({why})"
