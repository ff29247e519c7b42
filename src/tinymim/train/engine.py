"""The training engine every tinymim task shares, readable top to bottom in `train()`.

A task is a timm-style `TrainingTask`: a module whose forward takes a batch and returns a dict of
named losses ("loss" is optimized, the others are logged), with `get_trainable_module()`,
`prepare_distributed()` and `compile()` hooks, and `export(run_dir)` for its final weights.

The engine owns: torchrun/DDP setup (gloo on CPU, nccl on GPU), seeding, AdamW with the MAE
parameter groups, lr = blr x batch / 256 with per-iteration warmup + half-cycle cosine, gradient
accumulation, fp32/bf16/fp16 autocast (GradScaler for fp16), optional torch.compile, a progress
bar, metrics.jsonl (+ TensorBoard), atomic resumable checkpoints and the NaN guard.

Run directory:  RUN_DIR/config.yaml, RUN_DIR/metrics.jsonl, RUN_DIR/checkpoints/last.pt, and the
task's final weights. Running again on the same RUN_DIR resumes; a finished run says so and exits.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist

from tinymim.core.config import ConfigError
from tinymim.core.errors import WORKER_DEATH, NonFiniteLossError, loader_worker_death
from tinymim.core.preempt import PREEMPT_EXIT_CODE, Preempted, StopSignals, signal_name  # noqa: F401 (re-exported)
from tinymim.core.rundir import RESUMABLE_CHANGES, RunDir, RunDirError, locked, save_torch, write_error  # noqa: F401
from tinymim.data.pretrain import build_loader, data_fingerprint
from tinymim.train.loggers import LOGGERS, MetricsLogger, check_available, preflight

log = logging.getLogger("tinymim")


@dataclass
class TrainConfig:
    epochs: int = 300  # passes over the training data
    batch_size: int = 4096  # global batch per optimizer step, over all processes and accumulation
    accum_steps: int = 1  # micro batches accumulated per optimizer step
    blr: float = 1.5e-4  # lr = blr x batch_size / 256, unless lr is given
    lr: float | None = None  # absolute learning rate; overrides blr when given
    min_lr: float = 0.0  # learning rate at the end of the cosine schedule
    warmup_epochs: float = 15.0  # linear warmup length, in epochs (fractions allowed)
    warmup_steps: int | None = None  # linear warmup length in optimizer steps; overrides warmup_epochs
    schedule: Literal["cosine", "poly"] = "cosine"  # after warmup: half-cycle cosine, or poly (segmentation)
    poly_power: float = 1.0  # poly schedule: lr x (1 - t/T)^power
    weight_decay: float = 0.05  # decoupled weight decay (none on biases and norms)
    optimizer: Literal["adamw", "lars", "sgd"] = "adamw"  # adamw (MAE/TinyMIM), lars (linear probe) or sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # adamw
    momentum: float = 0.9  # lars, sgd
    clip_grad: float | None = None  # gradient-norm clipping threshold; null: none
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # autocast precision: bf16, fp16 (with a grad scaler) or fp32
    compile: bool = False  # torch.compile the task's models
    # recompute the trained ViT's block activations in the backward instead of keeping them: about a
    # third more compute for much less memory, so a larger batch fits on a GPU
    activation_checkpointing: bool = False
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is there, else cpu
    seed: int = 0  # seed of every random choice (data order, augmentation, drop path, init)
    deterministic: bool = False  # ask PyTorch for deterministic kernels (slower)
    log_every: int = 20  # optimizer steps between metrics lines
    checkpoint_every: int = 500  # optimizer steps between checkpoints (also at every epoch end)
    max_steps: int | None = None  # stop after this many optimizer steps in total (quick runs)
    tensorboard: bool = False  # also log to RUN_DIR/tensorboard (needs the tensorboard extra)
    # also log to these trackers: tensorboard, wandb, mlflow (each an extra: pip install 'tinymim[wandb]')
    loggers: list[str] = field(default_factory=list)
    wandb_project: str = "tinymim"  # the W&B project
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: RUN_DIR/wandb, uploaded later by `wandb sync`
    mlflow_uri: str | None = None  # MLflow tracking URI; null: a file store in RUN_DIR/mlruns
    mlflow_experiment: str = "tinymim"  # the MLflow experiment
    progress: bool = True  # show a progress bar

    def validate(self) -> None:
        """Ranges, checked when the config is read: before anything is built or written."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "accum_steps": self.accum_steps,
                    "log_every": self.log_every, "checkpoint_every": self.checkpoint_every}
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} must be at least 1, got {value}")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by accum_steps {self.accum_steps}")
        for key in ("blr", "lr"):
            value = getattr(self, key)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{key} must be a positive number, got {value}")
        for key in ("min_lr", "warmup_epochs", "weight_decay", "momentum"):
            value = getattr(self, key)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{key} must be zero or positive, got {value}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be positive (or null for none), got {self.clip_grad}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        check_device(self.device)
        unknown = [name for name in self.loggers if name not in LOGGERS]
        if unknown:
            raise ValueError(f"unknown logger(s) {', '.join(unknown)}; choose from {', '.join(LOGGERS)}")
        check_available([*(["tensorboard"] if self.tensorboard else []), *self.loggers])


