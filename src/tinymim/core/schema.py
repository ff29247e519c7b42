"""A config dataclass's keys and types read from its module's source, without importing the module.

The command line checks a recipe and its overrides against them before torch and timm are imported
(seconds on a small CPU), so a mistyped key or a value of the wrong type is refused at once. The
reading follows what config classes are: `@dataclass` classes of `name: type = default` fields, their
types built from the standard ones, `Literal` and other config classes, found through the module's own
`from tinymim... import` lines. Anything else makes the class unreadable (None): the full load then
checks it as it always does. tests/test_startup.py holds the reading to the imported classes.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import typing
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # src/tinymim
# what config field types are made of, besides other config classes
_TYPE_NAMES = {"Any": typing.Any, "Literal": typing.Literal, "Sequence": typing.Sequence,
               "Optional": typing.Optional, "Union": typing.Union, "Path": Path, "None": None,
               "bool": bool, "int": int, "float": float, "str": str, "list": list, "tuple": tuple, "dict": dict}


class Unreadable(Exception):
    """Source this reading does not follow (the full load checks that config instead)."""


@functools.cache
def _module(module: str) -> tuple[dict[str, ast.ClassDef], dict[str, tuple[str, str]]]:
    """A tinymim module's top-level classes, and the names it imports from other tinymim modules."""
    parts = module.split(".")
    if parts[0] != "tinymim":
        raise Unreadable(module)
    path = PACKAGE.joinpath(*parts[1:]).with_suffix(".py")
    if not path.is_file():
        path = PACKAGE.joinpath(*parts[1:], "__init__.py")
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError) as e:
        raise Unreadable(module) from e
    classes, imported = {}, {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            classes[node.name] = node
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("tinymim."):
            imported.update({alias.asname or alias.name: (node.module, alias.name) for alias in node.names})
    return classes, imported


def _is_dataclass(node: ast.ClassDef) -> bool:
    for deco in node.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if isinstance(target, ast.Name) and target.id == "dataclass":
            return True
    return False


@functools.cache
def _schema(module: str, name: str) -> type:
    """A dataclass with the fields and types of config class `name` as `module` sees it; every field
    defaults to None (a check of a partial tree needs no defaults) and it validates nothing."""
    classes, imported = _module(module)
    if name not in classes:
        if name not in imported:
            raise Unreadable(f"{module}.{name}")
        return _schema(*imported[name])
    node = classes[name]
    if not _is_dataclass(node):
        raise Unreadable(f"{module}.{name}")
    fields: dict[str, typing.Any] = {}
    for base in node.bases:  # a base's fields come first; a field declared again keeps its place
        if not isinstance(base, ast.Name):
            raise Unreadable(f"{module}.{name}")
        fields.update({f.name: f.type for f in dataclasses.fields(_schema(module, base.id))})
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign):
            if not isinstance(stmt.target, ast.Name):
                raise Unreadable(f"{module}.{name}")
            fields[stmt.target.id] = _type(module, stmt.annotation)
    return dataclasses.make_dataclass(name, [(k, tp, dataclasses.field(default=None)) for k, tp in fields.items()])


def _type(module: str, annotation: ast.expr) -> typing.Any:
    """A field's annotation evaluated from standard types and config classes only."""
    names = {}
    for node in ast.walk(annotation):
        if isinstance(node, ast.Attribute):  # torch.device, nn.Module: not a config field
            raise Unreadable(ast.unparse(annotation))
        if isinstance(node, ast.Name):
            names[node.id] = _TYPE_NAMES[node.id] if node.id in _TYPE_NAMES else _schema(module, node.id)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node is annotation:
            raise Unreadable(node.value)  # a quoted annotation: rare in config classes
    return eval(compile(ast.Expression(annotation), module, "eval"), {"__builtins__": {}}, names)  # noqa: S307


def static_schema(path: str) -> type | None:
    """The keys and types of config class `path` ("tinymim.tasks.mae:MAEConfig") as a dataclass that
    tinymim.core.config.from_dict checks a tree against, read from source; None when unreadable."""
    module, _, name = path.partition(":")
    try:
        return _schema(module, name)
    except (Unreadable, KeyError, TypeError, NameError):
        return None
