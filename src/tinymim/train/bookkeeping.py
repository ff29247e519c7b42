"""The training loop's bookkeeping: the `Loaders` a task's data gives, its `Plan` (the run's length in
optimizer steps) and `TrainState` (what a step advances and a checkpoint keeps), the log window and
`RunLogs` (metrics.jsonl, the trackers, the progress bar), `evaluation_bar` (an evaluation's own), the
`Checkpointer` (checkpoints/last.pt, with every process's RNG state), and the run at start-up: its
directory opened fresh, resumed or found finished (`open_run`, repairing a finished run whose final
files went missing), its data and plan (`open_data`, checked against the checkpoint's), its files written."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm.auto import tqdm

from tinymim.core.config import ConfigError
from tinymim.core.errors import DataError
from tinymim.core.files import RunDirError, save_torch
from tinymim.core.rundir import RunDir
from tinymim.data.sources import data_fingerprint
from tinymim.train.config import TrainConfig
from tinymim.train.distributed import DistContext, rng_state
from tinymim.train.loggers import MetricsLogger

log = logging.getLogger("tinymim")


@dataclass
class Loaders:
    """What a task's loaders function returns to the engine: the training loader and its sampler (with
    `set_epoch(epoch, start_step)` and `steps_per_epoch`, in micro steps), and for a task that evaluates
    on data of its own, the evaluation loader, the training data's class names (recorded with the run) and
    the evaluation split's full size when eval_limit cut the loader to fewer images (else None)."""

    train: object
    sampler: object
    eval: object | None = None
    classes: list[str] | None = None
    eval_of: int | None = None


@dataclass
class Plan:
    """The run's length in optimizer steps."""

    per_epoch: int
    total: int


