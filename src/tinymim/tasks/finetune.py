"""Fine-tuning a pre-trained ViT for classification: the MAE recipe (TINYMIM.md section 4).

Layer-wise lr decay (timm's parameter groups: embeddings = layer 0, block j = layer j+1, head =
layer L+1, scale decay^(L+1-layer)), drop path, mixup / cutmix, label smoothing, RandAugment and
random erasing (timm's implementations), warmup + cosine, global average pooling + fc_norm or the
class token, head init trunc-normal std 2e-5, optional model EMA. Evaluates top-1 / top-5 every
epoch; keeps the last and the best weights (RUN_DIR/model.safetensors, RUN_DIR/best.safetensors).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from tinymim.checkpoint import load_vit_weights, load_weights, save_weights
from tinymim.classification import (ClassifyDataConfig, ClassifyDataset, build_classify_loaders,  # noqa: F401
                                    build_eval_loader, classification_sums, classify_source, collate_classify,
                                    sums_to_metrics)
from tinymim.config import ConfigError
from tinymim.engine import TrainConfig
from tinymim.models import ModelConfig, create_vit
from tinymim.rundir import RunDir
from tinymim.tasks import TASKS
from tinymim.tasks.base import Task

log = logging.getLogger("tinymim")


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="vit_base_patch16_224", drop_path_rate=0.1))
    # pre-trained weights (run directory, file, timm name); None = random init, the from-scratch baseline
    init: str | None = None
    num_classes: int | None = None  # None: the training data's class count
    global_pool: Literal["avg", "token"] = "avg"  # avg: mean of patch tokens + fc_norm (MAE)
    head_init_std: float = 2e-5  # std of the fresh classifier head's trunc-normal init
    layer_decay: float = 0.65  # layer-wise lr decay: block j gets decay^(depth+1-j) of the lr
    mixup: float = 0.8  # mixup alpha; 0: off
    cutmix: float = 1.0  # cutmix alpha; 0: off
    label_smoothing: float = 0.1  # label smoothing of the cross-entropy
    ema_decay: float | None = None  # e.g. 0.9999; None = no EMA
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=100, batch_size=1024, blr=5e-4, warmup_epochs=5, min_lr=1e-6, weight_decay=0.05,
        betas=[0.9, 0.999]))

    def validate(self) -> None:
        validate_classifier(self)
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.mixup < 0 or self.cutmix < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError("mixup and cutmix must be 0 or more, label_smoothing in [0, 1)")


def validate_classifier(cfg) -> None:
    """What fine-tuning and linear probing share: the model takes the data's images, a class count."""
    from tinymim.models import check_input_size

    check_input_size(cfg.model, cfg.data.img_size, "model")
    if cfg.num_classes is not None and cfg.num_classes < 1:
        raise ValueError(f"num_classes must be positive (or null: the training data's), got {cfg.num_classes}")


