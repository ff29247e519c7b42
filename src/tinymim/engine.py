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
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from tinymim.config import ConfigError
from tinymim.data import data_fingerprint
from tinymim.errors import NonFiniteLossError, TinymimError
from tinymim.loggers import LOGGERS, MetricsLogger, check_available
from tinymim.rundir import RESUMABLE_CHANGES, RunDir, RunDirError, locked, save_torch, write_error  # noqa: F401

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
    weight_decay: float = 0.05  # decoupled weight decay (none on biases and norms)
    optimizer: Literal["adamw", "lars", "sgd"] = "adamw"  # adamw (MAE/TinyMIM), lars (linear probe) or sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # adamw
    momentum: float = 0.9  # lars, sgd
    clip_grad: float | None = None  # gradient-norm clipping threshold; null: none
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # autocast precision: bf16, fp16 (with a grad scaler) or fp32
    compile: bool = False  # torch.compile the task's models
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
        check_available(self.loggers)


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


PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request, resumable; schedulers may requeue on it


class Preempted(TinymimError):
    """The run stopped on a scheduler's signal after writing a checkpoint; the same command resumes."""

    exit_code = PREEMPT_EXIT_CODE


class StopSignals:
    """SIGTERM (a scheduler's "you have N seconds") and SIGUSR1 (SLURM's early warning with
    `--signal=USR1@SECONDS`) ask the run to stop at the end of the current step; the handlers only
    note the request. Installed for the block, in the main thread only (signals are delivered there)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _note(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


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


def _train(task, cfg: TrainConfig, data_loader_fn, run: RunDir, config: dict, ctx: DistContext,
           optimizer_kwargs, stop: StopSignals, checked):
    # an existing run: same config (the one inside last.pt rules); a finished one says so and exits
    resume = None
    if run.checkpoint.is_file():
        resume = run.read_checkpoint()
        run.check_config(config, resume)
        if resume.get("finished"):
            if ctx.is_main:
                _repair_finished(task, run, config, resume)
                log.info("run in %s already finished (step %d); nothing to do", run.path, resume["global_step"])
            return None
    elif run.weights() is not None:  # finished, and its checkpoint removed to save space
        if run.stored_config() is None:
            raise RunDirError(f"{run.path} holds final weights ({run.weights().name}) but neither checkpoints/last.pt "
                              "nor a readable config.yaml, so it cannot be checked; choose a new --output, or move "
                              "the weights away to train again here")
        run.check_config(config)
        if ctx.is_main:
            log.info("run in %s already finished (its checkpoint was removed); nothing to do", run.path)
        return None

    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(cfg.seed + ctx.rank)

    # data: the sampler slices each global micro batch among processes
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

    updates_per_epoch = sampler.steps_per_epoch // cfg.accum_steps
    if updates_per_epoch < 1:
        raise ConfigError(f"one epoch holds fewer than {cfg.accum_steps} batches of {micro_global}; "
                          "lower train.batch_size or accum_steps")

    # from here on the directory is written: the config, metrics from the resumed step, the classes
    checked()
    if ctx.is_main:
        run.write_info(task.name)
        run.write_config(config)
        run.truncate_metrics(resume["global_step"] if resume is not None else 0)
        if getattr(task, "classes", None) is not None:
            run.write_classes(task.classes)
    total_updates = updates_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_updates = min(total_updates, cfg.max_steps)

    # model, optimizer, schedule, precision
    import timm.optim
    import timm.scheduler

    if ctx.device.type == "cpu":
        cpu_performance_settings()
    task.to(ctx.device)
    task.prepare(ctx.device, cfg.precision)
    if cfg.compile:
        task.compile()
    if ctx.distributed:
        task.prepare_distributed(device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    trainable = task.get_trainable_module()
    lr = lr_for(cfg)
    # timm's parameter groups: no weight decay on biases and 1-D (norm) parameters; the trainable
    # module has no no_weight_decay() list, so cls_token/pos_embed are decayed, as in MAE and TinyMIM
    opt_args = {"betas": tuple(cfg.betas)} if cfg.optimizer == "adamw" else {"momentum": cfg.momentum}
    optimizer = timm.optim.create_optimizer_v2(trainable, opt=cfg.optimizer, lr=lr, weight_decay=cfg.weight_decay,
                                               **opt_args, **(optimizer_kwargs or {}))
    warmup = int(round(cfg.warmup_epochs * updates_per_epoch))
    scheduler = timm.scheduler.CosineLRScheduler(
        optimizer, t_initial=max(1, updates_per_epoch * cfg.epochs - warmup), lr_min=cfg.min_lr,
        warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.precision == "fp16")

    global_step, best = 0, float("-inf")
    if resume is not None:
        best = resume.get("best", best)
        task.load_trainable_state(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        global_step = resume["global_step"]
        if resume["world"] == ctx.world:
            set_rng_state(resume["rng"][ctx.rank])
        else:  # RNG streams are per process; a new process count gets fresh, still seeded ones
            seed_everything(cfg.seed + ctx.rank + 7919 * global_step)
            if ctx.is_main:
                log.warning("resuming with %d processes instead of %d: drop-path randomness will differ",
                            ctx.world, resume["world"])
        if ctx.is_main:
            run.truncate_metrics(global_step)
            log.info("resuming %s from step %d", run.path, global_step)
    scheduler.step_update(global_step)

    metrics = MetricsLogger(run, ctx.is_main, cfg, config)
    bar = None
    if ctx.is_main and cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_updates, initial=global_step, desc=task.name, unit="step", dynamic_ncols=True)

    def save(finished: bool = False) -> None:
        rng = [None] * ctx.world
        if ctx.distributed:
            dist.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if ctx.is_main:
            save_torch({"model": task.trainable_state(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                        "global_step": global_step, "world": ctx.world, "rng": rng, "finished": finished,
                        "best": best, "config": config, "data": data_id}, run.checkpoint)

    window = {"t0": time.perf_counter(), "images": 0, "steps": 0, "sums": {}, "skipped": 0, "reported_skips": 0}
    last, last_eval = None, {}
    task.train()
    batches = None
    try:
        while global_step < total_updates:
            epoch, step_in_epoch = divmod(global_step, updates_per_epoch)
            sampler.set_epoch(epoch, step_in_epoch * cfg.accum_steps)
            batches = iter(loader)
            for _ in range(step_in_epoch, updates_per_epoch):
                if global_step >= total_updates:
                    break
                # one optimizer step = accum_steps micro batches; DDP syncs grads on the last only
                sums = {}
                for micro in range(cfg.accum_steps):
                    batch = next(batches)
                    sync = micro == cfg.accum_steps - 1
                    with (contextlib.nullcontext() if sync else task.no_sync()):
                        with _autocast(ctx.device, cfg.precision):
                            out = task(batch)
                        scaler.scale(out["loss"] / cfg.accum_steps).backward()
                    for k, v in out.items():
                        if k.startswith("loss"):
                            sums[k] = sums.get(k, 0.0) + v.detach().float() / cfg.accum_steps
                    window["images"] += batch["image"].shape[0] * ctx.world
                    window["skipped"] += batch["skipped"]
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
                        f"non-finite loss at step {global_step + 1} (epoch {epoch}): {bad}. The last good "
                        f"checkpoint, {run.checkpoint}, is kept. Lower the learning rate (train.blr), use "
                        "train.precision=bf16 or fp32 instead of fp16, or set train.clip_grad.")
                if cfg.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                scheduler.step_update(global_step)
                task.after_step(global_step)

                for k, v in zip(names, values.tolist()):
                    window["sums"][k] = window["sums"].get(k, 0.0) + v
                window["steps"] += 1
                if global_step % cfg.log_every == 0 or global_step == 1 or global_step == total_updates:
                    elapsed = time.perf_counter() - window["t0"]
                    # on the device: nccl reduces only device tensors
                    skipped = torch.tensor(float(window["skipped"]), device=ctx.device)
                    if ctx.distributed:
                        dist.all_reduce(skipped)
                    last = {"step": global_step, "epoch": round(global_step / updates_per_epoch, 4),
                            **{k: s / window["steps"] for k, s in window["sums"].items()},
                            "lr": max(g["lr"] for g in optimizer.param_groups), "images_per_s": window["images"] / elapsed,
                            "skipped_images": int(skipped)}
                    metrics.log(last)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
                    if int(skipped) > window["reported_skips"] and ctx.is_main:
                        log.warning("%d unreadable images skipped so far", int(skipped))
                    window["reported_skips"] = int(skipped)
                    window.update(t0=time.perf_counter(), images=0, steps=0, sums={})
                if bar is not None:
                    bar.update(1)
                if global_step % updates_per_epoch == 0 or global_step == total_updates:
                    task.eval()
                    with torch.no_grad(), _autocast(ctx.device, cfg.precision):
                        result = task.evaluate(-(-global_step // updates_per_epoch))
                    task.train()
                    if result:
                        record = {"step": global_step, "epoch": round(global_step / updates_per_epoch, 4),
                                  **{f"val_{k}": v for k, v in result.items()}}
                        if task.best_metric and result[task.best_metric] > best:
                            best = result[task.best_metric]
                            if ctx.is_main:
                                task.export_best(run.path)
                        if task.best_metric:
                            record["val_best"] = best
                        metrics.log(record)
                        last_eval = record
                        if bar is not None:
                            bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in record.items()))
                checkpointed = False
                if global_step % cfg.checkpoint_every == 0 or global_step % updates_per_epoch == 0:
                    if global_step < total_updates:
                        save()
                        checkpointed = True
                if stopping and global_step < total_updates:
                    if not checkpointed:
                        save()
                    name = signal.Signals(stop.received).name if stop.received is not None else "a signal"
                    raise Preempted(f"stopped on {name} at step {global_step} of {total_updates}; checkpoint "
                                    f"written to {run.checkpoint}; run the same command again to resume")
        if ctx.is_main:
            task.export(run.path)
        save(finished=True)
    finally:
        # the loader's workers end now, not whenever the iterator is collected (an exception's
        # traceback may hold it; the workers ignore stop signals, so they must be told)
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        batches = None  # noqa: F841
        metrics.close()
        if bar is not None:
            bar.close()
    return {**(last or {}), **last_eval}


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


def run_task(build, cfg, output: str | Path, make_loader=None, optimizer_kwargs: dict | None = None):
    """Build a task from a config with `data` and `train` sections and train it.

    The model is built after seeding with train.seed, identically in every process (a random
    teacher must be the same on every rank); the resolved config is saved with the run.
    make_loader(task, global_micro_batch, rank, world, seed) -> (loader, sampler); by default the
    paired-view loader of pre-training.
    """
    from dataclasses import asdict

    from tinymim.data import build_loader

    ctx = setup_distributed(cfg.train.device)
    # the run directory is locked before anything is built: a second process refuses at once
    with locked(RunDir(output), ctx.is_main, ctx.distributed), HeldLogs() as held:
        seed_everything(cfg.train.seed)
        task = build(cfg)
        config = json.loads(json.dumps(asdict(cfg)))  # plain types only (YAML- and compare-friendly)

        def loader_fn(batch, rank, world, seed):
            if make_loader is not None:
                return make_loader(task, batch, rank, world, seed)
            return build_loader(cfg.data, batch, rank, world, seed,
                                pin_memory=torch.cuda.is_available() and cfg.train.device != "cpu")

        return train(task, cfg.train, loader_fn, output, config, ctx, optimizer_kwargs=optimizer_kwargs,
                     checked=held.release)
