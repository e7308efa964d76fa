"""No import circle in the package: every `import` / `from ... import` of a ccafl_hf module — at the top, inside
functions and under ``if TYPE_CHECKING:`` — is an edge, and the graph has no cycle."""

import ast
from pathlib import Path

import ccafl_hf

PACKAGE = Path(ccafl_hf.__file__).parent

def _modules() -> dict[str, tuple[Path, bool]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def import_graph() -> dict[str, set[str]]:
    """``{module: modules it imports}`` over every import statement of the package (any nesting)."""
    modules = _modules()
    graph = {}
    for name, (path, is_package) in modules.items():
        base = name if is_package else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = base.split(".")
                    target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    edges.add(full if full in modules else target)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    target = alias.name
                    while target not in modules and "." in target:
                        target = target.rsplit(".", 1)[0]
                    edges.add(target)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_every_kind_of_import():
    graph = import_graph()
    assert "ccafl_hf.trainers.base" in graph["ccafl_hf.trainers"]  # a package's relative import
    assert "ccafl_hf.pipeline" in graph["ccafl_hf.commands.train"]  # a function-level import
    assert "ccafl_hf.trainers.training_module" in graph["ccafl_hf.trainers.objectives"]  # under TYPE_CHECKING
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_circle_in_the_package():
    found = cycles(import_graph())
    assert not found, f"import circles: {[sorted(c) for c in found]}"


def test_trainer_layers_point_one_way():
    """The trainer sees the objective and the module; the objective never sees the trainer; the module never
    sees the objective."""
    graph = import_graph()
    assert "ccafl_hf.trainers.base" not in graph["ccafl_hf.trainers.objectives"]
    assert not {"ccafl_hf.trainers.objectives", "ccafl_hf.trainers.base"} & graph["ccafl_hf.trainers.training_module"]
    assert not any(m.startswith("ccafl_hf.pipeline") for name, deps in graph.items()
                   if name.startswith("ccafl_hf.trainers") for m in deps)


def test_package_root_is_small_and_moved_modules_keep_their_old_paths():
    import importlib

    from ccafl_hf.utils.moved import MOVED_MODULES

    root_modules = [p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
    assert len(root_modules) <= 12, sorted(root_modules)
    for old, new in MOVED_MODULES.items():
        assert not (PACKAGE / f"{old.rsplit('.', 1)[1]}.py").exists()
        assert importlib.import_module(old) is importlib.import_module(new), old
    from ccafl_hf.precision import resolve_mixed_precision  # the 0.2 spelling

    from ccafl_hf.utils.precision import resolve_mixed_precision as moved

    assert resolve_mixed_precision is moved
