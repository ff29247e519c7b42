"""Training tasks: modules that turn a batch into a dict of named losses (timm.task style), and the
registry of what each task is: every task module declares a `TaskSpec` (its Task class, config class,
builder, loaders, optimizer options, weights file) and `TASKS` collects them here."""
from __future__ import annotations

from pathlib import Path

from tinymim.core.config import ConfigError
from tinymim.core.rundir import RunDir
from tinymim.models.checkpoint import CheckpointError
from tinymim.tasks import distill, finetune, linprobe, mae, segment
from tinymim.tasks.base import TaskSpec, TrainedRun, load_run_model
from tinymim.train.engine import run_task

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    distill.SPEC, mae.SPEC, finetune.SPEC, linprobe.SPEC, segment.SPEC)}


def spec_of(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return TASKS[task]


def load_config(task: str, recipe: str | Path | None = None, overrides=()):
    """A task's typed config: defaults <- recipe (a YAML file or a built-in name) <- `section.key=value`."""
    return spec_of(task).load_config(recipe, overrides)


def run(task: str, config, output: str | Path):
    """Train (or resume) `task` with `config` into the run directory `output`, as the command line
    does; returns the final metrics, or None when the run had already finished."""
    return run_task(spec_of(task), config, output)


def build_task(task: str, config):
    """The Task object of a config (models built, weights loaded), without training it."""
    return spec_of(task).build(config)


def load_trained(run_dir: str | Path, best: bool = False) -> TrainedRun:
    """The trained model of any tinymim run directory (eval mode), its config, task and classes: the
    final weights, or with best=True the best evaluation's where the run kept them."""
    task = RunDir(run_dir).task() if Path(run_dir).is_dir() else None
    if task not in TASKS:
        raise CheckpointError(f"{run_dir} is not a tinymim run directory (no run.json or config.yaml naming its "
                              f"task); pass the --output folder of a tinymim command ({', '.join(TASKS)})")
    return load_run_model(TASKS[task], run_dir, best)