def check_device(device: str) -> None:
    """`auto`, `cpu`, `cuda` or `cuda:N`, and the GPU must be there."""
    if device in ("auto", "cpu"):
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type != "cuda":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device={device}, but PyTorch sees no CUDA GPU here; use device=cpu (or auto)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device}, but there are only {torch.cuda.device_count()} GPUs")


# ---------------------------------------------------------------------------------------------
# distributed setup


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    distributed: bool = False  # launched by torchrun: a process group and DDP, even for one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistContext:
    """Read torchrun's environment; one process without it."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return DistContext(rank, world, local_rank, dev, launched)


def cpu_performance_settings() -> None:
    """Two process-wide settings that make CPU training markedly faster (benchmarks/distill_throughput.py):

    - flush denormals to zero: softmax tails produce them, and each costs a microcode assist;
    - keep freed memory in the process (glibc): otherwise every step's large activations are
      returned to the OS and page-faulted back in, which costs more than the ops that use them.
    """
    torch.set_flush_denormal(True)
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # the largest value mallopt takes
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class HeldLogs:
    """Log records of a run's setup, held until its checks pass (`release()`), then shown: a run that
    cannot start prints its one-line error alone, not the notes of a setup that went nowhere."""

    class _Hold(logging.Handler):
        def __init__(self, records: list):
            super().__init__()
            self.records = records

        def emit(self, record) -> None:
            self.records.append(record)

    def __init__(self, logger: logging.Logger = log, replay: bool = True):
        self.logger, self.records, self.holding, self.replay = logger, [], False, replay

    def __enter__(self) -> "HeldLogs":
        self.handler, self.propagate = self._Hold(self.records), self.logger.propagate
        self.logger.addHandler(self.handler)
        self.logger.propagate, self.holding = False, True
        return self

    def _stop(self) -> None:
        if self.holding:
            self.logger.removeHandler(self.handler)
            self.logger.propagate, self.holding = self.propagate, False

    def release(self) -> None:
        if self.holding:
            self._stop()
            for record in self.records:
                self.logger.handle(record)
            self.records.clear()

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None and self.replay:
            self.release()
        self._stop()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's RNG states as plain Python values (picklable anywhere, weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def lr_for(cfg: TrainConfig) -> float:
    return cfg.lr if cfg.lr is not None else cfg.blr * cfg.batch_size / 256


# ---------------------------------------------------------------------------------------------
# preemption


# ---------------------------------------------------------------------------------------------
# the loop


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train(task, cfg: TrainConfig, data_loader_fn, run_dir: str | Path, config: dict, ctx: DistContext | None = None,
          optimizer_kwargs: dict | None = None, checked=lambda: None):
    """Train `task` and write its run directory.

    data_loader_fn(global_micro_batch, rank, world, seed) -> (loader, sampler); the sampler has
    `set_epoch(epoch, start_step)` and `steps_per_epoch` (micro steps).
    Returns the final metrics record, or None when the run had already finished.
    """
    ctx = ctx or setup_distributed(cfg.device)
    run = RunDir(run_dir)
    with locked(run, ctx.is_main, ctx.distributed), StopSignals() as stop:
        return _train(task, cfg, data_loader_fn, run, config, ctx, optimizer_kwargs, stop, checked)


FINISHED = "finished"


def _train(task, cfg: TrainConfig, data_loader_fn, run: RunDir, config: dict, ctx: DistContext,
           optimizer_kwargs, stop: StopSignals, checked):
    """The loop, nanoGPT-style: one optimizer step per iteration, then logging, evaluation at epoch
    ends, checkpoints, and a stop on request. The pieces it calls are defined below it."""
    resume = _open_run(task, run, config, ctx)
    if resume == FINISHED:
        return None
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(cfg.seed + ctx.rank)
    loader, sampler, data_id, plan = _data(cfg, data_loader_fn, ctx, run, resume)
    if ctx.is_main:
        preflight(cfg)  # a tracker that cannot start is said before anything is written
    checked()  # from here on the directory is written
    if ctx.is_main:
        _write_run_files(task, run, config, resume)
    optimizer, scheduler, scaler = _prepare(task, cfg, ctx, plan, optimizer_kwargs)
    state = TrainState(optimizer, scheduler, scaler)
    if resume is not None:
        _restore(task, state, resume, cfg, ctx, run)
    scheduler.step_update(state.step)
    logs = RunLogs(run, ctx, cfg, config, plan, task.name, state.step)
    task.last_epoch = -(-plan.total // plan.per_epoch)  # a task evaluating every N epochs still evaluates the end
    checkpointer = Checkpointer(task, state, run, ctx, config, data_id)
    if stop.received is not None:  # asked during start-up: nothing new to save, nothing lost
        kept = f"its checkpoint at step {state.step} is kept" if resume is not None else "nothing had trained yet"
        raise Preempted(f"stopped on {signal_name(stop.received)} during start-up, before step {state.step + 1} "
                        f"of {plan.total}; {kept}; run the same command again to resume")
    task.train()
    batches = None
    try:
        if resume is not None and resume.get("evaluated") is False:  # stopped during its epoch's evaluation
            logs.evaluation(_evaluate(task, state, cfg, ctx, run, plan))
            checkpointer.save()
        while state.step < plan.total:
            epoch, step_in_epoch = divmod(state.step, plan.per_epoch)
            sampler.set_epoch(epoch, step_in_epoch * cfg.accum_steps)
            batches = iter(loader)
            for _ in range(step_in_epoch, min(plan.per_epoch, step_in_epoch + plan.total - state.step)):
                losses, stopping = train_step(task, batches, cfg, ctx, state, logs.window, stop, run.checkpoint)
                state.step += 1
                scheduler.step_update(state.step)
                task.after_step(state.step)
                logs.step(state.step, losses, optimizer)
                epoch_end = state.step % plan.per_epoch == 0 or state.step == plan.total
                saved = state.step % cfg.checkpoint_every == 0 or epoch_end
                if saved:
                    # the epoch's training is saved before its evaluation: an evaluation that fails (a bad
                    # label, a killed worker) is redone on resume, the epoch is not
                    checkpointer.save(evaluated=not epoch_end)
                if epoch_end:
                    record = _evaluate(task, state, cfg, ctx, run, plan)
                    logs.evaluation(record)
                    if record is not None and state.step < plan.total:
                        checkpointer.save()  # with the evaluation's best
                if stopping and not saved:
                    checkpointer.save()
                if stopping and state.step < plan.total:
                    raise Preempted(f"stopped on {signal_name(stop.received)} at step {state.step} of {plan.total}; "
                                    f"checkpoint written to {run.checkpoint}; run the same command again to resume")
        if ctx.is_main:
            task.export(run.path)
        checkpointer.save(finished=True)
    finally:
        # the loader's workers end now, not whenever the iterator is collected (an exception's
        # traceback may hold it; the workers ignore stop signals, so they must be told)
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            with contextlib.suppress(*WORKER_DEATH):  # a dead worker's pipe: the error on its way says so
                shutdown()
        batches = None  # noqa: F841
        logs.close()
    return logs.final()


# ---------------------------------------------------------------------------------------------
# the loop's pieces


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


def _open_run(task, run: RunDir, config: dict, ctx: DistContext):
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


def _data(cfg: TrainConfig, data_loader_fn, ctx: DistContext, run: RunDir, resume):
    """(loader, sampler, data fingerprint, plan): the sampler slices each global micro batch among
    processes; a resumed run must see the data it was checkpointed with."""
    micro_global = cfg.batch_size // cfg.accum_steps
    if micro_global % ctx.world:
        raise ConfigError(f"train.batch_size / accum_steps = {micro_global} is not divisible by {ctx.world} processes")
    loader, sampler = data_loader_fn(micro_global, ctx.rank, ctx.world, cfg.seed)
    data_id = data_fingerprint(loader.dataset)
    if resume is not None and resume.get("data") not in (None, data_id):
        raise RunDirError(
            f"the data changed since {run.path} was checkpointed (it trained on {_describe(resume['data'])}, the "
            f"data now gives {_describe(data_id)}): a different data source is a different run; restore the "
            "data, or choose a new --output")
    per_epoch = sampler.steps_per_epoch // cfg.accum_steps
    if per_epoch < 1:
        raise ConfigError(f"one epoch holds fewer than {cfg.accum_steps} batches of {micro_global}; "
                          "lower train.batch_size or accum_steps")
    total = per_epoch * cfg.epochs
    return loader, sampler, data_id, Plan(per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total)


def _write_run_files(task, run: RunDir, config: dict, resume) -> None:
    run.write_info(task.name, task.model_section)
    run.write_config(config)
    # an evaluation the checkpoint does not hold is redone on resume: its record goes too
    run.truncate_metrics(resume["global_step"] if resume is not None else 0,
                         evaluated=resume is None or resume.get("evaluated", True))
    if getattr(task, "classes", None) is not None:
        run.write_classes(task.classes)


def build_optimizer(trainable: torch.nn.Module, cfg: TrainConfig, optimizer_kwargs: dict | None = None):
    """timm's optimizer with its parameter groups: no weight decay on biases and 1-D (norm) parameters;
    the trainable module has no no_weight_decay() list, so cls_token/pos_embed are decayed, as in MAE
    and TinyMIM. optimizer_kwargs: e.g. layer_decay for fine-tuning. `trainable` may instead be a list
    of parameter groups (each with its weight_decay and lr_scale) a task built itself."""
    import timm.optim

    opt_args = {"betas": tuple(cfg.betas)} if cfg.optimizer == "adamw" else {"momentum": cfg.momentum}
    params = ([p for g in trainable for p in g["params"]] if isinstance(trainable, list)
              else list(trainable.parameters()))
    if cfg.optimizer == "adamw" and all(p.is_cuda for p in params):
        opt_args["fused"] = True  # one kernel for the whole update on CUDA, not several per tensor
    return timm.optim.create_optimizer_v2(trainable, opt=cfg.optimizer, lr=lr_for(cfg), weight_decay=cfg.weight_decay,
                                          **opt_args, **(optimizer_kwargs or {}))


def build_scheduler(optimizer, cfg: TrainConfig, per_epoch: int):
    """Linear warmup from 0, then a half-cycle cosine (or poly) to min_lr, updated every optimizer step,
    over the run's length (max_steps when it is shorter than the epochs)."""
    import timm.scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_epochs * per_epoch))
    length = per_epoch * cfg.epochs if cfg.schedule == "cosine" else min(
        per_epoch * cfg.epochs, cfg.max_steps or per_epoch * cfg.epochs)
    common = dict(t_initial=max(1, length - warmup), lr_min=cfg.min_lr, warmup_t=warmup, warmup_lr_init=0.0,
                  warmup_prefix=True, t_in_epochs=False)
    if cfg.schedule == "poly":
        return timm.scheduler.PolyLRScheduler(optimizer, power=cfg.poly_power, **common)
    return timm.scheduler.CosineLRScheduler(optimizer, **common)


