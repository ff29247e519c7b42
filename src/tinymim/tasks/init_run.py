"""A model initialized from a tinymim run takes that run's architecture: `init=RUN` in fine-tuning,
linear probing and segmentation on the command line, and a pipeline stage's `init:` (pipeline/planning.py).

The rule, in one place for both:
- a recipe whose model already has the run's weight shapes (patch, width, depth, registers) is written for
  that run and is kept as it is: its head count too (heads do not change the weights: ImageNet ViT-T is
  distilled with 6 heads and fine-tuned with 3);
- otherwise the recipe's model is a template of another size: the run's name, patch, width, depth, heads
  and registers replace it (one info line lists what changed), and segmentation's pyramid `blocks` are
  moved to the same fractions of the run's depth;
- a key given on the command line (or a stage's own overrides) is kept, but one that gives the model other
  weight shapes than the run's is refused in one line naming both values.
The image size: a recipe written for the run keeps its own (a run's position embeddings are resampled to
it, e.g. fine-tuning at a higher resolution); a template of another size takes the run's `data.img_size`
too (a 32 px student fine-tuned with the ImageNet defaults runs at 32 px, not 224), unless the command
line gives one. Segmentation's crop is the data's own and is never taken.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from tinymim.core.config import ConfigError, load_config, merge, parse_overrides, read_recipe, to_dict
from tinymim.core.rundir import RunDir
from tinymim.models.checkpoint import BUILTIN_PREFIX, builtin_teacher
from tinymim.models.vit import ModelConfig, vit_sizes

log = logging.getLogger("tinymim")

SHAPE_KEYS = ("patch_size", "embed_dim", "depth", "reg_tokens")  # what the weights' shapes depend on
TAKEN_KEYS = ("name", "patch_size", "embed_dim", "depth", "num_heads", "reg_tokens")


def init_run_dir(init) -> Path | None:
    """The run directory an `init` value names (a folder holding a tinymim run's config, or a shipped
    teacher `builtin:NAME`); None for a weights file, a timm name or nothing."""
    if not init:
        return None
    path = builtin_teacher(str(init)) if str(init).startswith(BUILTIN_PREFIX) else Path(str(init))
    if not path.is_dir() or RunDir(path).stored_config() is None:
        return None
    return path


def run_model(run_config: dict, section: str) -> ModelConfig | None:
    """The architecture of the model in `section` of a run's stored config (its sizes only)."""
    model = run_config.get(section) if isinstance(run_config, dict) else None
    if not isinstance(model, dict) or not model.get("name"):
        return None
    return ModelConfig(**{k: model.get(k) for k in TAKEN_KEYS if k in model})


def _shapes(model: ModelConfig) -> dict | None:
    try:
        sizes = vit_sizes(model)
    except Exception:  # noqa: BLE001 - a name timm lacks: loading the config says so in its own words
        return None
    return {k: sizes[k] for k in SHAPE_KEYS}


def _scaled_blocks(blocks: list[int], old_depth: int, new_depth: int) -> list[int]:
    """The pyramid's blocks at the same fractions of another depth ([2, 3, 4, 6] of 6 -> [1, 2, 3, 4] of
    4), kept increasing and within 1..new_depth where the depth allows."""
    out = [max(1, min(new_depth, int(b * new_depth / old_depth + 0.5))) for b in blocks]
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + 1)
    for i in range(len(out) - 1, -1, -1):
        out[i] = min(out[i], new_depth - (len(out) - 1 - i))
    return out


