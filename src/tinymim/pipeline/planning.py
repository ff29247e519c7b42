"""What a pipeline declares, and each stage's overrides and config made from it before anything
runs: `tinymim pipeline --config PIPELINE.yaml` (pipeline/stages.py runs the stages).

A pipeline is a list of stages run in order, each a tinymim task (mae, distill, finetune, linprobe)
with a recipe and overrides, whose teacher (distill) or initial weights (finetune, linprobe) may be
an earlier stage's output:

    overrides: [train.progress=false]            # every stage
    task_overrides: {finetune: [train.epochs=3]}  # every stage of a task
    stages:
      - {name: mae_b, task: mae, config: imagenet/mae_vit_base}
      - {name: tinymim_s, task: distill, config: imagenet/distill_vit_small_from_mae_base, teacher: mae_b}
      - {name: ft_s, task: finetune, config: ..., init: tinymim_s, paper: {top1: 83.0, row: "ViT-S TinyMIM"}}

Stage `name` runs in DIR/name. The teacher's architecture is taken from the earlier stage, key by key,
unless the stage's own overrides set that key (or name another model). The teacher's relation pairing
(teacher.target_block, teacher.relation_heads) is never inferred from the earlier stage: the distill
recipe declares it. An init stage's architecture is taken as `init=RUN` takes a run's on the command
line (tasks/init_run.py), from the earlier stage's planned config.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tinymim.core.config import load_config, merge, parse_overrides, read_recipe, to_dict
from tinymim.core.rundir import architecture_overrides, produced_architecture
from tinymim.tasks import TASKS
from tinymim.tasks.init_run import check_init_architecture, init_overrides

# the config key through which a stage receives an earlier stage's weights, by role
WIRED = {"teacher": ("teacher", "checkpoint"), "init": ("init",)}


@dataclass
class StageConfig:
    name: str  # the stage's folder name under the pipeline's output
    task: str  # a task of the registry: mae, distill, finetune or linprobe
    config: str | None = None  # recipe: a YAML file or a built-in name (cifar10/distill_micro)
    overrides: list[str] = field(default_factory=list)  # this stage's own overrides (they win over the pipeline's)
    teacher: str | None = None  # distill: the earlier stage whose weights teach
    init: str | None = None  # finetune / linprobe: the earlier stage whose weights initialize the model
    # the paper's number for the setting this stage mirrors, shown beside ours: {top1: 83.0, row: "..."}
    paper: dict = field(default_factory=dict)
    label: str | None = None  # name in the report (default: name)


@dataclass
class PipelineConfig:
    overrides: list[str] = field(default_factory=list)  # overrides for every stage (before each stage's own)
    # overrides for every stage of a task: {finetune: [train.epochs=3]}
    task_overrides: dict = field(default_factory=dict)
    # the stages, run in order: name, task, config, overrides, teacher/init, paper, label
    stages: list[StageConfig] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # paragraphs shown at the top of the report
    # overrides given on the command line: applied last, so they win over every stage's own settings;
    # "key=value" for every stage, "task:key=value" for that task's stages
    command_line: list[str] = field(default_factory=list)

    def validate(self) -> None:
        for item in self.command_line:
            task = command_line_task(item)
            if task and task not in TASKS:
                raise ValueError(f"override {item!r}: unknown task {task!r} ({', '.join(TASKS)})")
        seen: dict[str, str] = {}
        for s in self.stages:
            if not s.name or "/" in s.name or s.name.startswith("."):
                raise ValueError(f"stage name {s.name!r}: use a plain folder name")
            if s.name in seen:
                raise ValueError(f"two stages are named {s.name!r}")
            if s.task not in TASKS:
                raise ValueError(f"stage {s.name!r}: unknown task {s.task!r}; tasks: {', '.join(TASKS)}")
            for role in ("teacher", "init"):
                dep = getattr(s, role)
                if dep is not None and dep not in seen:
                    raise ValueError(f"stage {s.name!r}: {role} {dep!r} is not an earlier stage "
                                     f"(earlier: {', '.join(seen) or 'none'})")
                if dep is not None and TASKS[s.task].upstream != role:
                    takers = [name for name, spec in TASKS.items() if spec.upstream == role]
                    raise ValueError(f"stage {s.name!r}: only {' and '.join(takers)} stages have a {role}")
            seen[s.name] = s.task
        unknown = set(self.task_overrides) - set(TASKS)
        if unknown:
            raise ValueError(f"task_overrides for unknown task(s) {sorted(unknown)}; tasks: {list(TASKS)}")
        if not self.stages:
            raise ValueError("the pipeline declares no stages")


def command_line_task(item: str) -> str:
    """The task prefix of a command-line override ("finetune:train.epochs=5" -> "finetune"), or ""."""
    key = item.split("=", 1)[0]
    return key.rpartition(":")[0] if ":" in key else ""


def command_line_overrides(cfg: "PipelineConfig", task: str) -> list[str]:
    """The command-line overrides that reach a stage of `task`, without their prefixes."""
    out = []
    for item in cfg.command_line:
        prefix = command_line_task(item)
        if prefix in ("", task):
            out.append(item[len(prefix) + 1:] if prefix else item)
    return out


def _architecture(config: dict, task: str, prefix: str, own: list[str]) -> list[str]:
    """Overrides that give `prefix` (e.g. teacher.model) the architecture of an earlier stage's model,
    but for the keys the stage's own overrides set (all of them when those name the model)."""
    return architecture_overrides(produced_architecture(config, TASKS[task].model_section), prefix, own)


