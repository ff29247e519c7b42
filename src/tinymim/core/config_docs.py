"""Discovery of a config: every key, its type, its value and a one-line meaning, read from the
comments beside each dataclass field (`tinymim config TASK`)."""
from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import typing
from typing import Any

from tinymim.core.config import _field_types, _is_dataclass_type


def field_docs(cls) -> dict[str, str]:
    """One line per field of dataclass `cls`, from its source: the comment at the end of the field's
    line, else the comment lines just above it."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    above: list[str] = []
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    line_field, line_no = None, -1
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.start[0] == line_no and line_field:  # a comment at the end of a field's line
                docs[line_field] = text
            else:
                above.append(text)
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names and tok.start[0] != line_no:
            line_field, line_no = tok.string, tok.start[0]
            if above:
                docs[tok.string] = " ".join(above)
            above = []
        elif tok.type == tokenize.NL and not above:
            pass
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT):
            if tok.start[0] != line_no:
                above = []
    return docs


def _type_name(tp) -> str:
    text = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
    return text or str(tp).replace("typing.", "").replace("NoneType", "None")


def describe(cls, value=None, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, value, meaning) for every leaf key of a config (its defaults when value is None)."""
    value = value if value is not None else cls()
    types_, docs = _field_types(cls), {}
    for klass in reversed(cls.__mro__):  # a subclass's comments over its base's
        if dataclasses.is_dataclass(klass):
            docs.update(field_docs(klass))
    rows = []
    for f in dataclasses.fields(cls):
        tp, v = types_[f.name], getattr(value, f.name)
        if _is_dataclass_type(tp) or dataclasses.is_dataclass(v):  # a section, or an optional one that is set
            rows += describe(type(v) if v is not None else tp, v, prefix + f.name + ".")
        else:
            rows.append((prefix + f.name, _type_name(tp), v, docs.get(f.name, "")))
    return rows