def _prepare(task, cfg: TrainConfig, ctx: DistContext, plan: Plan, optimizer_kwargs):
    """The task on its device (compiled, wrapped for DDP), its optimizer, schedule and grad scaler."""
    if ctx.device.type == "cpu":
        cpu_performance_settings()
    task.to(ctx.device)
    task.prepare(ctx.device, cfg.precision)
    if cfg.activation_checkpointing:
        task.set_grad_checkpointing(True)
    if cfg.compile:
        task.compile()
    if ctx.distributed:
        task.prepare_distributed(device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    groups = task.param_groups(cfg.weight_decay)
    optimizer = build_optimizer(groups if groups is not None else task.get_trainable_module(), cfg, optimizer_kwargs)
    scheduler = build_scheduler(optimizer, cfg, plan.per_epoch)
    return optimizer, scheduler, torch.amp.GradScaler(ctx.device.type, enabled=cfg.precision == "fp16")


def _restore(task, state: TrainState, resume: dict, cfg: TrainConfig, ctx: DistContext, run: RunDir) -> None:
    state.best = resume.get("best", state.best)
    task.load_trainable_state(resume["model"])
    state.optimizer.load_state_dict(resume["optimizer"])
    state.scheduler.load_state_dict(resume["scheduler"])
    state.scaler.load_state_dict(resume["scaler"])
    state.step = resume["global_step"]
    if resume["world"] == ctx.world:
        set_rng_state(resume["rng"][ctx.rank])
    else:  # RNG streams are per process; a new process count gets fresh, still seeded ones
        seed_everything(cfg.seed + ctx.rank + 7919 * state.step)
        if ctx.is_main:
            log.warning("resuming with %d processes instead of %d: drop-path randomness will differ",
                        ctx.world, resume["world"])
    if ctx.is_main:
        log.info("resuming %s from step %d", run.path, state.step)


@dataclass
class LogWindow:
    """Sums over the optimizer steps since the last metrics line."""

    t0: float = field(default_factory=time.perf_counter)
    images: int = 0
    steps: int = 0
    skipped: int = 0
    sums: dict = field(default_factory=dict)


def train_step(task, batches, cfg: TrainConfig, ctx: DistContext, state: TrainState, window: LogWindow,
               stop: StopSignals, checkpoint: Path) -> tuple[dict[str, float], bool]:
    """One optimizer step over accum_steps micro batches (DDP syncs gradients on the last only).
    Returns the step's losses averaged over processes, and whether any process was asked to stop."""
    sums = {}
    for micro in range(cfg.accum_steps):
        batch = next_batch(batches)
        sync = micro == cfg.accum_steps - 1
        with (contextlib.nullcontext() if sync else task.no_sync()):
            with _autocast(ctx.device, cfg.precision):
                out = task(batch)
            state.scaler.scale(out["loss"] / cfg.accum_steps).backward()
        for k, v in out.items():
            if k.startswith("loss"):
                sums[k] = sums.get(k, 0.0) + v.detach().float() / cfg.accum_steps
        window.images += len(batch["label"]) * ctx.world
        window.skipped += batch["skipped"]
    names = sorted(sums)
    # a stop request rides with the losses' all-reduce: every process sees it at the same step
    requested = torch.ones(1) if stop.received is not None else torch.zeros(1)
    values = torch.cat([torch.stack([sums[k] for k in names]), requested.to(sums[names[0]])])
    if ctx.distributed:
        dist.all_reduce(values)
        values /= ctx.world
    values, stopping = values[:-1], bool(values[-1] > 0)
    if not torch.isfinite(values).all():
        bad = {k: float(v) for k, v in zip(names, values)}
        raise NonFiniteLossError(
            f"non-finite loss at step {state.step + 1}: {bad}. "
            + (f"The last good checkpoint, {checkpoint}, is kept. " if checkpoint.is_file() else
               "No checkpoint had been written yet: the run starts over. ")
            + "Lower the learning rate (train.blr), use train.precision=bf16 or fp32 instead of fp16, or set "
            "train.clip_grad.")
    if cfg.clip_grad is not None:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(task.get_trainable_module().parameters(), cfg.clip_grad)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    return dict(zip(names, values.tolist())), stopping


def next_batch(batches):
    """next(batches), with a loader worker's death in every form it takes as one error."""
    try:
        return next(batches)
    except (RuntimeError, *WORKER_DEATH) as e:
        died = loader_worker_death(e)
        if died is None:
            raise
        raise died from e


def _evaluate(task, state: TrainState, cfg: TrainConfig, ctx: DistContext, run: RunDir, plan: Plan) -> dict | None:
    """The task's end-of-epoch evaluation as a metrics record; a new best exports the best weights."""
    task.eval()
    with torch.no_grad(), _autocast(ctx.device, cfg.precision):
        result = task.evaluate(-(-state.step // plan.per_epoch))
    task.train()
    if not result:
        return None
    record = {"step": state.step, "epoch": round(state.step / plan.per_epoch, 4),
              **{f"val_{k}": v for k, v in result.items()}}
    if task.best_metric and result[task.best_metric] > state.best:
        state.best = result[task.best_metric]
        if ctx.is_main:
            task.export_best(run.path)
    if task.best_metric:
        record["val_best"] = state.best
    return record


class RunLogs:
    """metrics.jsonl and the trackers (MetricsLogger), the progress bar, and the log window."""

    def __init__(self, run: RunDir, ctx: DistContext, cfg: TrainConfig, config: dict, plan: Plan, name: str,
                 step: int):
        self.ctx, self.cfg, self.plan = ctx, cfg, plan
        self.metrics = MetricsLogger(run, ctx.is_main, cfg, config)
        self.bar = None
        if ctx.is_main and cfg.progress:
            from tqdm.auto import tqdm
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
            if self.ctx.distributed:
                dist.all_reduce(skipped)
            self.last = {"step": step, "epoch": round(step / self.plan.per_epoch, 4),
                         **{k: s / w.steps for k, s in w.sums.items()},
                         "lr": max(g["lr"] for g in optimizer.param_groups),
                         "images_per_s": w.images / (time.perf_counter() - w.t0), "skipped_images": int(skipped)}
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


def _repair_finished(task, run: RunDir, config: dict, resume: dict) -> None:
    """A finished run whose final weights, config.yaml or classes went missing gets them back from
    last.pt (which holds the final trainable state and the config)."""
    if run.stored_config() is None:
        run.write_config(resume.get("config") or config)
        log.warning("%s was missing or unreadable: rewritten from the checkpoint", run.config)
    if getattr(task, "classes", None) is not None and not run.classes_file.is_file():
        run.write_classes(task.classes)
    if run.weights() is None or not readable_weights(run.weights()):
        task.load_trainable_state(resume["model"])
        task.export(run.path)
        log.warning("the final weights of %s were missing or damaged: exported again from %s (step %d)", run.path,
                    run.checkpoint, resume["global_step"])


def readable_weights(path: Path) -> bool:
    """Whether a safetensors file opens (its header and size agree): a damaged one is re-exported."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
        return True
    except Exception:  # noqa: BLE001 - any failure to open means "not usable"
        return False


def _describe(data: dict) -> str:
    classes = f" of {data['classes']} classes" if data.get("classes") else ""
    return f"{data.get('images')} images{classes}"


class TaskDefinition(Protocol):
    """What the engine uses of a task's registry entry (tinymim.tasks.base.TaskSpec)."""

    build: Callable  # config -> the Task: models built, weights loaded
    loaders: Callable | None  # (task, global micro batch, rank, world, seed) -> (loader, sampler)
    optimizer_options: Callable  # config -> extra options of build_optimizer (e.g. layer_decay)


def run_task(spec: TaskDefinition, cfg, output: str | Path):
    """Build the task of a config with `data` and `train` sections and train it.

    The model is built after seeding with train.seed, identically in every process (a random
    teacher must be the same on every rank); the resolved config is saved with the run. Without
    its own loaders a task gets the paired-view loader of pre-training.
    """
    ctx = setup_distributed(cfg.train.device)
    # the run directory is locked before anything is built: a second process refuses at once
    with locked(RunDir(output), ctx.is_main, ctx.distributed), HeldLogs() as held:
        seed_everything(cfg.train.seed)
        task = spec.build(cfg)
        config = json.loads(json.dumps(asdict(cfg)))  # plain types only (YAML- and compare-friendly)

        def loader_fn(batch, rank, world, seed):
            if spec.loaders is not None:
                return spec.loaders(task, batch, rank, world, seed)
            return build_loader(cfg.data, batch, rank, world, seed,
                                pin_memory=torch.cuda.is_available() and cfg.train.device != "cpu")

        return train(task, cfg.train, loader_fn, output, config, ctx, optimizer_kwargs=spec.optimizer_options(cfg),
                     checked=held.release)
