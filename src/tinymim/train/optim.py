"""The optimizer and its learning-rate schedule, built from the `train` settings (tinymim.train.config):
timm's optimizer with MAE's parameter groups, timm's cosine or poly schedule (or mmcv's poly), fitted into
the run's length, and that schedule said in one line."""
from __future__ import annotations

import contextlib
import logging

import timm.optim
import timm.scheduler
import torch

from tinymim.train.config import TrainConfig, lr_for, schedule_steps
from tinymim.train.mmcv_schedule import MMCV_WARMUP_RATIO, MmcvPolyLR


def build_optimizer(trainable: torch.nn.Module, cfg: TrainConfig, optimizer_kwargs: dict | None = None):
    """timm's optimizer with its parameter groups: no weight decay on biases and 1-D (norm) parameters;
    the trainable module has no no_weight_decay() list, so cls_token/pos_embed are decayed, as in MAE
    and TinyMIM. optimizer_kwargs: e.g. layer_decay for fine-tuning. `trainable` may instead be a list
    of parameter groups (each with its weight_decay and lr_scale) a task built itself."""
    opt_args = {"betas": tuple(cfg.betas)} if cfg.optimizer == "adamw" else {"momentum": cfg.momentum}
    params = ([p for g in trainable for p in g["params"]] if isinstance(trainable, list)
              else list(trainable.parameters()))
    if cfg.optimizer == "adamw" and all(p.is_cuda for p in params):
        opt_args["fused"] = True  # one kernel for the whole update on CUDA, not several per tensor
    return timm.optim.create_optimizer_v2(trainable, opt=cfg.optimizer, lr=lr_for(cfg), weight_decay=cfg.weight_decay,
                                          **opt_args, **(optimizer_kwargs or {}))


def build_scheduler(optimizer, cfg: TrainConfig, per_epoch: int):
    """Linear warmup from 0, then a half-cycle cosine (or poly) to min_lr, updated every optimizer step and
    fitted into the run's length (max_steps when it ends the run before the epochs do): schedule_steps."""
    length, warmup, _, _ = schedule_steps(cfg, per_epoch)
    common = dict(t_initial=max(1, length - warmup), lr_min=cfg.min_lr, warmup_t=warmup, warmup_lr_init=0.0,
                  warmup_prefix=True, t_in_epochs=False)
    # timm warns that a one-step decay "will have no effect"; over one step it still ends at min_lr, as meant
    with _quiet("timm.scheduler.cosine_lr", "timm.scheduler.poly_lr"):
        if cfg.schedule == "poly":
            return timm.scheduler.PolyLRScheduler(optimizer, power=cfg.poly_power, **common)
        if cfg.schedule == "poly_mmcv":
            return MmcvPolyLR(optimizer, total=length, warmup=warmup, power=cfg.poly_power, min_lr=cfg.min_lr)
        return timm.scheduler.CosineLRScheduler(optimizer, **common)


@contextlib.contextmanager
def _quiet(*loggers: str):
    """The named loggers' warnings dropped for the block."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def describe_schedule(cfg: TrainConfig, per_epoch: int) -> str:
    """The schedule in one line, as the run will follow it."""
    plan = schedule_steps(cfg, per_epoch)
    notes = []
    if plan.length < plan.planned:
        notes.append(f"train.max_steps={cfg.max_steps} ends the run before the {plan.planned} steps of its "
                     f"{cfg.epochs} epochs" + ("; warmup_epochs keeps its share" if cfg.warmup_steps is None else ""))
    if plan.warmup < plan.warmup_asked:
        notes.append(f"warmup of {plan.warmup_asked} steps cut to half the run")
    shape = "cosine" if cfg.schedule == "cosine" else f"poly (power {cfg.poly_power:g})"
    if cfg.schedule == "poly_mmcv":  # mmcv's: the poly runs from step 0, the warmup scales it
        return (f"lr schedule over {plan.length} steps: mmcv's {shape} from {lr_for(cfg):.3g} at step 0 to min_lr "
                f"{cfg.min_lr:g} after step {plan.length}, its first {plan.warmup} steps scaled up linearly from "
                f"{MMCV_WARMUP_RATIO:g} x" + "".join(f"; {n}" for n in notes))
    return (f"lr schedule over {plan.length} steps: warmup {plan.warmup} steps from 0 to {lr_for(cfg):.3g}, then "
            f"{shape} to min_lr {cfg.min_lr:g} after step {plan.length}" + "".join(f"; {n}" for n in notes))