def init_overrides(run_config: dict, section: str, requested: dict, given: dict, where: str) -> list[str]:
    """The overrides that give the model of `requested` (a task's full config tree: defaults <- recipe <-
    every override) the architecture of the run whose stored config is `run_config` (its model in
    `section`), for the keys `given` (the command line's, or a stage's own, as a tree) leaves unset."""
    run = run_model(run_config, section)
    if run is None:
        return []
    given_model = given.get("model") if isinstance(given.get("model"), dict) else {}
    run_shapes = _shapes(run)
    for key in SHAPE_KEYS:  # before the recipe's other sizes can make a contradiction look like another error
        if key in given_model and given_model[key] is not None and given_model[key] != run_shapes[key]:
            raise ConfigError(_contradiction(f"model.{key}={json.dumps(given_model[key])}", key, run_shapes[key],
                                             where))
    # the model as the recipe and overrides describe it, before taking anything (not validated: its sizes
    # may not fit together until the run's replace them)
    wanted = run_model(requested, "model") or ModelConfig()
    if _shapes(wanted) == run_shapes or "name" in given_model:
        return []  # the recipe is written for the run (or the user named the model: checked after loading)
    taken = {k: getattr(run, k) for k in TAKEN_KEYS if k not in given_model}
    out = [f"model.{k}={json.dumps(v)}" for k, v in taken.items()]
    changed = {k: v for k, v in taken.items() if getattr(wanted, k) != v}
    run_img = (run_config.get("data") or {}).get("img_size")
    data = requested.get("data") if isinstance(requested.get("data"), dict) else {}
    given_data = given.get("data") if isinstance(given.get("data"), dict) else {}
    if (run_img and "img_size" in data and data["img_size"] != run_img and "img_size" not in given_data
            and given_model.get("img_size") is None):  # classification only: segmentation has no data.img_size
        out.append(f"data.img_size={run_img}")
        changed["data.img_size"] = run_img
    blocks = requested.get("blocks")
    if isinstance(blocks, list) and "blocks" not in given:
        final = run_model(merge(requested, parse_overrides(out)), "model")
        old_depth, new_depth = (_shapes(wanted) or {}).get("depth"), _shapes(final)["depth"]
        if old_depth and old_depth != new_depth:
            changed["blocks"] = _scaled_blocks(blocks, old_depth, new_depth)
            out.append(f"blocks={json.dumps(changed['blocks'])}")
    if changed:
        log.info("init=%s: the model takes the run's architecture over the recipe's: %s", where,
                 ", ".join(f"{k} {json.dumps(v)}" for k, v in changed.items()))
    return out


def check_init_architecture(model: ModelConfig, run_config: dict, section: str, given: dict, where: str) -> None:
    """Refuse, in one line naming both values, a model whose weight shapes are not the run's it starts from."""
    run = run_model(run_config, section)
    if run is None:
        return
    have, want = _shapes(model), _shapes(run)
    given_model = given.get("model") if isinstance(given.get("model"), dict) else {}
    for key in SHAPE_KEYS:
        if have[key] == want[key]:
            continue
        if key in given_model:
            said = f"model.{key}={json.dumps(given_model[key])}"
        elif "name" in given_model:
            said = f"the model given (model.name={given_model['name']}) has {key} {have[key]}"
        else:
            said = f"the model's {key} is {have[key]}"
        raise ConfigError(_contradiction(said, key, want[key], where))


def _contradiction(said: str, key: str, value, where: str) -> str:
    return (f"{said} but the run {where} was trained with {key} {value}; drop the override (the run's architecture "
            "is taken) or give init= a run of that architecture")


def load_with_init(cls, recipe, overrides) -> object:
    """A fine-tuning, linear-probe or segmentation config (defaults <- recipe <- overrides) whose model takes
    the architecture of the run `init` names (module docstring); `init` that is no run: as loaded."""
    recipe_tree = read_recipe(recipe) if recipe is not None else {}
    given = parse_overrides(overrides)
    requested = merge(merge(to_dict(cls()), recipe_tree), given)
    init = requested.get("init")
    run_dir = init_run_dir(init)
    if run_dir is None:
        return load_config(cls, recipe, overrides)
    run = RunDir(run_dir)
    run_config, section = run.stored_config(), run.model_section()
    cfg = load_config(cls, recipe, [*init_overrides(run_config, section, requested, given, str(init)), *overrides])
    check_init_architecture(cfg.model, run_config, section, given, str(init))
    return cfg
