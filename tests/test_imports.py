"""The package's import graph: packages by job in layers, each importing only from itself and
the layers below it, and no cycle. Every ``from dlrm... import`` counts, at the top of a
module, inside a function or under ``TYPE_CHECKING`` alike (an import moved into a function
to dodge a cycle is still one).

The layer order, lowest first, is written here once (docs/architecture.md shows it); the
units of one layer do not import each other."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

LAYERS = [
    ["dlrm", "dlrm.errors"],
    ["dlrm.utils", "dlrm.metrics"],
    ["dlrm.schema"],
    ["dlrm.config"],
    ["dlrm.rows"],
    ["dlrm.preprocess", "dlrm.data", "dlrm.synth"],
    ["dlrm.train"],
    ["dlrm.serve"],
    ["dlrm.experiments"],
    ["dlrm.cli", "dlrm.components"],
    ["dlrm.__main__"],
]


def _unit(module: str) -> str:
    """The package or top-level module of the layers that ``module`` belongs to."""
    return ".".join(module.split(".")[:2])


def _layer_of() -> dict[str, int]:
    return {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a unit of its own layer or above it."""
    layer = _layer_of()
    return sorted(f"{m} ({layer[_unit(m)]}) imports {t} ({layer[_unit(t)]})"
                  for m, targets in graph.items() for t in targets
                  if _unit(t) != _unit(m) and layer[_unit(t)] >= layer[_unit(m)])


def _graph() -> dict[str, set[str]]:
    modules = {}
    for path in (REPO / "dlrm").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t not in (name, "dlrm")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its modules in order, the first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_module_imports_itself_back():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    layer = _layer_of()
    assert sorted(m for m in _graph() if _unit(m) not in layer) == []


def test_no_package_imports_one_of_its_layer_or_above():
    assert _upward(_graph()) == []


def test_the_layer_check_sees_an_upward_import():
    graph = {"dlrm.rows.blocks": {"dlrm.schema.features", "dlrm.train.model"},
             "dlrm.data.loader": {"dlrm.synth.criteo", "dlrm.data.batches"},
             "dlrm.train.model": {"dlrm.config"}}
    assert _upward(graph) == ["dlrm.data.loader (5) imports dlrm.synth.criteo (5)",
                              "dlrm.rows.blocks (4) imports dlrm.train.model (6)"]


def test_the_cycle_finder_finds_one(tmp_path: Path):
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert "dlrm.serve.model_dir" in _graph()["dlrm.serve.export"]  # the graph is read, not empty
