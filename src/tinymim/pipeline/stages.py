"""Declared chains of runs: `tinymim pipeline --config PIPELINE.yaml --output DIR`.

A pipeline is a list of stages run in order, each a tinymim task (mae, distill, finetune, linprobe)
with a recipe and overrides, whose teacher (distill) or initial weights (finetune, linprobe) may be
an earlier stage's output:

    overrides: [train.progress=false]            # every stage
    task_overrides: {finetune: [train.epochs=3]}  # every stage of a task
    stages:
      - {name: mae_b, task: mae, config: imagenet/mae_vit_base}
      - {name: tinymim_s, task: distill, config: imagenet/distill_vit_small_from_mae_base, teacher: mae_b}
      - {name: ft_s, task: finetune, config: ..., init: tinymim_s, paper: {top1: 83.0, row: "ViT-S TinyMIM"}}

Stage `name` runs in DIR/name. The teacher's (init's) architecture is taken from the earlier stage,
key by key, unless the stage's own overrides set that key (or name another model). The teacher's
relation pairing (teacher.target_block, teacher.relation_heads) is never inferred from the earlier
stage: the distill recipe declares it. Each stage records in DIR/name/pipeline.json what it was
run from: its config and the run ids of the stages it consumed, the paths of those stages written
relative to DIR (`<pipeline>/NAME`), so a moved or copied DIR reuses its stages. Re-running the pipeline
- skips a finished stage whose record matches (no training),
- resumes an unfinished stage with the same record (a crash, a fixed data path),
- redoes a stage whose config changed or whose upstream stage was redone (its old directory is moved
  to DIR/.superseded/, never deleted); so deleting a stage's directory redoes it and the stages that
  depend on it, directly or not, and nothing else.
At the end DIR/report.md gathers every stage's results (beside the paper's numbers where a stage
names them) with loss curves and accuracy bars as PNG (pipeline/report.py).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tinymim.core.config import ConfigError, diff_configs, load_config
from tinymim.core.files import RunDirError, read_yaml, save_torch
from tinymim.core.guards import locked
from tinymim.core.rundir import RESUMABLE_CHANGES, RunDir, architecture_overrides, produced_architecture
from tinymim.tasks import TASKS
from tinymim.train.engine import run_task

log = logging.getLogger("tinymim")

# the config key through which a stage receives an earlier stage's weights, by role
WIRED = {"teacher": ("teacher", "checkpoint"), "init": ("init",)}
HERE = "<pipeline>/"  # a record's spelling of a stage folder inside the pipeline folder


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


def _architecture(config: dict, task: str, prefix: str, own: list[str], skip=()) -> list[str]:
    """Overrides that give `prefix` (e.g. teacher.model) the architecture of an earlier stage's model,
    but for the keys the stage's own overrides set (all of them when those name the model)."""
    produced = produced_architecture(config, TASKS[task].model_section)
    arch = {k: v for k, v in produced.items() if k not in skip}
    return architecture_overrides(arch, prefix, own)


def _record(stage_dir: Path) -> dict | None:
    return RunDir(stage_dir).read_record()


def _write_record(stage_dir: Path, record: dict) -> None:
    RunDir(stage_dir).write_record(record)


def _wired(stage: "StageConfig") -> dict[tuple, str]:
    """The config keys that carry earlier stages' folders into `stage` -> those stages' names."""
    return {WIRED[role]: getattr(stage, role) for role in WIRED if getattr(stage, role) is not None}


def _parent(config: dict, key: tuple) -> dict | None:
    for part in key[:-1]:
        config = config.get(part) if isinstance(config, dict) else None
    return config if isinstance(config, dict) else None


def _here(value, out: Path, name: str):
    """`<pipeline>/NAME` when `value` is the folder of stage NAME in `out` (absolute, or relative to
    the working directory as --output was), else `value` unchanged."""
    if isinstance(value, str) and os.path.abspath(value) == os.path.join(os.path.abspath(out), name):
        return HERE + name
    return value


def portable(stage: "StageConfig", config: dict, out: str | Path) -> dict:
    """`config` with its earlier stages' folders written relative to the pipeline folder: what a
    stage's record keeps and reuse compares (a record of absolute paths, as older versions wrote,
    compares the same while the folder has not moved)."""
    config = copy.deepcopy(config)
    for key, name in _wired(stage).items():
        node = _parent(config, key)
        if node is not None and key[-1] in node:
            node[key[-1]] = _here(node[key[-1]], Path(out), name)
    return config


def _portable_overrides(stage: "StageConfig", overrides: list[str], out: Path) -> list[str]:
    keys = {".".join(k): name for k, name in _wired(stage).items()}
    out_list = []
    for item in overrides:
        key, eq, value = item.partition("=")
        out_list.append(f"{key}={_here(value, out, keys[key])}" if eq and key in keys else item)
    return out_list


