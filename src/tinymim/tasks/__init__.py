"""Training tasks: modules that turn a batch into a dict of named losses (timm.task style), and the one
table of what each task is (`TASKS`): its module, the weights file it leaves, the config section of
the model it produces."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class TaskSpec:
    name: str
    module: str  # exposes load(recipe, overrides) -> config, run(config, output) and the builder
    builder: str  # the module's function config -> Task
    weights: str  # the file a finished run leaves in its directory
    model_section: str  # the config section of the model the task produces
    kind: Literal["pretrain", "classify", "segment"]  # what its results are: losses and k-NN, top-1, mIoU
    upstream: Literal["teacher", "init"] | None  # what an earlier pipeline stage can give it
    exports: Literal["encoder", "classifier", "probe", "segmenter"]  # what `tinymim export` makes of them
    help: str


TASKS = {spec.name: spec for spec in (
    TaskSpec(name="distill", module="tinymim.tasks.distill", builder="build_distill_task",
             weights="student.safetensors", model_section="student", kind="pretrain", upstream="teacher",
             exports="encoder", help="TinyMIM relation-distillation pre-training of a student ViT"),
    TaskSpec(name="mae", module="tinymim.tasks.mae", builder="build_mae_task",
             weights="encoder.safetensors", model_section="model", kind="pretrain", upstream=None,
             exports="encoder", help="MAE pre-training of a ViT (a teacher for distillation)"),
    TaskSpec(name="finetune", module="tinymim.tasks.finetune", builder="build_finetune_task",
             weights="model.safetensors", model_section="model", kind="classify", upstream="init",
             exports="classifier", help="fine-tune a pre-trained (or randomly initialized) ViT for classification"),
    TaskSpec(name="linprobe", module="tinymim.tasks.linprobe", builder="build_linprobe_task",
             weights="model.safetensors", model_section="model", kind="classify", upstream="init",
             exports="probe", help="linear probe: a frozen backbone, BatchNorm + linear head"),
    TaskSpec(name="segment", module="tinymim.tasks.segment", builder="build_segment_task",
             weights="segmenter.safetensors", model_section="model", kind="segment", upstream="init",
             exports="segmenter", help="semantic segmentation: UperNet on a pre-trained (or random) ViT backbone"),
)}


def task_module(task: str):
    if task not in TASKS:
        from tinymim.core.config import ConfigError

        raise ConfigError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[task].module)


def load_config(task: str, recipe: str | Path | None = None, overrides=()):
    """A task's typed config: defaults <- recipe (a YAML file or a built-in name) <- `section.key=value`."""
    return task_module(task).load(recipe, list(overrides))


def run(task: str, config, output: str | Path):
    """Train (or resume) `task` with `config` into the run directory `output`, as the command line
    does; returns the final metrics, or None when the run had already finished."""
    return task_module(task).run(config, str(output))


def build_task(task: str, config):
    """The Task object of a config (models built, weights loaded), without training it."""
    return getattr(task_module(task), TASKS[task].builder)(config)