@dataclass
class TrainState:
    """What the loop advances and a checkpoint keeps, besides the task's weights."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    step: int = 0
    best: float = float("-inf")


@dataclass
class LogWindow:
    """Sums over the optimizer steps since the last metrics line."""

    t0: float = field(default_factory=time.perf_counter)
    images: int = 0
    steps: int = 0
    skipped: int = 0
    loader_wait: float = 0.0  # seconds the loop waited for the loader's next batch
    sums: dict = field(default_factory=dict)


class RunLogs:
    """metrics.jsonl and the trackers (MetricsLogger), the progress bar, and the log window."""

    def __init__(self, run: RunDir, ctx: DistContext, cfg: TrainConfig, config: dict, plan: Plan, name: str,
                 step: int):
        self.ctx, self.cfg, self.plan = ctx, cfg, plan
        self.metrics = MetricsLogger(run, ctx.is_main, cfg, config)
        self.bar = None
        if ctx.is_main and cfg.progress:
            self.bar = tqdm(total=plan.total, initial=step, desc=name, unit="step", dynamic_ncols=True)
        self.window, self.reported_skips, self.last, self.last_eval = LogWindow(), 0, None, {}

    def step(self, step: int, losses: dict[str, float], optimizer) -> None:
        w = self.window
        for k, v in losses.items():
            w.sums[k] = w.sums.get(k, 0.0) + v
        w.steps += 1
        if step % self.cfg.log_every == 0 or step == 1 or step == self.plan.total:
            # on the device: nccl reduces only device tensors
            skipped = torch.tensor(float(w.skipped), device=self.ctx.device)
            # the slowest process's wait: the others wait for it at the gradients' all-reduce
            wait = torch.tensor(w.loader_wait, dtype=torch.float64, device=self.ctx.device)
            if self.ctx.distributed:
                dist.all_reduce(skipped)
                dist.all_reduce(wait, op=dist.ReduceOp.MAX)
            self.last = {"step": step, "epoch": round(step / self.plan.per_epoch, 4),
                         **{k: s / w.steps for k, s in w.sums.items()},
                         "lr": max(g["lr"] for g in optimizer.param_groups),
                         "images_per_s": w.images / (time.perf_counter() - w.t0),
                         "loader_wait_s": round(float(wait), 4), "skipped_images": int(skipped)}
            self.metrics.log(self.last)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{self.last['loss']:.4f}", lr=f"{self.last['lr']:.2e}")
            if int(skipped) > self.reported_skips and self.ctx.is_main:
                log.warning("%d unreadable images skipped so far", int(skipped))
            self.reported_skips = int(skipped)
            self.window = LogWindow(skipped=w.skipped)
        if self.bar is not None:
            self.bar.update(1)

    def evaluation(self, record: dict | None) -> None:
        if record is None:
            return
        self.metrics.log(record)
        self.last_eval = record
        if self.bar is not None:
            self.bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def final(self) -> dict:
        return {**(self.last or {}), **self.last_eval}

    def close(self) -> None:
        self.metrics.close()
        if self.bar is not None:
            self.bar.close()


class Checkpointer:
    """checkpoints/last.pt, written by the main process on every process's behalf (each one's RNG)."""

    def __init__(self, task, state: TrainState, run: RunDir, ctx: DistContext, config: dict, data_id: dict):
        self.task, self.state, self.run, self.ctx, self.config, self.data_id = task, state, run, ctx, config, data_id
        self.saved_step: int | None = None  # the step of the last checkpoint written or resumed from

    def save(self, finished: bool = False, evaluated: bool = True) -> None:
        """evaluated=False: written at an epoch's end before its evaluation, which a resume then runs."""
        ctx, state = self.ctx, self.state
        rng = [None] * ctx.world
        if ctx.distributed:
            dist.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if ctx.is_main:
            save_torch({"model": self.task.trainable_state(), "optimizer": state.optimizer.state_dict(),
                        "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict(),
                        "global_step": state.step, "world": ctx.world, "rng": rng, "finished": finished,
                        "best": state.best, "config": self.config, "data": self.data_id, "evaluated": evaluated},
                       self.run.checkpoint)
        self.saved_step = state.step

    def save_before_data_error(self, e: DataError) -> DataError | None:
        """A batch the data path could not make (e.g. no image of it decodes): the state after the last
        completed step is saved, as a stop signal would save it, and the error to raise instead says so.
        None (raise `e` as it is): nothing trained yet, or several processes (the others wait for this one
        in a collective and cannot join a checkpoint's; the last periodic checkpoint is kept)."""
        if self.ctx.distributed or self.state.step == 0:
            return None
        if self.saved_step != self.state.step:
            self.save()
        return DataError(f"{e} (the state after step {self.state.step} is saved in {self.run.checkpoint}: once the "
                         "data is repaired, the same command resumes from it)")


def evaluation_bar(loader, desc: str, enabled: bool):
    """The loader's batches, with a progress bar over its images while an evaluation reads them (beside the
    training bar, gone when done): on the main process, when `enabled` (train.progress)."""
    if not enabled or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        yield from loader
        return
    total, size = len(loader.dataset), loader.batch_size or 1
    with tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True) as bar:
        for batch in loader:
            yield batch
            bar.update(min(size, total - bar.n))


FINISHED = "finished"  # open_run's answer for a run with nothing left to do


def open_run(task, run: RunDir, config: dict, ctx: DistContext):
    """The checkpoint to resume from, None for a fresh run, or FINISHED (then there is nothing to do).
    The config must be the run's (the one inside last.pt rules)."""
    if run.checkpoint.is_file():
        resume = run.read_checkpoint()
        run.check_config(config, resume)
        if not resume.get("finished"):
            return resume
        if ctx.is_main:
            _repair_finished(task, run, config, resume)
            log.info("run in %s already finished (step %d); nothing to do", run.path, resume["global_step"])
        return FINISHED
    if run.weights() is None:
        return None
    # final weights without a checkpoint: finished, and checkpoints/ removed to save space
    if run.stored_config() is None:
        raise RunDirError(f"{run.path} holds final weights ({run.weights().name}) but neither checkpoints/last.pt "
                          "nor a readable config.yaml, so it cannot be checked; choose a new --output, or move "
                          "the weights away to train again here")
    run.check_config(config)
    if ctx.is_main:
        log.info("run in %s already finished (its checkpoint was removed); nothing to do", run.path)
    return FINISHED


