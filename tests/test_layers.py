"""The package's layering, read from the source: every import points down, and no module imports itself back.

The layer order is written once, here. A module may import its own layer (its own subpackage)
and any layer below it; never a layer above, nor a layer of the same rank beside it. Every
import statement counts: module level, inside functions, and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qlora_orpo

PACKAGE = Path(qlora_orpo.__file__).parent

# Bottom to top. The package root holds no import statement (its public names resolve lazily
# by name), so it counts as the floor: ``cli`` may read its ``__version__``.
LAYERS: list[tuple[str, ...]] = [
    ("", "core"),
    ("config",),
    ("data",),
    ("models",),
    ("training",),
    ("evaluation",),
    ("export",),
    ("recipes",),
    ("bench",),  # beside the product: it times the recipes and the peer
    ("cli",),
    ("train", "__main__"),  # the public ``qlora_orpo.train.run`` and ``python -m qlora_orpo``
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (dotted, relative to the package root)."""
    here = name.split(".") if name else []
    if path.name != "__init__.py":
        here = here[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module + ".").startswith("qlora_orpo."):
                target = node.module
            else:
                continue
            target = target.removeprefix("qlora_orpo").removeprefix(".")
            # `from .pkg import module` imports the module; `from .module import name` the module
            targets = [f"{target}.{a.name}".lstrip(".") for a in node.names if f"{target}.{a.name}".lstrip(".") in known]
            targets = targets or [target]
        else:
            continue
        for target in targets:
            target = target.removeprefix("qlora_orpo").removeprefix(".")
            if target in known and target != name:
                out.add(target)
    return out


def layer_of(name: str) -> str:
    return name.split(".")[0]


GRAPH = {name: imported_modules(name, path, set(modules())) for name, path in modules().items()}


def test_every_module_has_a_layer():
    missing = sorted(name for name in GRAPH if layer_of(name) not in RANK)
    assert not missing, f"modules outside the layer order (add them to LAYERS): {missing}"


def test_every_import_points_down_or_within_its_layer():
    wrong = []
    for name, targets in GRAPH.items():
        for target in targets:
            own, theirs = layer_of(name), layer_of(target)
            if own == theirs or theirs == "":
                continue
            if RANK[theirs] >= RANK[own]:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports that run up or sideways: " + ", ".join(sorted(wrong))


def test_no_import_cycles():
    """Depth-first search over every module's imports; any back edge is a cycle."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(GRAPH[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_the_loop_knows_only_training():
    """The training loop takes evaluation, checkpoint policy and end-of-run actions from the recipe."""
    assert not {layer_of(t) for t in GRAPH["training.loop"]} & {"evaluation", "export", "recipes", "cli"}


@pytest.mark.parametrize("bad", [("training.loss", "evaluation.report"), ("data.collate", "training.loss")])
def test_the_check_catches_an_upward_import(bad, tmp_path):
    """The checker itself: an import added against the order is reported."""
    name, target = bad
    path = tmp_path / "probe.py"
    path.write_text(f"from qlora_orpo.{target} import x\n")
    targets = imported_modules(name, path, set(modules()))
    assert target in targets and RANK[layer_of(target)] > RANK[layer_of(name)]


def test_public_api_paths_still_work():
    """The README's Python example and the package's lazy names."""
    from qlora_orpo.config import OrpoConfig
    from qlora_orpo.recipes.finetune import run as recipe_run
    from qlora_orpo.train import run

    assert run is recipe_run
    assert OrpoConfig().beta > 0
    assert qlora_orpo.finetune is recipe_run
