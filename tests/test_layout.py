"""The package's architecture, checked on its source: imports go one way, with no cycle.

Layers, lowest first (a module may import its own layer and the layers below it):
functional (the math) ← kernels (dispatch and backends) ← nn (modules) ← convert / deploy / optim /
precision / parametrizations ← experiments (the harness). Every import counts, function-level ones
included, so a cycle cannot be dodged by importing on use. No private name (``_x``) is imported
from another package.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "normmatters"

RANK = {"functional": 0, "kernels": 1, "nn": 2, "parametrizations": 3, "convert": 3, "deploy": 3,
        "optim": 3, "precision": 3, "experiments": 4, "__main__": 5}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import in ``path``, absolute names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "normmatters":
                    found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "normmatters":
                found.append((target, [a.name for a in node.names], node.lineno))
    return found


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _edges():
    edges = defaultdict(set)
    where = {}
    private = []
    for path in sorted(SRC.rglob("*.py")):
        src_top = _top(_module_name(path))
        if src_top is None:  # normmatters/__init__.py re-exports the public API
            continue
        for target, names, line in _imports(path):
            dst_top = _top(target)
            # `from normmatters import functional` names a subpackage
            if dst_top is None:
                for name in names:
                    if name in RANK:
                        dst_top = name
                        if dst_top != src_top:
                            edges[src_top].add(dst_top)
                            where.setdefault((src_top, dst_top), f"{path.relative_to(SRC)}:{line}")
                continue
            if dst_top != src_top:
                edges[src_top].add(dst_top)
                where.setdefault((src_top, dst_top), f"{path.relative_to(SRC)}:{line}")
                private += [f"{path.relative_to(SRC)}:{line} imports {target}.{n}"
                            for n in names if n.startswith("_") and not n.startswith("__")]
                private += [f"{path.relative_to(SRC)}:{line} imports {target}"
                            for part in target.split(".")[2:] if part.startswith("_")
                            and not part.startswith("__")]
    return edges, where, private


def test_every_package_has_a_layer():
    tops = {_top(_module_name(p)) for p in SRC.rglob("*.py")} - {None}
    assert tops <= set(RANK), f"packages without a layer in this test: {sorted(tops - set(RANK))}"


def test_imports_go_down_the_layers():
    edges, where, _ = _edges()
    upward = [f"{a} → {b} ({where[a, b]})" for a in edges for b in edges[a] if RANK[b] > RANK[a]]
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_no_import_cycle_between_packages():
    edges, where, _ = _edges()
    # Tarjan's strongly connected components
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(comp)

    for v in list(edges):
        if v not in index:
            visit(v)
    cycles = [sorted(c) for c in sccs if len(c) > 1]
    detail = [f"{a} → {b} ({where[a, b]})" for c in cycles for a in c for b in edges[a] if b in c]
    assert not cycles, f"import cycles {cycles}:\n" + "\n".join(sorted(detail))


def test_no_private_name_crosses_a_package():
    _, _, private = _edges()
    assert not private, "private names imported from another package:\n" + "\n".join(private)


@pytest.mark.parametrize("text", ["SPEC §", "shared/SPEC", "../shared"])
def test_sources_cite_the_paper_not_internal_documents(text):
    hits = [f"{p.relative_to(SRC)}" for p in SRC.rglob("*") if p.is_file() and p.suffix in (".py", ".cpp", ".md")
            and text in p.read_text(encoding="utf-8")]
    assert not hits, f"{text!r} cited in {hits}"
