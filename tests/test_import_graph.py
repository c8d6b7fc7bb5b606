"""The import graph of the ``verifier`` package, read from the source with ``ast``: it has no
cycle, and no function imports a ``verifier`` module (an import inside a function is how a
cycle gets hidden).

Edges: every ``import`` / ``from ... import`` statement of a module, at module level or inside a
function (``if TYPE_CHECKING:`` blocks excepted: they never run), relative imports resolved.
``import a.b`` is an edge to ``a.b`` (``a/b/__init__.py`` for a package); ``from a import n`` is
an edge to the submodule ``a.n`` when there is one, else to ``a``. Importing ``a.b`` runs the
package ``a`` first, so the cycle check adds an edge to every package above an imported module
(``with_packages``). An edge from a module to a package that contains it (``from . import x``
inside that package) is left out: Python runs a package's ``__init__`` before any of its modules
anyway, so that edge can be neither added nor removed.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "verifier"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Known offenders, all in files that are being rewritten for issue 17 (the bound traversals,
# branch and bound, the API, weight perturbations): each entry must still be there (a stale
# entry fails the test, so that the sets only shrink, to empty); anything not listed fails.
# Edges (importer, imported) left out of the cycle check, each closing known cycles:
KNOWN_CYCLE_EDGES: set = set()
# Function-level imports (importer, imported) of verifier modules:
KNOWN_FUNCTION_IMPORTS: set = set()

# The command line keeps ``verifier --help`` free of torch (tests/cli/test_cli_main.py
# ``test_help_does_not_import_torch``): a module under verifier.cli may import, inside the
# command that needs it, a verifier module that imports torch or numpy at module level.
STARTUP_LAZY_PREFIX = f"{PACKAGE}.cli."
HEAVY = {"torch", "numpy"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """-> (import node, inside a function?) for every import that can run."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    yield from walk(ast.Module(body=[sub], type_ignores=[]), in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda))
            yield from walk(child, inner)
    yield from walk(tree, False)


def _targets(module: str, is_package: bool, node, modules) -> tuple[list[str], set[str]]:
    """-> (verifier modules this import statement runs, other top-level packages it names)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
        found, external = [], set()
        for name in names:
            if name.split(".")[0] != PACKAGE:
                external.add(name.split(".")[0])
                continue
            while name not in modules:         # ``import verifier.x.attr`` cannot be; be safe
                name = name.rpartition(".")[0]
            found.append(name)
        return found, external
    if node.level == 0:
        base = node.module
        if base.split(".")[0] != PACKAGE:
            return [], {base.split(".")[0]}
    else:
        here = module.split(".") if is_package else module.split(".")[:-1]
        up = node.level - 1
        assert up < len(here), f"{module}: relative import beyond the package"
        here = here[:len(here) - up]
        base = ".".join(here + ([node.module] if node.module else []))
    assert base in modules, f"{module}: imports {base}, which is not a module of {PACKAGE}"
    found = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        found.append(sub if sub in modules else base)
    return found, set()


def import_graph():
    """-> (edges {module: {module}}, the module-level edges alone, function-level imports
    {(importer, imported)}, the top-level packages each module imports at module level)."""
    modules = _modules()
    edges = {m: set() for m in modules}
    module_level = {m: set() for m in modules}
    function_level, external = set(), {m: set() for m in modules}
    for m, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node, in_function in _imports(tree):
            targets, ext = _targets(m, path.name == "__init__.py", node, modules)
            if not in_function:
                external[m] |= ext
            for t in targets:
                if m == t or m.startswith(t + "."):   # the module itself, or a package above it
                    continue
                edges[m].add(t)
                if in_function:
                    function_level.add((m, t))
                else:
                    module_level[m].add(t)
    return edges, module_level, function_level, external


def with_packages(edges) -> dict[str, set[str]]:
    """``edges`` plus, for every edge m -> a.b.c, the edges m -> a.b and m -> a (the packages
    that run first), except to packages that contain m."""
    out = {m: set(ts) for m, ts in edges.items()}
    for m, ts in edges.items():
        for t in ts:
            parts = t.split(".")
            for i in range(1, len(parts)):
                p = ".".join(parts[:i])
                if not (m == p or m.startswith(p + ".")):
                    out[m].add(p)
    return out


def find_cycle(edges) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (iterative depth-first search)."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {m: WHITE for m in edges}
    for start in sorted(edges):
        if color[start] != WHITE:
            continue
        stack = [(start, iter(sorted(edges[start])))]
        path = [start]
        color[start] = GREY
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = BLACK
                stack.pop()
                path.pop()
            elif color[nxt] == GREY:
                return path[path.index(nxt):] + [nxt]
            elif color[nxt] == WHITE:
                color[nxt] = GREY
                stack.append((nxt, iter(sorted(edges[nxt]))))
                path.append(nxt)
    return None


def _heavy_at_import(edges_module_level, external) -> set[str]:
    """Modules that import torch or numpy, themselves or through a verifier module, at import."""
    edges_module_level = with_packages(edges_module_level)
    heavy = {m for m, ext in external.items() if ext & HEAVY}
    changed = True
    while changed:
        changed = False
        for m, ts in edges_module_level.items():
            if m not in heavy and ts & heavy:
                heavy.add(m)
                changed = True
    return heavy


def test_the_graph_is_read():
    """The reader sees what is there (guards the two tests below against reading nothing)."""
    edges, module_level, function_level, external = import_graph()
    assert "verifier.api" in edges["verifier.cli.bounds"]   # lazily, inside cmd_bounds
    assert "verifier.api" not in module_level["verifier.cli.bounds"]
    assert ("verifier.cli.bounds", "verifier.api") in function_level
    assert "verifier.bound_types" in module_level["verifier.api"] and "torch" in external["verifier.api"]
    assert "verifier.cli.main" in edges["verifier.cli"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert with_packages({"x": {"p.q.r"}, "p.q.s": {"p.q.r"}}) == {
        "x": {"p.q.r", "p.q", "p"}, "p.q.s": {"p.q.r"}}


def test_no_import_cycles():
    edges, _, _, _ = import_graph()
    stale = {e for e in KNOWN_CYCLE_EDGES if e[1] not in edges.get(e[0], ())}
    assert not stale, f"these known edges are gone; remove them from KNOWN_CYCLE_EDGES: {stale}"
    for a, b in KNOWN_CYCLE_EDGES:
        edges[a].discard(b)
    cycle = find_cycle(with_packages(edges))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_level_imports_of_verifier_modules():
    _, module_level, function_level, external = import_graph()
    stale = KNOWN_FUNCTION_IMPORTS - function_level
    assert not stale, f"these imports are gone; remove them from KNOWN_FUNCTION_IMPORTS: {stale}"
    heavy = _heavy_at_import(module_level, external)
    bad = sorted(
        (m, t) for m, t in function_level - KNOWN_FUNCTION_IMPORTS
        if not (m.startswith(STARTUP_LAZY_PREFIX) and with_packages({m: {t}})[m] & heavy))
    assert not bad, ("imports of verifier modules inside functions (import them at the top; "
                     "if that makes a cycle, move code so that it does not):\n"
                     + "\n".join(f"  {m} imports {t}" for m, t in bad))