def _relocate(stage: "StageConfig", stage_dir: Path, config: dict) -> None:
    """Before a stage resumes in a moved or copied pipeline folder: its run's stored config (in
    last.pt and config.yaml) names its upstream stages where they were. Their run ids matched (the
    same weights), so point it at where they are now; else the run refuses a changed config."""
    run = RunDir(stage_dir)

    def fix(stored: dict) -> bool:
        changed = False
        for key, name in _wired(stage).items():
            node, want = _parent(stored, key), _parent(config, key).get(key[-1])
            have = node.get(key[-1]) if node is not None else None
            if isinstance(have, str) and have != want and Path(have).name == name:
                node[key[-1]] = want
                changed = True
        return changed

    stored = read_yaml(run.config)
    if stored is not None and not fix(stored):
        return  # not moved (config.yaml is written with last.pt's config, and fixed after it)
    with run.lock():  # nobody else trains in it while its checkpoint is rewritten
        if run.checkpoint.is_file():
            state = run.read_checkpoint()
            if isinstance(state.get("config"), dict) and fix(state["config"]):
                save_torch(state, run.checkpoint)
                log.info("stage %s: its run now takes its upstream stages from %s", stage.name, stage_dir.parent)
        if stored is not None:
            run.write_config(stored)


def check_output(out: str | Path) -> None:
    """Refuse an --output that is one run's folder (the stages would be built inside it), before
    anything is written."""
    out = Path(out)
    if not out.is_dir():
        return  # new, or a file (the lock says so)
    if (out / RunDir.RECORD).is_file():
        raise RunDirError(f"--output {out} is the run folder of stage {out.name!r} of the pipeline in {out.parent}, "
                          f"not a pipeline folder: give --output {out.parent} to run that pipeline again, or choose "
                          "another --output")
    run = RunDir(out)
    held = [p.name for p in (run.checkpoint, run.info_file) if p.is_file()]
    if "train" in (read_yaml(run.config) or {}):
        held.insert(0, run.config.name)
    if run.weights() is not None:
        held.append(run.weights().name)
    if held:
        raise RunDirError(f"--output {out} is a run's folder (it holds {', '.join(held)}), not a pipeline's: "
                          "choose another --output (a new folder, or a pipeline's)")


def _same(stored: dict, config: dict) -> bool:
    """A stage's stored config and the one it would run with agree (keys tinymim added since the stage
    ran are no difference)."""
    return not [d for d in diff_configs(stored, config, new_keys_ok=True) if not d.startswith(RESUMABLE_CHANGES)]


def _supersede(out: Path, stage_dir: Path, why: str) -> None:
    dest = out / ".superseded" / f"{stage_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(stage_dir), dest)
    log.info("stage %s: %s; its old run moved to %s", stage_dir.name, why, dest)


def stage_overrides(cfg: PipelineConfig, stage: StageConfig, out: Path, configs: dict[str, dict]) -> list[str]:
    """The overrides a stage runs with: pipeline-wide, per task, wiring to earlier stages, its own.
    `configs`: the configs of the earlier stages, by name."""
    cli = command_line_overrides(cfg, stage.task)
    own = [*stage.overrides, *cli]
    tasks = {s.name: s.task for s in cfg.stages}
    wiring = []
    if stage.teacher is not None:
        wiring.append(f"{'.'.join(WIRED['teacher'])}={out / stage.teacher}")
        wiring += _architecture(configs[stage.teacher], tasks[stage.teacher], "teacher.model", own)
    if stage.init is not None:
        wiring.append(f"{'.'.join(WIRED['init'])}={out / stage.init}")
        # not the image size: fine-tuning may change the resolution (position embeddings are resampled)
        wiring += _architecture(configs[stage.init], tasks[stage.init], "model", own, skip=("img_size",))
    return [*cfg.overrides, *cfg.task_overrides.get(stage.task, []), *wiring, *own]  # the last word wins


def plan(cfg: PipelineConfig, out: str | Path) -> list[tuple[StageConfig, list[str], dict]]:
    """(stage, its overrides, its config as a plain dict) for every stage, without running anything:
    every recipe and override is checked."""
    out, configs, planned = Path(out), {}, []
    for stage in cfg.stages:
        overrides = stage_overrides(cfg, stage, out, configs)
        configs[stage.name] = json.loads(json.dumps(asdict(TASKS[stage.task].load_config(stage.config, overrides))))
        planned.append((stage, overrides, configs[stage.name]))
    return planned


class _Processes:
    """Under torchrun every process walks the stages (each stage trains with all of them); only the
    main one writes records and moves folders, and the others wait for it at barriers."""

    def __init__(self):
        import os

        import torch.distributed as dist

        self.dist = dist
        self.launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        if self.launched:
            from tinymim.train.distributed import setup_distributed
            setup_distributed()
        self.is_main = not self.launched or dist.get_rank() == 0

    def barrier(self) -> None:
        if self.launched:
            self.dist.barrier()


