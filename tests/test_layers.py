"""The package's import direction: the folders of src/tinymim are its layers, and each module imports
only from its own layer or the layers below, top-level and function-level imports alike (an import
inside a function is a dependency too). The README's map of the package names every module."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "tinymim"
README = ROOT / "docs" / "code.md"  # the map of the package

# the layers, lowest first: each a folder of src/tinymim (the foundation, the method, models and weights,
# data, training machinery, tasks, evaluation and tools, orchestration), then the command line, the only
# modules at the top level besides the package facade (__init__.py, the public API, imported lazily)
LAYERS = ["core", "method", "models", "data", "train", "tasks", "evaluate", "pipeline"]
TOP_LEVEL = ["cli", "__main__"]  # one layer, above every folder


def module_name(path: Path) -> str:
    """'core.rundir' for core/rundir.py, 'tasks' for tasks/__init__.py, '' for the facade."""
    rel = path.relative_to(SRC).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


MODULES = {module_name(p) for p in SRC.rglob("*.py")}


def layer(name: str) -> int | None:
    """A module's layer, from its folder (None: in no layer)."""
    if name in TOP_LEVEL:
        return len(LAYERS)
    folder = name.split(".")[0]
    return LAYERS.index(folder) if folder in LAYERS else None


def imports(path: Path) -> set[str]:
    """The tinymim modules `path` imports ('' is the facade): `from tinymim.train import engine` is
    train.engine, `from tinymim.train.engine import X` is train.engine too."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tinymim":
            base = node.module.removeprefix("tinymim").removeprefix(".")
            for alias in node.names:
                if base == "" and alias.name == "__version__":  # the package facade's version
                    out.add("")
                    continue
                sub = f"{base}.{alias.name}" if base else alias.name
                # a module, or the module the name is in; a name of the facade itself is reported as it is
                out.add(sub if sub in MODULES or not base else base)
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("tinymim.") for a in node.names if a.name.startswith("tinymim.")}
    return out


def test_every_module_has_a_layer():
    assert sorted(name for name in MODULES if name and layer(name) is None) == []
    folders = sorted(p.parent.name for p in SRC.glob("*/__init__.py"))
    assert folders == sorted(LAYERS), "every folder of src/tinymim is a layer, and every layer a folder"


def test_imports_point_down_only():
    upward = []
    for path in SRC.rglob("*.py"):
        name = module_name(path)
        if not name:  # tinymim/__init__.py: the public API, imported lazily from every layer
            continue
        for target in imports(path):
            if target == "":  # `from tinymim import __version__`
                continue
            if target not in MODULES:
                upward.append(f"{name} imports {target}, which is no module of the tree")
            elif layer(target) > layer(name):
                upward.append(f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})")
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


def readme_map() -> list[str]:
    """The module paths (`core/rundir.py`) the README's map of the package names, in its order."""
    text = README.read_text()
    start = text.index("The package is layered")
    section = text[start:text.index("\n## ", start)]
    return re.findall(r"`((?:[a-z_]+/)*[a-z_]+\.py)`", section)


def test_readme_map_names_every_module_by_layer():
    named = readme_map()
    # every module but the __init__.py of a layer folder that holds only its docstring
    modules = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
               if not (p.name == "__init__.py" and len(ast.parse(p.read_text()).body) == 1)}
    assert sorted(set(named) - modules) == [], "the README names modules that are not in the tree"
    assert sorted(modules - set(named)) == [], "modules the README's map of the package does not name"
    order = [layer(module_name(SRC / p)) for p in named if p != "__init__.py"]  # the facade: no layer
    assert order == sorted(order), "the README's map lists the modules layer by layer, lowest first"
