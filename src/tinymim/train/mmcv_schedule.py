"""The release's segmentation lr schedule, mmcv 1.x's `PolyLrUpdaterHook` by iterations with linear
warmup (`policy='poly', warmup='linear', warmup_ratio=1e-6, by_epoch=False`), as a timm scheduler: the
engine steps, saves and restores it as it does timm's own (train.schedule=poly_mmcv)."""
from __future__ import annotations

from timm.scheduler.scheduler import Scheduler

# mmcv's linear warmup starts at this share of the lr the poly gives (the release's lr_config)
MMCV_WARMUP_RATIO = 1e-6


class MmcvPolyLR(Scheduler):
    """At optimizer step t of a run of `total` steps: lr = (base - min_lr) x (1 - t/total)^power + min_lr,
    the decay counted from step 0 over the whole run (timm's poly starts it after the warmup); during
    the first `warmup` steps that lr times 1 - (1 - t/warmup) x (1 - warmup_ratio), mmcv's linear warmup.
    A parameter group's lr_scale (layer decay) multiplies the result, which is mmcv's per-group lr when
    min_lr is 0, as in the release."""

    def __init__(self, optimizer, total: int, warmup: int, power: float = 1.0, min_lr: float = 0.0,
                 warmup_ratio: float = MMCV_WARMUP_RATIO):
        self.total, self.warmup, self.power = max(1, total), warmup, power
        self.min_lr, self.warmup_ratio = min_lr, warmup_ratio
        super().__init__(optimizer, "lr", t_in_epochs=False)

    def _get_lr(self, t: int) -> list[float]:
        t = min(t, self.total)  # mmcv's runner stops at total; past it the lr stays at min_lr
        coeff = (1 - t / self.total) ** self.power
        lrs = [(base - self.min_lr) * coeff + self.min_lr for base in self.base_values]
        if t < self.warmup:
            k = (1 - t / self.warmup) * (1 - self.warmup_ratio)
            lrs = [lr * (1 - k) for lr in lrs]
        return lrs
