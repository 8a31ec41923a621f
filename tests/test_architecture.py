"""The package's import graph: imports run one way (model and data at the bottom, CLI on top), and there is no loop."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "anomalib_moleflow"
ROOT = "anomalib_moleflow"

#: Layers, bottom first. A module may import from its own component and from components of lower layers only.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"io", "errors", "parser", "metrics", "compat", "runtime", "deploy", "distributed"}),
    frozenset({"checkpoint"}),
    frozenset({"models", "data"}),
    frozenset({"baselines", "reports"}),
    frozenset({"engine"}),
    frozenset({"benchmark", "ablation"}),
    frozenset({"cli"}),
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The module that ``import name`` executes last, within the package (``None`` outside it)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """Package modules imported anywhere in ``module`` (lazy imports inside functions included)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            resolved = _resolve(target) if target.startswith(ROOT) else None
            if resolved and resolved != ROOT and resolved != module:
                found.add(resolved)
    return found


def component(module: str) -> str:
    """``anomalib_moleflow.engine.continual`` -> ``engine``."""
    return module.split(".")[1]


def layer(module: str) -> int:
    """Index of the module's layer."""
    name = component(module)
    for index, members in enumerate(LAYERS):
        if name in members:
            return index
    msg = f"{module}: component '{name}' is in no layer; add it to LAYERS."
    raise AssertionError(msg)


GRAPH: dict[str, set[str]] = {module: imports_of(module) for module in MODULES if module != ROOT}


def test_the_graph_sees_the_package() -> None:
    assert {"anomalib_moleflow.cli.main", "anomalib_moleflow.models.moleflow.lightning_model"} <= set(GRAPH)
    assert "anomalib_moleflow.engine.runner" in GRAPH["anomalib_moleflow.cli.main"]
    assert "anomalib_moleflow.models.moleflow.torch_model" in GRAPH["anomalib_moleflow.models.moleflow.lightning_model"]


def test_the_cli_dispatches_to_lower_layers_only() -> None:
    from anomalib_moleflow.cli.main import COMMANDS

    for module, parser, function, _ in COMMANDS.values():
        assert module in MODULES, module  # the command table names real modules of the package
        assert layer(module) < layer("anomalib_moleflow.cli.main"), module
        loaded = importlib.import_module(module)
        assert callable(getattr(loaded, parser)), (module, parser)
        assert callable(getattr(loaded, function)), (module, function)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_run_one_way(module: str) -> None:
    wrong = sorted(
        target
        for target in GRAPH[module]
        if component(target) != component(module)
        and (layer(target) > layer(module) or (layer(target) == layer(module)))
    )
    assert not wrong, f"{module} imports {wrong} from its own or a higher layer"


def test_no_import_loop() -> None:
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        if module in stack:
            loop = [*stack[stack.index(module) :], module]
            pytest.fail(f"import loop: {' -> '.join(loop)}")
        if module in done:
            return
        for target in sorted(GRAPH.get(module, ())):
            visit(target, [*stack, module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])


def test_a_wrong_import_is_caught() -> None:
    """The checks above can fail: a model module importing the engine breaks the layering rule."""
    source = "from anomalib_moleflow.engine import ContinualEngine\n"
    tree = ast.parse(source)
    node = tree.body[0]
    assert isinstance(node, ast.ImportFrom)
    target = _resolve(f"{node.module}.{node.names[0].name}")
    assert target == "anomalib_moleflow.engine"
    assert layer(target) > layer("anomalib_moleflow.models.moleflow.lightning_model")


def test_docs_architecture_lists_the_layers_as_checked_here() -> None:
    """docs/architecture.md's layer table names every component of LAYERS in the same layer."""
    import re

    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| ([^|]+) \|", text, flags=re.MULTILINE))
    assert len(rows) == len(LAYERS)
    for index, members in enumerate(LAYERS):
        listed = set(re.findall(r"`([a-z_]+)(?:\.py|/)`", rows[str(index)]))
        assert listed == set(members), (index, listed, members)
