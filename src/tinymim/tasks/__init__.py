"""Training tasks: modules that turn a batch into a dict of named losses (timm.task style), and the
registry of what each task is: every task module declares a `TaskSpec` (its Task class, config class,
builder, loaders, optimizer options, weights file) and `TASKS` collects them here.

The task modules import torch and timm (seconds on a small CPU), so this package imports them only
when first asked for (`TASKS`, a task module, or a function below that builds or runs): `CATALOG` is
what the command line needs before that, and `check_config` refuses a mistyped recipe or override
from the config's source alone."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import NamedTuple

from tinymim.core.config import ConfigError, from_dict, merge, parse_overrides, read_recipe
from tinymim.core.hub import hub_names, offline_message, unfetchable
from tinymim.core.schema import static_schema


class TaskEntry(NamedTuple):
    module: str  # the module that declares the task's SPEC
    config: str  # "module:Class" of its typed config
    help: str  # the command line's one line about it (the SPEC's help)


CATALOG: dict[str, TaskEntry] = {
    "distill": TaskEntry("tinymim.tasks.distill", "tinymim.tasks.distill_config:DistillConfig",
                         "TinyMIM relation-distillation pre-training of a student ViT"),
    "mae": TaskEntry("tinymim.tasks.mae", "tinymim.tasks.mae:MAEConfig",
                     "MAE pre-training of a ViT (a teacher for distillation)"),
    "finetune": TaskEntry("tinymim.tasks.finetune", "tinymim.tasks.finetune_config:FinetuneConfig",
                          "fine-tune a pre-trained (or randomly initialized) ViT for classification"),
    "linprobe": TaskEntry("tinymim.tasks.linprobe", "tinymim.tasks.linprobe:LinearProbeConfig",
                          "linear probe: a frozen backbone, BatchNorm + linear head"),
    "segment": TaskEntry("tinymim.tasks.segment", "tinymim.tasks.segment:SegmentConfig",
                         "semantic segmentation: UperNet on a pre-trained (or random) ViT backbone"),
}


def _tasks() -> dict:
    """{name: TaskSpec}, every task module imported (once)."""
    if "TASKS" not in globals():
        specs = [importlib.import_module(entry.module).SPEC for entry in CATALOG.values()]
        globals()["TASKS"] = {spec.name: spec for spec in specs}
    return globals()["TASKS"]


def __getattr__(name: str):
    """`TASKS` and the task modules (`tinymim.tasks.distill` ...), imported on first use."""
    if name == "TASKS":
        return _tasks()
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _entry(task: str) -> TaskEntry:
    if task not in CATALOG:
        raise ConfigError(f"unknown task {task!r}; tasks: {', '.join(CATALOG)}")
    return CATALOG[task]


def spec_of(task: str):
    """The TaskSpec of `task` (its module imported)."""
    _entry(task)
    return _tasks()[task]


def check_config(task: str, recipe: str | Path | None = None, overrides=()) -> None:
    """Refuse a recipe or override whose key the task's config lacks or whose value has the wrong type,
    from the config's source alone, and an `hf-hub:` name that cannot be fetched here (no torch, no timm:
    a typo costs a fraction of a second). Ranges, files and models are the full load's to check."""
    entry = _entry(task)
    given = merge(read_recipe(recipe) if recipe is not None else {}, parse_overrides(overrides))
    schema = static_schema(entry.config)
    if schema is not None:
        from_dict(schema, given)
    for name in hub_names(given):
        reason = unfetchable(name)
        if reason is not None:
            raise ConfigError(offline_message(name, OSError(reason)))


def load_config(task: str, recipe: str | Path | None = None, overrides=()):
    """A task's typed config: defaults <- recipe (a YAML file or a built-in name) <- `section.key=value`."""
    check_config(task, recipe, overrides)
    return spec_of(task).load_config(recipe, overrides)


def run(task: str, config, output: str | Path):
    """Train (or resume) `task` with `config` into the run directory `output`, as the command line
    does; returns the final metrics, or None when the run had already finished."""
    from tinymim.train.engine import run_task

    return run_task(spec_of(task), config, output)


def build_task(task: str, config):
    """The Task object of a config (models built, weights loaded), without training it."""
    return spec_of(task).build(config)


def load_trained(run_dir: str | Path, best: bool = False):
    """The trained model of any tinymim run directory (eval mode), its config, task and classes
    (a tinymim.tasks.base.TrainedRun): the final weights, or with best=True the best evaluation's
    where the run kept them."""
    from tinymim.core.rundir import RunDir
    from tinymim.models.checkpoint import CheckpointError
    from tinymim.tasks.base import load_run_model

    task = RunDir(run_dir).task() if Path(run_dir).is_dir() else None
    if task not in CATALOG:
        raise CheckpointError(f"{run_dir} is not a tinymim run directory (no run.json or config.yaml naming its "
                              f"task); pass the --output folder of a tinymim command ({', '.join(CATALOG)})")
    return load_run_model(spec_of(task), run_dir, best)
