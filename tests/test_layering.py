"""The layering of the code, read from its imports (every import, including those inside functions):
pipeline.data -> model -> pipeline.training -> pipeline.evaluation, no import running upward, no cycle."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "model")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Project modules imported by ``path`` (absolute names, resolved to modules where they exist)."""
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            # "from pipeline.data import masking" names a module; "from pipeline.data.masking import Masker" a symbol.
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


GRAPH = _graph()


def _violations(source_prefix: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    found = []
    for module, targets in GRAPH.items():
        if module != source_prefix and not module.startswith(source_prefix + "."):
            continue
        for target in targets:
            if target in allowed:
                continue
            if any(target == f or target.startswith(f + ".") for f in forbidden):
                found.append(f"{module} -> {target}")
    return sorted(found)


def test_the_layout_exists():
    for module in ("pipeline.data.batch", "pipeline.data.corpus", "pipeline.data.masking", "pipeline.data.dataset",
                   "pipeline.training.checkpoint", "pipeline.evaluation.export", "pipeline.errors",
                   "pipeline.__main__", "model.architectures"):
        assert module in GRAPH, module


def test_data_imports_nothing_above_it():
    assert _violations("pipeline.data", ("pipeline.training", "pipeline.evaluation", "pipeline.demo", "model")) == []


def test_training_does_not_import_evaluation():
    assert _violations("pipeline.training", ("pipeline.evaluation", "pipeline.demo")) == []


def test_model_imports_only_the_batch_contract():
    # pipeline.compat is allowed too: a leaf of shims over pinned libraries' internals (it imports no project
    # module), so model/parallel.py's write into megatron-core's RNG tracker registry sits with the others.
    assert _violations("model", ("pipeline",), allowed=("pipeline.data.batch", "pipeline.compat")) == []


def test_compat_is_a_leaf():
    assert GRAPH["pipeline.compat"] == set()


def test_no_import_cycle():
    # Tarjan-free check: depth-first search with colours; report the first cycle found.
    colour, stack = {}, []

    def visit(node):
        colour[node] = "grey"
        stack.append(node)
        for target in sorted(GRAPH.get(node, ())):
            if target in ("pipeline", "model", "pipeline.data", "pipeline.training", "pipeline.evaluation"):
                continue  # package __init__ files hold no code
            if colour.get(target) == "grey":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in colour:
                visit(target)
        stack.pop()
        colour[node] = "black"

    for node in sorted(GRAPH):
        if node not in colour:
            visit(node)


def test_the_checker_sees_a_violation(tmp_path):
    # The rules above must be able to fail: an upward import in a data module is found.
    GRAPH["pipeline.data._probe"] = {"pipeline.training.checkpoint"}
    try:
        assert _violations("pipeline.data", ("pipeline.training",)) == ["pipeline.data._probe -> pipeline.training.checkpoint"]
    finally:
        del GRAPH["pipeline.data._probe"]