def _own(cfg: PipelineConfig, stage: StageConfig) -> list[str]:
    """A stage's own overrides: its declared ones, then the command line's that reach it."""
    return [*stage.overrides, *command_line_overrides(cfg, stage.task)]


def stage_overrides(cfg: PipelineConfig, stage: StageConfig, out: Path, configs: dict[str, dict]) -> list[str]:
    """The overrides a stage runs with: pipeline-wide, per task, wiring to earlier stages, its own.
    `configs`: the configs of the earlier stages, by name."""
    own = _own(cfg, stage)
    tasks = {s.name: s.task for s in cfg.stages}
    common = [*cfg.overrides, *cfg.task_overrides.get(stage.task, [])]
    wiring = []
    if stage.teacher is not None:
        wiring.append(f"{'.'.join(WIRED['teacher'])}={out / stage.teacher}")
        wiring += _architecture(configs[stage.teacher], tasks[stage.teacher], "teacher.model", own)
    if stage.init is not None:
        wiring.append(f"{'.'.join(WIRED['init'])}={out / stage.init}")
        spec = TASKS[stage.task]
        requested = merge(merge(to_dict(spec.config()), read_recipe(stage.config) if stage.config else {}),
                          parse_overrides([*common, *wiring, *own]))
        wiring += init_overrides(configs[stage.init], TASKS[tasks[stage.init]].model_section, requested,
                                 parse_overrides(own), str(out / stage.init))
    return [*common, *wiring, *own]  # the last word wins


def stage_config(stage: StageConfig, overrides: list[str]):
    """A stage's typed config from its recipe and overrides (stage_overrides'). A stage with an init stage
    has its architecture wired in already, from the planned config of that stage: the run on disk may be
    an older one, about to be redone."""
    spec = TASKS[stage.task]
    if stage.init is not None:
        return load_config(spec.config, stage.config, overrides)
    return spec.load_config(stage.config, overrides)


def plan(cfg: PipelineConfig, out: str | Path) -> list[tuple[StageConfig, list[str], dict]]:
    """(stage, its overrides, its config as a plain dict) for every stage, without running anything:
    every recipe and override is checked."""
    out, configs, planned = Path(out), {}, []
    tasks = {s.name: s.task for s in cfg.stages}
    for stage in cfg.stages:
        overrides = stage_overrides(cfg, stage, out, configs)
        typed = stage_config(stage, overrides)
        if stage.init is not None:
            check_init_architecture(typed.model, configs[stage.init], TASKS[tasks[stage.init]].model_section,
                                    parse_overrides(_own(cfg, stage)), str(out / stage.init))
        configs[stage.name] = json.loads(json.dumps(asdict(typed)))
        planned.append((stage, overrides, configs[stage.name]))
    return planned


def load(path: str | Path, overrides=()) -> PipelineConfig:
    """A pipeline YAML file or built-in name (pipelines/demo), with overrides of its own keys."""
    return load_config(PipelineConfig, path, overrides)
