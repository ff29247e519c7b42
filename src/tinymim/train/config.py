"""`TrainConfig`, the `train` section of every task's config, with its range checks (`check_device`:
the device asked for is there), `lr_for`, the learning rate it gives, and `schedule_steps`, the length
of its warmup and of the whole schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch

from tinymim.train.loggers import LOGGERS, check_available


@dataclass
class TrainConfig:
    epochs: int = 300  # passes over the training data
    batch_size: int = 4096  # global batch per optimizer step, over all processes and accumulation
    accum_steps: int = 1  # micro batches accumulated per optimizer step
    blr: float = 1.5e-4  # lr = blr x batch_size / 256, unless lr is given
    lr: float | None = None  # absolute learning rate; overrides blr when given
    min_lr: float = 0.0  # learning rate the schedule (cosine or poly) ends at, after the run's last step
    # linear warmup from 0, in epochs (fractions allowed); a run max_steps ends early keeps the same share of it
    warmup_epochs: float = 15.0
    # linear warmup in optimizer steps, as given; overrides warmup_epochs. Either warmup is cut to half the run at most
    warmup_steps: int | None = None
    # after warmup: half-cycle cosine, or poly; poly_mmcv: the release's segmentation schedule (mmcv's
    # PolyLrUpdaterHook): the poly counted from step 0 over the whole run, the warmup scaling it up from 1e-6 x
    schedule: Literal["cosine", "poly", "poly_mmcv"] = "cosine"
    poly_power: float = 1.0  # poly schedule: lr x (1 - t/T)^power
    weight_decay: float = 0.05  # decoupled weight decay (none on biases and norms)
    optimizer: Literal["adamw", "lars", "sgd"] = "adamw"  # adamw (MAE/TinyMIM), lars (linear probe) or sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # adamw
    momentum: float = 0.9  # lars, sgd
    clip_grad: float | None = None  # gradient-norm clipping threshold; null: none
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # autocast precision: bf16, fp16 (with a grad scaler) or fp32
    compile: bool = False  # torch.compile the task's models
    # compile: torch.compile's mode: null (its default), reduce-overhead (CUDA graphs: less launch
    # overhead, more memory), max-autotune (also searches kernel configurations: minutes at the start)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    # recompute the trained ViT's block activations in the backward instead of keeping them: about a
    # third more compute for much less memory, so a larger batch fits on a GPU
    activation_checkpointing: bool = False
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is there, else cpu
    seed: int = 0  # seed of every random choice (data order, augmentation, drop path, init)
    deterministic: bool = False  # ask PyTorch for deterministic kernels (slower)
    log_every: int = 20  # optimizer steps between metrics lines
    checkpoint_every: int = 500  # optimizer steps between checkpoints (also at every epoch end)
    # end the run after this many optimizer steps (quick runs); the whole lr schedule, warmup then cosine (or
    # poly) down to min_lr, is fitted into them, so a short run anneals as a full one does
    max_steps: int | None = None
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
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be zero or positive (or null: warmup_epochs), got {self.warmup_steps}")
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


def lr_for(cfg: TrainConfig) -> float:
    return cfg.lr if cfg.lr is not None else cfg.blr * cfg.batch_size / 256


class Schedule(NamedTuple):
    """The lr schedule's shape in optimizer steps."""

    length: int  # the run's steps: warmup, then the decay to min_lr
    warmup: int  # warmup steps the run takes
    warmup_asked: int  # warmup steps before the cut to half the run
    planned: int  # steps in the epochs asked (more than length when max_steps ends the run early)


def schedule_steps(cfg: TrainConfig, per_epoch: int) -> Schedule:
    """The lr schedule of a run. It spans the run: its epochs, or max_steps when that ends the run sooner,
    so a short run warms up and anneals to min_lr too. warmup_epochs is a share of the epochs and keeps
    that share of a run max_steps shortens; warmup_steps counts steps as given. Either is cut to half
    the run at most: the decay always has steps to run."""
    planned = per_epoch * cfg.epochs
    length = min(planned, cfg.max_steps) if cfg.max_steps else planned
    if cfg.warmup_steps is not None:
        warmup = cfg.warmup_steps
    elif length == planned:
        warmup = int(round(cfg.warmup_epochs * per_epoch))
    else:
        warmup = int(round(cfg.warmup_epochs / cfg.epochs * length))
    return Schedule(length, min(warmup, length // 2), warmup, planned)
