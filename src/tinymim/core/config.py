"""Typed configs: dataclasses filled from a YAML recipe, then from `dotted.key=value` overrides.

Unknown keys are errors (a typo in a recipe must never be silently ignored). Values given on the
command line are parsed as YAML scalars, so `train.epochs=3`, `data.name=cifar10` and
`loss.relation.relations=[qk,vv]` all work.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from tinymim.core.errors import TinymimError

T = TypeVar("T")


class ConfigError(TinymimError, ValueError):
    """A recipe or override that does not fit the config schema."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value to the annotated type, with an error that names the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=where + ".")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if typing.get_origin(tp) is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: must be one of {list(typing.get_args(tp))}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a (possibly partial) nested dict; unknown keys raise ConfigError."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        # the closest valid keys, not all of them: a section can have 30 (`tinymim config TASK` lists all)
        close = sorted({prefix + m for k in unknown for m in difflib.get_close_matches(k, list(types_), n=3)})
        hint = (f"did you mean {', '.join(close)}?" if close
                else f"valid keys here: {', '.join(prefix + k for k in types_)}")
        if len(hint) > 300:
            hint = "`tinymim config TASK` lists every key"
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; {hint}")
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e
    return obj


def checked_copy(cfg: T) -> T:
    """A copy of a config object, every section validated as loading validates it (for configs made
    in code, which skip loading)."""
    return from_dict(type(cfg), dataclasses.asdict(cfg))


def from_run_config(cls: type[T], raw: dict, **top) -> T:
    """A run's stored config rebuilt to use its model here (evaluation, pictures): `top` keys replaced,
    and the device chosen afresh (the machine the run trained on need not be this one)."""
    return from_dict(cls, {**raw, **top, "train": {**raw.get("train", {}), "device": "auto"}})


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def plain(obj) -> dict:
    """A config as plain JSON types (what config.yaml and last.pt hold, and what resuming compares)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: Sequence[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); quote "
                              "strings and close brackets, e.g. key=[a,b]") from None
        _set_dotted(tree, key.strip(), value)
    return tree


RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # tinymim/recipes


def resolve_recipe(recipe: str | Path) -> Path:
    """A YAML file, or the name of a built-in recipe such as `cifar10/distill_micro`."""
    path = Path(recipe)
    if path.is_file():
        return path
    for candidate in (RECIPES / recipe, RECIPES / f"{recipe}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.glob("*/*.yaml"))
    folders = sorted({k.split("/")[0] for k in known})
    raise ConfigError(f"recipe {recipe} not found: pass a YAML file or a built-in recipe, e.g. "
                      f"{', '.join(k for k in known if k.startswith('cifar10/'))} ({len(known)} in "
                      f"{', '.join(f + '/' for f in folders)}; see the recipes folder of the package)")


def _yaml_problem(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def read_recipe(recipe: str | Path, _seen: tuple = ()) -> dict:
    """A recipe's YAML tree. A recipe may start from another one with `base: RECIPE` (a path relative
    to it, or a built-in name): its keys are merged over the base's, so an ablation row is a few lines."""
    path = resolve_recipe(recipe)
    if path.resolve() in _seen:
        raise ConfigError(f"recipe {path} is its own base (a cycle of `base:` keys)")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {_yaml_problem(e)}; fix that line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read recipe {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"recipe {path} must hold a YAML mapping at the top level")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    relative = path.parent / str(base)
    base_path = relative if relative.is_file() else (relative.with_suffix(".yaml") if
                                                        relative.with_suffix(".yaml").is_file() else base)
    return merge(read_recipe(base_path, (*_seen, path.resolve())), loaded)


def load_config(cls: type[T], recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of `cls` <- YAML recipe <- command-line overrides."""
    tree = read_recipe(recipe) if recipe is not None else {}
    # start from the full defaults so nested sections keep their parent's defaults
    # (e.g. the distill student's drop path) when a recipe sets only some of their keys
    tree = merge(merge(to_dict(cls()), tree), parse_overrides(overrides))
    return from_dict(cls, tree)


def dump_config(obj, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def diff_configs(a: dict, b: dict, prefix: str = "", new_keys_ok: bool = False) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (value in a, value in b)} for every key whose values differ between two nested
    dicts, in key order. new_keys_ok: keys only `b` has are no difference (`a` is a stored config
    written before tinymim had those keys)."""
    out: dict[str, tuple[Any, Any]] = {}
    for k in sorted(set(a) | set(b)):
        if new_keys_ok and k not in a:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.update(diff_configs(va, vb, prefix + k + ".", new_keys_ok))
        elif va != vb:
            out[prefix + k] = (va, vb)
    return out


def describe_diffs(diffs: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    """`key: old -> new; ...` for a message, the first `limit` of them."""
    shown = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(diffs.items())[:limit]]
    return "; ".join(shown) + (" ..." if len(diffs) > limit else "")
