"""Declared chains of runs: `tinymim pipeline --config PIPELINE.yaml --output DIR` (what a pipeline
declares and each stage's config: pipeline/planning.py).

Stage `name` runs in DIR/name. Each stage records in DIR/name/pipeline.json what it was
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
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import torch.distributed as dist

from tinymim.core.config import ConfigError
from tinymim.core.files import RunDirError, read_yaml, save_torch
from tinymim.core.guards import locked
from tinymim.core.rundir import RunDir, result_changes
from tinymim.pipeline.planning import WIRED, PipelineConfig, StageConfig, plan, stage_config
from tinymim.pipeline.report import write_report
from tinymim.tasks import TASKS
from tinymim.train.distributed import setup_distributed
from tinymim.train.engine import run_task

log = logging.getLogger("tinymim")

HERE = "<pipeline>/"  # a record's spelling of a stage folder inside the pipeline folder


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
    return not result_changes(stored, config)


def _supersede(out: Path, stage_dir: Path, why: str) -> None:
    dest = out / ".superseded" / f"{stage_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(stage_dir), dest)
    log.info("stage %s: %s; its old run moved to %s", stage_dir.name, why, dest)


class _Processes:
    """Under torchrun every process walks the stages (each stage trains with all of them); only the
    main one writes records and moves folders, and the others wait for it at barriers."""

    def __init__(self):
        self.dist = dist
        self.launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        if self.launched:
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
                run_task(TASKS[stage.task], stage_config(stage, overrides), stage_dir)
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
        write_report(cfg, out)
    return summaries
