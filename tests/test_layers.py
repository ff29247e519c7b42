"""The package's import direction: each module imports only from its own layer or the layers below,
top-level and function-level imports alike (an import inside a function is a dependency too)."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tinymim"

# lowest first: the method, models and weights, data, training machinery, tasks, evaluation and
# tools, orchestration, the command line
LAYERS = [
    ["errors", "preempt", "config"],
    ["relations", "targets", "mae"],
    ["rundir", "models", "star", "checkpoint", "wrappers", "segmentation", "images"],
    ["data", "shards", "classification", "segmentation_data"],
    ["loggers", "engine", "knn"],
    ["tasks", "tasks.base", "tasks.distill", "tasks.mae", "tasks.finetune", "tasks.linprobe", "tasks.segment"],
    ["robustness", "export", "visualize"],
    ["report", "pipeline", "demo"],
    ["cli", "__main__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tinymim"):
            if node.module == "tinymim":  # `from tinymim import __version__`: the package facade
                out |= {a.name for a in node.names if a.name != "__version__"}
            else:
                out.add(node.module.removeprefix("tinymim."))
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("tinymim.") for a in node.names if a.name.startswith("tinymim.")}
    return out


def test_every_module_has_a_layer():
    modules = {module_name(p) for p in SRC.rglob("*.py")} - {""}
    assert modules <= set(LAYER), f"modules without a layer: {sorted(modules - set(LAYER))}"


def test_imports_point_down_only():
    upward = []
    for path in SRC.rglob("*.py"):
        name = module_name(path)
        if not name:  # tinymim/__init__.py: the public API, imported lazily from every layer
            continue
        for target in imports(path):
            if LAYER[target] > LAYER[name]:
                upward.append(f"{name} (layer {LAYER[name]}) imports {target} (layer {LAYER[target]})")
    assert upward == []


def test_no_import_cycles():
    graph = {module_name(p): imports(p) for p in SRC.rglob("*.py") if module_name(p)}
    cycles = []

    def visit(node, stack):
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        for nxt in sorted(graph.get(node, ())):
            if nxt in graph and nxt not in done:
                visit(nxt, stack + [node])

    done: set[str] = set()
    for start in sorted(graph):
        visit(start, [])
        done.add(start)
    assert cycles == []
