"""Training tasks: modules that turn a batch into a dict of named losses (timm.task style), and the one
table of what each task is (`TASKS`): its module, the weights file it leaves, the config section of
the model it produces."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TaskSpec:
    name: str
    module: str  # exposes load(recipe, overrides) -> config and run(config, output)
    weights: str  # the file a finished run leaves in its directory
    model_section: str  # the config section of the model the task produces
    help: str


TASKS = {spec.name: spec for spec in (
    TaskSpec("distill", "tinymim.tasks.distill", "student.safetensors", "student",
             "TinyMIM relation-distillation pre-training of a student ViT"),
    TaskSpec("mae", "tinymim.tasks.mae", "encoder.safetensors", "model",
             "MAE pre-training of a ViT (a teacher for distillation)"),
    TaskSpec("finetune", "tinymim.tasks.finetune", "model.safetensors", "model",
             "fine-tune a pre-trained (or randomly initialized) ViT for classification"),
    TaskSpec("linprobe", "tinymim.tasks.linprobe", "model.safetensors", "model",
             "linear probe: a frozen backbone, BatchNorm + linear head"),
)}


def task_module(task: str):
    if task not in TASKS:
        from tinymim.config import ConfigError

        raise ConfigError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[task].module)


def load_config(task: str, recipe: str | Path | None = None, overrides=()):
    """A task's typed config: defaults <- recipe (a YAML file or a built-in name) <- `section.key=value`."""
    return task_module(task).load(recipe, list(overrides))


def run(task: str, config, output: str | Path):
    """Train (or resume) `task` with `config` into the run directory `output`, as the command line
    does; returns the final metrics, or None when the run had already finished."""
    return task_module(task).run(config, str(output))
