"""Linear probing (MAE protocol): a frozen backbone, BatchNorm without affine + a linear head.

Only the head is trained (LARS by default, as MAE; SGD also works); the backbone stays in eval
mode with no gradient, so its weights never change.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn as nn

from tinymim.core.config import checked_copy
from tinymim.models.vit import ModelConfig
from tinymim.tasks.base import TaskSpec, resolves_once
from tinymim.tasks.finetune import ClassifyDataConfig, FinetuneTask, build_classifier, classify_loaders
from tinymim.tasks.finetune_config import FinetuneConfig, check_eval_limit, training_classes, validate_classifier
from tinymim.tasks.init_run import load_with_init
from tinymim.train.config import TrainConfig


@dataclass
class LinearProbeConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="vit_base_patch16_224"))
    init: str | None = None  # pre-trained weights of the frozen backbone (run directory, file, timm name)
    num_classes: int | None = None  # null: the training data's class count
    # token: the class token (MAE's probe); avg: mean of the patch tokens
    global_pool: Literal["avg", "token"] = "token"
    # evaluate on this many images of the evaluation split, evenly spaced over it (the same ones every time,
    # as tinymim eval --limit picks them); the metrics say "N of M". null: the whole split
    eval_limit: int | None = None
    data: ClassifyDataConfig = field(default_factory=lambda: ClassifyDataConfig(auto_augment=None, reprob=0.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=90, batch_size=16384, blr=0.1, warmup_epochs=10, weight_decay=0.0, optimizer="lars"))

    def validate(self) -> None:
        validate_classifier(self)
        check_eval_limit(self.eval_limit)
        if self.model.drop_path_rate > 0:  # the frozen backbone runs in eval mode: it would never apply
            raise ValueError(f"model.drop_path_rate={self.model.drop_path_rate} cannot apply to a linear probe "
                             "(its backbone is frozen, in eval mode); set model.drop_path_rate=0")


class ProbeModel(nn.Module):
    """Frozen backbone -> BatchNorm1d(affine=False) -> Linear."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.head = nn.Sequential(nn.BatchNorm1d(backbone.num_features, affine=False, eps=1e-6),
                                  nn.Linear(backbone.num_features, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> "ProbeModel":
        super().train(mode)
        self.backbone.eval()  # frozen: no drop path, no dropout, ever
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.backbone(x)
        return self.head(feats.float())


class LinearProbeTask(FinetuneTask):
    """A linear head trained on a frozen backbone's features (MAE's linear probe), evaluated as fine-tuning."""

    name = "linprobe"

    def __init__(self, probe: ProbeModel, cfg: FinetuneConfig, num_classes: int):
        super().__init__(probe, cfg, num_classes)
        self.trainable_module = probe.head  # the optimizer (and DDP) see the head only
        self.probe = probe

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        with torch.no_grad():
            feats = self.probe.backbone(x)
        logits = self.trainable_forward(feats.float())
        return {"loss": self.criterion(logits, y)}


@resolves_once
def resolve(cfg: LinearProbeConfig) -> LinearProbeConfig:
    """A copy of `cfg` with its derived keys filled: the backbone's input size is the data's, the class
    count the training data's."""
    cfg = checked_copy(cfg)  # validated, as a loaded config is
    if cfg.model.img_size is None:
        cfg.model.img_size = cfg.data.img_size
    if cfg.num_classes is None:
        cfg.num_classes = len(training_classes(cfg.data))
    return cfg


def build_linprobe_task(cfg: LinearProbeConfig) -> LinearProbeTask:
    cfg = resolve(cfg)
    ft = FinetuneConfig(model=cfg.model, init=cfg.init, num_classes=cfg.num_classes, global_pool=cfg.global_pool,
                        mixup=0.0, cutmix=0.0, label_smoothing=0.0, eval_limit=cfg.eval_limit, data=cfg.data,
                        train=cfg.train)
    backbone = build_classifier(ft, 0)
    return LinearProbeTask(ProbeModel(backbone, cfg.num_classes), ft, cfg.num_classes)


SPEC = TaskSpec(task=LinearProbeTask, config=LinearProbeConfig, resolve=resolve, build=build_linprobe_task,
                trained=lambda cfg: build_linprobe_task(replace(cfg, init=None)).model,
                loaders=classify_loaders, kind="classify", upstream="init", exports="probe",
                load=lambda recipe, overrides: load_with_init(LinearProbeConfig, recipe, overrides),
                help="linear probe: a frozen backbone, BatchNorm + linear head")