def open_data(task, cfg: TrainConfig, data_loader_fn, ctx: DistContext, run: RunDir, resume):
    """The run's data at start-up: (loader, sampler, data fingerprint, plan). The sampler slices each
    global micro batch among processes; a resumed run must see the data it was checkpointed with. The
    task is handed the evaluation side of its loaders and the epoch the run ends in (Task.attach)."""
    micro_global = cfg.batch_size // cfg.accum_steps
    if micro_global % ctx.world:
        raise ConfigError(f"train.batch_size / accum_steps = {micro_global} is not divisible by {ctx.world} processes")
    data = data_loader_fn(micro_global, ctx.rank, ctx.world, cfg.seed)
    if isinstance(data, tuple):  # a plain (loader, sampler): nothing to evaluate on
        data = Loaders(*data)
    loader, sampler = data.train, data.sampler
    data_id = data_fingerprint(loader.dataset)
    check_same_data(run, resume, data_id)
    per_epoch = sampler.steps_per_epoch // cfg.accum_steps
    if per_epoch < 1:
        raise ConfigError(f"one epoch holds fewer than {cfg.accum_steps} batches of {micro_global}; "
                          "lower train.batch_size or accum_steps")
    total = per_epoch * cfg.epochs
    plan = Plan(per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total)
    task.attach(data, last_epoch=-(-plan.total // plan.per_epoch))
    return loader, sampler, data_id, plan


def check_same_data(run: RunDir, resume: dict | None, data_id: dict) -> None:
    """A resumed run must see the data it was checkpointed with (its fingerprint: tinymim.data.sources)."""
    if resume is not None and resume.get("data") not in (None, data_id):
        raise RunDirError(
            f"the data changed since {run.path} was checkpointed (it trained on {_describe(resume['data'])}, the "
            f"data now gives {_describe(data_id)}): a different data source is a different run; restore the "
            "data, or choose a new --output")


def _describe(data: dict) -> str:
    classes = f" of {data['classes']} classes" if data.get("classes") else ""
    return f"{data.get('images')} images{classes}"


def write_run_files(task, run: RunDir, config: dict, resume) -> None:
    """What a run directory says of its run: its task, config, metrics (cut back to the checkpoint's) and classes."""
    run.write_info(task.name, task.model_section)
    run.write_config(config)
    # an evaluation the checkpoint does not hold is redone on resume: its record goes too
    run.truncate_metrics(resume["global_step"] if resume is not None else 0,
                         evaluated=resume is None or resume.get("evaluated", True))
    if task.classes is not None:
        run.write_classes(task.classes)


def _repair_finished(task, run: RunDir, config: dict, resume: dict) -> None:
    """A finished run whose final weights, config.yaml or classes went missing gets them back from
    last.pt (which holds the final trainable state and the config)."""
    if run.stored_config() is None:
        run.write_config(resume.get("config") or config)
        log.warning("%s was missing or unreadable: rewritten from the checkpoint", run.config)
    if task.classes is not None and not run.classes_file.is_file():
        run.write_classes(task.classes)
    if run.weights() is None or not readable_weights(run.weights()):
        task.load_trainable_state(resume["model"])
        task.export(run.path)
        log.warning("the final weights of %s were missing or damaged: exported again from %s (step %d)", run.path,
                    run.checkpoint, resume["global_step"])


def readable_weights(path: Path) -> bool:
    """Whether a safetensors file opens (its header and size agree): a damaged one is re-exported."""
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
        return True
    except Exception:  # noqa: BLE001 - any failure to open means "not usable"
        return False
