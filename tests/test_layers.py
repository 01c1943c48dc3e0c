"""The library's layers import only downwards (README, "Library"):

    io → data → observables → metrics, simulation → datasets, models, tokenizers, plotting
       → training, official → studies → widgets, figures, bench, cli (and the notebooks)

Every import of an ``omnijet_lib`` module counts, module-level or inside a function.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "omnijet_lib"

LAYERS = [
    {"io"},
    {"data"},
    {"observables"},
    {"metrics", "simulation"},
    {"datasets", "models", "tokenizers", "plotting"},
    {"training", "official"},
    {"studies"},
    {"widgets", "figures", "bench", "cli"},
]
LEVEL = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path):
    """(line, imported omnijet_lib module as a list of parts) for every import in ``path``."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "omnijet_lib":
                target = node.module.split(".")[1:]
            else:
                continue
            if node.module is None or not target:  # "from . import x": x are modules
                for alias in node.names:
                    yield node.lineno, target + [alias.name]
            else:
                yield node.lineno, target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "omnijet_lib":
                    yield node.lineno, alias.name.split(".")[1:]


def _edges():
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _module_name(path)[0] if _module_name(path) else "__init__"
        for line, target in _imports(path):
            if target:
                yield path, line, unit, target[0]


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert units == set(LEVEL), f"units without a layer: {sorted(units - set(LEVEL))}, stale: {sorted(set(LEVEL) - units)}"


def test_imports_point_only_downwards():
    upward = [f"{path.relative_to(PACKAGE.parent)}:{line} imports omnijet_lib.{target} "
              f"(layer {LEVEL[target]}) from {unit} (layer {LEVEL[unit]})"
              for path, line, unit, target in _edges() if unit in LEVEL and LEVEL[target] > LEVEL[unit]]
    assert not upward, "\n".join(upward)


def test_no_import_cycles_between_units():
    graph = {}
    for _, _, unit, target in _edges():
        if unit != target:
            graph.setdefault(unit, set()).add(target)

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in graph.get(a, ()))

    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a))
    assert not cycles, cycles


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    """The walk above would miss nothing this test file could hide."""
    src = "def f():\n    from ..training.fit import fit\n    from . import base\n"
    path = PACKAGE / "tokenizers" / "_probe_layers.py"
    path.write_text(src)
    try:
        found = [t for _, t in _imports(path)]
    finally:
        path.unlink()
    assert found == [["training", "fit"], ["tokenizers", "base"]]
