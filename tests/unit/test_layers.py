"""The house's floors: every import inside medmvl_cli points down (or stays in its own subpackage).

Floors, top to bottom (docs/model.md, "Where things live"):

    cli -> workflows -> demo, serve -> engine, interop -> inference -> runs -> evaluation -> data
        -> model -> config -> errors, progress, threads, constants

Modules on the same floor do not import each other (demo and serve, engine and interop). The
package root (`medmvl_cli/__init__.py`: the version, the public API) may be imported from anywhere.
Lazy imports inside functions count too: a circle that only closes at run time is still a circle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "medmvl_cli"

FLOORS = [
    ["__main__"],
    ["cli"],
    ["workflows"],
    ["demo", "serve"],
    ["engine", "interop"],
    ["inference"],
    ["runs"],
    ["evaluation"],
    ["data"],
    ["model"],
    ["config"],
    ["errors", "progress", "threads", "constants"],
]
FLOOR = {unit: len(FLOORS) - i for i, units in enumerate(FLOORS) for unit in units}


def _unit_of_module(module: str) -> str | None:
    """The floor unit of a dotted module name inside the package (None: the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(file: Path) -> list[tuple[int, str]]:
    """(line, imported medmvl_cli module) for every import in `file`, relative ones resolved."""
    rel = file.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1])  # the package a relative import starts from (same for __init__)
    found = []
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), filename=str(file))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                dotted = f"{module}.{alias.name}"
                found.append((node.lineno, dotted if _is_module(dotted) else module))
    return [(line, m) for line, m in found if m == "medmvl_cli" or m.startswith("medmvl_cli.")]


def package_edges() -> list[tuple[str, int, str, str, str]]:
    """(file relative to the package, line, imported module, from unit, to unit) across units."""
    edges = []
    for file in sorted(PACKAGE.rglob("*.py")):
        rel = file.relative_to(PACKAGE)
        if rel == Path("__init__.py"):
            continue  # the package root: a facade over the floors
        source = rel.parts[0].removesuffix(".py")
        for line, module in imports_of(file):
            target = _unit_of_module(module)
            if target is not None and target != source:
                edges.append((rel.as_posix(), line, module, source, target))
    return edges


def test_every_unit_has_a_floor():
    units = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    missing = sorted(units - FLOOR.keys())
    assert not missing, f"place {missing} on a floor in FLOORS (tests/unit/test_layers.py) and docs/model.md"


def test_imports_point_down():
    upward = [f"medmvl_cli/{file}:{line} imports {module} ({source} -> {target} goes up or sideways)"
              for file, line, module, source, target in package_edges()
              if FLOOR[target] >= FLOOR[source]]
    assert not upward, "\n".join(upward)


def test_no_circle_between_subpackages():
    graph: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], str] = {}
    for file, line, module, source, target in package_edges():
        graph[source].add(target)
        where.setdefault((source, target), f"medmvl_cli/{file}:{line} imports {module}")
    # Depth-first search for a back edge; report the circle with one import per step.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(unit: str) -> list[str] | None:
        state[unit] = 1
        stack.append(unit)
        for nxt in sorted(graph[unit]):
            if state.get(nxt) == 1:
                circle = stack[stack.index(nxt):] + [nxt]
                return [where[(a, b)] for a, b in zip(circle, circle[1:])]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[unit] = 2
        return None

    for unit in sorted(graph):
        if unit not in state and (circle := visit(unit)):
            raise AssertionError("a circle between subpackages:\n" + "\n".join(circle))


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a lazy import of engine from data is found, with its file and line."""
    fake = tmp_path / "medmvl_cli"
    (fake / "data").mkdir(parents=True)
    (fake / "engine").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "data" / "__init__.py").write_text("")
    (fake / "engine" / "__init__.py").write_text("")
    (fake / "engine" / "stages.py").write_text("from ..data import x\n")
    (fake / "data" / "x.py").write_text("def f():\n    from medmvl_cli.engine import stages\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    edges = package_edges()
    assert ("data/x.py", 2, "medmvl_cli.engine.stages", "data", "engine") in edges
    assert ("engine/stages.py", 1, "medmvl_cli.data.x", "engine", "data") in edges
