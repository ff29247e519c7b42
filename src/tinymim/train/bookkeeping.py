"""The training loop's bookkeeping: the `Loaders` a task's data gives, its `Plan` (the run's length in
optimizer steps) and `TrainState` (what a step advances and a checkpoint keeps), the log window and
`RunLogs` (metrics.jsonl, the trackers, the progress bar), `evaluation_bar` (an evaluation's own), the
`Checkpointer` (checkpoints/last.pt, with every process's RNG state) and the repair of a finished run
whose final files went missing."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm.auto import tqdm

from tinymim.core.files import save_torch
from tinymim.core.rundir import RunDir
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
