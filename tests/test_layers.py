"""Imports flow one way (CONTRIBUTING.md, Layout): a module imports only from its own layer or below, and the
package has no import cycle. Every ``import`` counts, inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "diffsamp"

# top to bottom; a module's layer is that of its first dotted component under diffsamp
LAYERS: list[tuple[str, ...]] = [
    ("__init__", "__main__"),  # the package's public face re-exports from below
    ("cli",),
    ("training", "metrics"),
    ("api",),
    ("samplers",),
    ("models", "data"),
    ("io", "images", "weights", "dist", "_version"),
]
RANK = {name: len(LAYERS) - i for i, names in enumerate(LAYERS) for name in names}


def modules() -> dict[str, Path]:
    """Dotted name → file for every module of the package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def layer(module: str) -> int:
    parts = module.split(".")
    return RANK["__init__"] if len(parts) == 1 else RANK[parts[1]]


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every import of a diffsamp module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "diffsamp"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "diffsamp":
            for a in node.names:  # `from diffsamp.x import y` imports module diffsamp.x.y when there is one
                sub = f"{node.module}.{a.name}"
                found.append((sub if sub in known else node.module, node.lineno))
    return found


def graph() -> dict[str, list[tuple[str, int]]]:
    known = modules()
    return {name: imports(path, known) for name, path in known.items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)


def test_imports_only_go_down():
    known = modules()
    bad = []
    for name, edges in graph().items():
        for target, line in edges:
            if layer(target) > layer(name):
                bad.append(f"{known[name].relative_to(PKG.parent)}:{line}: {name} imports {target} (a higher layer)")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    known = modules()
    edges = {n: {t for t, _ in e if t in known and t != n} for n, e in graph().items()}
    lines = {(n, t): line for n, e in graph().items() for t, line in e}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n, [])
    msgs = []
    for cyc in cycles:
        steps = [f"{known[a].relative_to(PKG.parent)}:{lines[(a, b)]} → {b}" for a, b in zip(cyc, cyc[1:])]
        msgs.append("cycle: " + "; ".join(steps))
    assert not msgs, "\n".join(msgs)