class FinetuneTask(Task):
    name = "finetune"
    best_metric = "top1"

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, num_classes: int):
        super().__init__(model)
        self.model, self.cfg, self.num_classes = model, cfg, num_classes
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                               num_classes=num_classes)
            self.criterion = SoftTargetCrossEntropy()
        elif cfg.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.ema = None
        self.eval_loader = None
        self.classes: list[str] | None = None  # the training data's, set with its loader

    def setup_model_ema(self) -> None:
        if self.cfg.ema_decay:
            from timm.utils import ModelEmaV3
            # a registered submodule: it follows the task to its device (timm's EMA lerps in place)
            self.ema = ModelEmaV3(self.model, decay=self.cfg.ema_decay)

    _EMA = "__ema__."

    def trainable_state(self) -> dict:
        """The model, plus its EMA copy when there is one (so a resumed run keeps averaging)."""
        state = dict(self.model.state_dict())
        if self.ema is not None:
            state.update({self._EMA + k: v for k, v in self.ema.module.state_dict().items()})
        return state

    def load_trainable_state(self, state: dict) -> None:
        self.model.load_state_dict({k: v for k, v in state.items() if not k.startswith(self._EMA)})
        ema = {k[len(self._EMA):]: v for k, v in state.items() if k.startswith(self._EMA)}
        if self.ema is not None and ema:
            self.ema.module.load_state_dict(ema)

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=step)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        if self.mixup is not None and self.training:
            x, y = self.mixup(x, y)
        logits = self.trainable_forward(x)
        return {"loss": self.criterion(logits, y)}

    def evaluate(self, epoch: int) -> dict | None:
        if self.eval_loader is None:
            return None
        model = self.ema.module if self.ema is not None else self.model
        sums = classification_sums(model, self.eval_loader, self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        metrics = sums_to_metrics(sums)
        metrics.pop("images")
        return metrics

    def export(self, run_dir: Path) -> None:
        model = self.ema.module if self.ema is not None else self.model
        meta = {"format": "timm.VisionTransformer", "model": json.dumps(asdict(self.cfg.model))}
        save_weights(model.state_dict(), Path(run_dir) / TASKS[self.name].weights, meta)

    def export_best(self, run_dir: Path) -> None:
        model = self.ema.module if self.ema is not None else self.model
        save_weights(model.state_dict(), Path(run_dir) / RunDir.BEST)


def build_classifier(cfg: FinetuneConfig, num_classes: int) -> nn.Module:
    # through create_vit, so every model.* key (init, pos_embed, drop_path_schedule, block_heads,
    # pretrained) builds the model it names, as in pre-training and segmentation
    model = create_vit(cfg.model, num_classes=num_classes, global_pool=cfg.global_pool,
                       fc_norm=cfg.global_pool == "avg")
    if cfg.init:
        ignored = load_vit_weights(model, _encoder_only(load_weights(cfg.init), model),
                                   source=f"init weights {cfg.init}")
        if ignored:
            log.info("init weights: set aside %s", ", ".join(ignored[:6]))
    if num_classes:
        with torch.no_grad():  # MAE: a fresh head, trunc-normal std 2e-5
            nn.init.trunc_normal_(model.head.weight, std=cfg.head_init_std)
            nn.init.zeros_(model.head.bias)
    return model


def _encoder_only(state: dict, model: nn.Module) -> dict:
    """Pre-trained encoders come without this task's head and fc_norm (and maybe with a final norm
    that global pooling does not use): those start fresh."""
    own = model.state_dict()
    fresh = {k: v for k, v in own.items() if k.startswith(("head.", "fc_norm.")) or
             (k.startswith("norm.") and k not in state)}
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    if not isinstance(model.norm, nn.LayerNorm):  # avg pool + fc_norm: the per-token final norm is unused
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    return {**state, **fresh}


def build_finetune_task(cfg: FinetuneConfig) -> FinetuneTask:
    if cfg.model.img_size is None:
        cfg.model.img_size = cfg.data.img_size
    if cfg.num_classes is None:
        cfg.num_classes = len(training_classes(cfg.data))
    task = FinetuneTask(build_classifier(cfg, cfg.num_classes), cfg, cfg.num_classes)
    task.setup_model_ema()
    return task


def training_classes(cfg: ClassifyDataConfig) -> list[str]:
    return list(classify_source(cfg, cfg.root, True).classes)


def check_num_classes(num_classes: int, classes: list[str]) -> None:
    if num_classes < len(classes):
        raise ConfigError(f"num_classes={num_classes}, but the training data has {len(classes)} classes; "
                          "leave num_classes unset to take the data's count")


def classify_loaders(task, batch: int, rank: int, world: int, seed: int):
    """Training loader for the engine; the task gets the evaluation loader of the same data."""
    from tinymim.rundir import check_classes

    loader, sampler = build_classify_loaders(task.cfg.data, batch, rank, world, seed)
    classes = list(loader.dataset.source.classes)
    check_num_classes(task.num_classes, classes)
    task.eval_loader = build_eval_loader(task.cfg.data, max(1, batch), rank, world)
    check_classes(classes, task.eval_loader.dataset.dataset.source.classes,
                  f"the evaluation data ({task.cfg.data.val_root or task.cfg.data.name})",
                  "give data.val_root the class folders of the training data")
    task.classes = classes  # recorded with the run (classes.json): evaluation checks its data against them
    return loader, sampler


def run(cfg: FinetuneConfig, output: str):
    from tinymim import engine

    return engine.run_task(build_finetune_task, cfg, output, make_loader=classify_loaders,
                           optimizer_kwargs={"layer_decay": cfg.layer_decay})


def load(recipe, overrides) -> FinetuneConfig:
    from tinymim.config import load_config

    return load_config(FinetuneConfig, recipe, overrides)