def run_pipeline(cfg: PipelineConfig, output: str | Path, report: bool = True,
                 shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Run (or reuse) every stage in order; returns one summary dict per stage. The output folder is
    locked for the whole pipeline: a second pipeline on it refuses at once; a single run's folder (or
    one stage's) is refused as the output before anything is written.

    shard=(i, n): n processes share the stages of one pipeline on the same folder (small models use
    one core better than two). Process i runs stage j when j % n == i and waits for the others'
    stages it needs as teacher or init until their records say done; it returns its own stages'
    summaries and writes no report (the plain run does, reusing everything). Each shard holds its own
    lock (OUTPUT/.shard-i-of-n), each stage its run directory's."""
    out = Path(output)
    index, count = shard
    if not 0 <= index < count:
        raise ConfigError(f"--shard {index}/{count}: give I/N with 0 <= I < N")
    check_output(out)
    procs = _Processes()
    planned = plan(cfg, out)  # every stage's config checked before anything runs or is written
    lock_dir = out if count == 1 else out / f".shard-{index}-of-{count}"
    with locked(RunDir(lock_dir), procs.is_main, procs.launched):
        return _run_stages(cfg, out, planned, procs, report and count == 1, shard)


POLL_SECONDS = 5.0  # how often a shard looks at a stage another shard runs


def _wait_for(stage: StageConfig, stage_dir: Path, upstream: dict, config: dict, owner: int) -> dict:
    """The record of a stage another shard runs, once it is done with this config (portable) and
    upstream (a shard that died leaves this waiting: run it again with the same --shard)."""
    waited, said = 0.0, -1.0
    while True:
        record = _record(stage_dir)
        if (record is not None and record.get("status") == "done" and record.get("upstream") == upstream
                and _same(portable(stage, record.get("config", {}), stage_dir.parent), config)
                and RunDir(stage_dir).weights() is not None):
            return record
        if waited - said >= 300 or said < 0:  # say so now and every five minutes, not every poll
            log.info("stage %s: waiting for shard %d to finish it", stage.name, owner)
            said = waited
        time.sleep(POLL_SECONDS)
        waited += POLL_SECONDS


def _run_stages(cfg: PipelineConfig, out: Path, planned, procs: _Processes, report: bool,
                shard: tuple[int, int] = (0, 1)) -> list[dict]:
    run_ids: dict[str, str] = {}
    others: dict[str, tuple] = {}  # another shard's stages, waited for only when a stage here needs them
    summaries = []

    def run_id(name: str) -> str:
        if name not in run_ids:
            stage, config, owner = others[name]
            upstream = {d: run_id(d) for d in (stage.teacher, stage.init) if d is not None}
            here = portable(stage, config, out)
            run_ids[name] = _wait_for(stage, out / name, upstream, here, owner)["run_id"]
        return run_ids[name]

    for position, (stage, overrides, config) in enumerate(planned):
        if position % shard[1] != shard[0]:
            others[stage.name] = (stage, config, position % shard[1])
            continue
        procs.barrier()
        stage_dir = out / stage.name
        upstream = {d: run_id(d) for d in (stage.teacher, stage.init) if d is not None}
        record = _record(stage_dir)
        here = portable(stage, config, out)  # what the record keeps and reuse compares: no absolute stage paths
        matches = (record is not None and record.get("upstream") == upstream
                   and _same(portable(stage, record.get("config", {}), out), here))
        done = matches and record.get("status") == "done" and RunDir(stage_dir).weights() is not None
        if done:
            log.info("stage %s: finished before, reused (%s)", stage.name, stage_dir)
        else:
            log.info("stage %s: %s %s", stage.name, "resuming" if matches else "running", stage.task)
            why = ("its config or an upstream stage changed" if record
                   else "its folder holds a run the pipeline did not record")
            # a finished stage that lost its weights file gets it back from its checkpoint, unchanged:
            # it keeps its run id, so the stages downstream of it stay valid
            same_run = record.get("run_id") if matches and record.get("status") == "done" else None
            record = {"stage": stage.name, "task": stage.task, "recipe": stage.config,
                      "overrides": _portable_overrides(stage, overrides, out), "config": here,
                      "upstream": upstream, "status": "running",
                      "seconds": (record or {}).get("seconds", 0.0) if matches else 0.0}
            if procs.is_main:
                if stage_dir.exists() and not matches:
                    _supersede(out, stage_dir, why)
                elif matches:
                    _relocate(stage, stage_dir, config)
                _write_record(stage_dir, record)
            procs.barrier()
            start = time.perf_counter()
            try:
                spec = TASKS[stage.task]
                run_task(spec, spec.load_config(stage.config, overrides), stage_dir)
                record.update(status="done", run_id=same_run or uuid.uuid4().hex)
            finally:  # a failed stage keeps status "running": the next invocation resumes it
                record["seconds"] += time.perf_counter() - start
                if procs.is_main:
                    _write_record(stage_dir, record)
            procs.barrier()
            record = _record(stage_dir)  # the main process's run id, on every process
        run_ids[stage.name] = record["run_id"]
        summaries.append({"stage": stage, "dir": stage_dir, "record": record, "reused": done})
    if report and procs.is_main:
        from tinymim.pipeline.report import write_report

        write_report(cfg, out)
    return summaries


def load(path: str | Path, overrides=()) -> PipelineConfig:
    """A pipeline YAML file or built-in name (pipelines/demo), with overrides of its own keys."""
    return load_config(PipelineConfig, path, overrides)
