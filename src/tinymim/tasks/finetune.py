"""Fine-tuning a pre-trained ViT for classification: the MAE recipe (docs/method.md section 4).

Layer-wise lr decay (timm's parameter groups: embeddings = layer 0, block j = layer j+1, head =
layer L+1, scale decay^(L+1-layer)), drop path, mixup / cutmix, label smoothing, RandAugment and
random erasing (timm's implementations), warmup + cosine, global average pooling + fc_norm or the
class token, head init trunc-normal std 2e-5, optional model EMA. Evaluates top-1 / top-5 every
epoch; keeps the last and the best weights (RUN_DIR/model.safetensors, RUN_DIR/best.safetensors).

A model with a distillation token (model.dist_token: TinyMIM*-T's classifier, tinymim.models.star) trains
its second head DeiT-style on a frozen teacher's predicted classes (`distillation`).
The config and the keys derived from the data: tasks/finetune_config.py.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from tinymim.core.config import ConfigError
from tinymim.core.guards import check_classes
from tinymim.core.hub import hub_or_cache
from tinymim.core.rundir import RunDir
from tinymim.data.classification import (  # noqa: F401
    ClassifyDataConfig,
    ClassifyDataset,
    build_classify_loaders,
    build_eval_loader,
    classification_sums,
    classify_source,
    collate_classify,
    sums_to_metrics,
)
from tinymim.models.checkpoint import load_vit_weights, load_weights, looks_like_path, missing_path, save_weights
from tinymim.models.vit import create_vit
from tinymim.tasks.base import Task, TaskSpec, load_run_model
from tinymim.tasks.finetune_config import DistillationConfig, FinetuneConfig, load, resolve, training_classes
from tinymim.tasks.segment_eval import limit_split, limited_split_size
from tinymim.train.bookkeeping import Loaders, evaluation_bar

log = logging.getLogger("tinymim")



class FinetuneTask(Task):
    """A ViT classifier trained on labelled images (MAE's fine-tuning recipe), evaluated on top-1/top-5."""

    name = "finetune"
    best_metric = "top1"

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, num_classes: int, teacher: nn.Module | None = None):
        super().__init__(model)
        self.model, self.cfg, self.num_classes = model, cfg, num_classes
        self.teacher = FrozenTeacher(teacher) if teacher is not None else None
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

    def setup_model_ema(self) -> None:
        if self.cfg.ema_decay:
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
        if not isinstance(logits, tuple):
            return {"loss": self.criterion(logits, y)}
        return self.distillation_losses(*logits, x, y)

    def distillation_losses(self, logits: torch.Tensor, dist_logits: torch.Tensor, x: torch.Tensor,
                            y: torch.Tensor) -> dict[str, torch.Tensor]:
        """DeiT's hard distillation: head on the labels, head_dist on the teacher's argmax for the same
        images (no smoothing); without a teacher head_dist learns the labels too."""
        loss_cls = self.criterion(logits, y)
        if self.teacher is not None:
            loss_dist = F.cross_entropy(dist_logits, self.teacher(x).argmax(1))
        else:
            loss_dist = self.criterion(dist_logits, y)
        alpha = self.cfg.distillation.alpha
        return {"loss": (1 - alpha) * loss_cls + alpha * loss_dist, "loss_cls": loss_cls, "loss_dist": loss_dist}

    def evaluate(self, epoch: int) -> dict | None:
        if self.eval_loader is None or (epoch % self.cfg.eval_every and epoch != self.last_epoch):
            return None
        model = self.ema.module if self.ema is not None else self.model
        batches = evaluation_bar(self.eval_loader, f"{self.name} eval", self.cfg.train.progress)
        sums = classification_sums(model, batches, self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        metrics = sums_to_metrics(sums)
        if self.eval_of is None:
            metrics.pop("images")
        else:  # eval_limit: on N of the split's M images
            metrics["of_images"] = self.eval_of
        return metrics

    def export(self, run_dir: Path) -> None:
        model = self.ema.module if self.ema is not None else self.model
        # the "format" is stored in the weights file: written as before the package was laid out in folders
        # (tinymim.star is now tinymim.models.star), so every weights file names its kind the same way
        kind = "tinymim.star.DistilledViT" if self.cfg.model.dist_token else "timm.VisionTransformer"
        meta = {"format": kind, "model": json.dumps(asdict(self.cfg.model))}
        save_weights(model.state_dict(), Path(run_dir) / self.weights, meta)

    def export_best(self, run_dir: Path) -> None:
        model = self.ema.module if self.ema is not None else self.model
        save_weights(model.state_dict(), Path(run_dir) / RunDir.BEST)


class FrozenTeacher(nn.Module):
    """A classifier that never trains: eval mode whatever the task's mode, no gradient."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)


def build_teacher_classifier(cfg: DistillationConfig, num_classes: int, img_size: int) -> nn.Module:
    """The teacher `cfg.teacher` names (a finetune run directory, a weights file with
    cfg.teacher_model, or a timm name with pretrained weights); its class count must be the model's."""
    spec, path = cfg.teacher, Path(cfg.teacher)
    if path.is_dir():
        kind = RunDir(path).task()
        if kind != "finetune":
            raise ConfigError(f"distillation.teacher {spec} is {'a ' + kind if kind else 'not a tinymim'} run, not "
                              "a fine-tuned classifier: give a tinymim finetune run, a weights file or a timm name")
        trained = load_run_model(SPEC, path)
        teacher = trained.model
        teacher.classes = trained.classes  # None for runs made before tinymim recorded them
    elif path.is_file():
        if cfg.teacher_model is None:
            raise ConfigError(f"distillation.teacher {spec} is a weights file: give its architecture in "
                              "distillation.teacher_model (name and sizes)")
        state = load_weights(path)
        if "head.weight" not in state:
            raise ConfigError(f"distillation.teacher {spec} holds no classifier (no head.weight): the teacher must "
                              "be a classifier of this data's classes")
        pool = "avg" if "fc_norm.weight" in state else "token"
        teacher = create_vit(cfg.teacher_model, num_classes=state["head.weight"].shape[0], global_pool=pool,
                             fc_norm=pool == "avg")
        load_vit_weights(teacher, state, source=f"teacher {spec}")
    elif looks_like_path(spec):  # a missing file, not a timm name to fetch
        raise ConfigError(missing_path(spec, "distillation.teacher"))
    else:
        try:
            with hub_or_cache():
                teacher = timm.create_model(spec, pretrained=True)
        except RuntimeError as e:
            if "Unknown model" not in str(e):
                raise
            raise ConfigError(f"distillation.teacher {spec!r} is neither a run directory, a file nor a timm "
                              "model name") from e
        except Exception as e:  # noqa: BLE001 - offline, unknown tag, hub errors: all end here
            raise ConfigError(f"could not fetch the teacher's timm weights {spec!r} ({type(e).__name__}); this needs "
                              "the network or the Hugging Face cache") from e
    size = getattr(getattr(teacher, "patch_embed", None), "img_size", None)
    if size is not None and getattr(teacher.patch_embed, "strict_img_size", False) and tuple(size) != (img_size,) * 2:
        raise ConfigError(f"distillation.teacher {spec} takes {size[0]}px images, the data is {img_size}px: the "
                          "teacher sees the student's images; use a teacher of this image size")
    if teacher.num_classes != num_classes:
        raise ConfigError(f"distillation.teacher {spec} predicts {teacher.num_classes} classes, the model "
                          f"{num_classes}: hard distillation needs a teacher of the same classes (fine-tune one "
                          "on this data first)")
    return teacher


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
        with torch.no_grad():  # MAE: a fresh head (and distillation head), trunc-normal std 2e-5
            for head in (model.head, getattr(model, "head_dist", None)):
                if isinstance(head, nn.Linear):
                    nn.init.trunc_normal_(head.weight, std=cfg.head_init_std)
                    nn.init.zeros_(head.bias)
    return model


_HEADS = ("head.", "head_dist.", "fc_norm.")


def _encoder_only(state: dict, model: nn.Module) -> dict:
    """Pre-trained encoders come without this task's heads and fc_norm (and maybe with a final norm
    that global pooling does not use): those start fresh."""
    own = model.state_dict()
    fresh = {k: v for k, v in own.items() if k.startswith(_HEADS) or (k.startswith("norm.") and k not in state)}
    state = {k: v for k, v in state.items() if not k.startswith(_HEADS)}
    if not isinstance(model.norm, nn.LayerNorm):  # avg pool + fc_norm: the per-token final norm is unused
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    return {**state, **fresh}


def build_finetune_task(cfg: FinetuneConfig) -> FinetuneTask:
    cfg = resolve(cfg)
    teacher = None
    if cfg.distillation.teacher:
        teacher = build_teacher_classifier(cfg.distillation, cfg.num_classes, cfg.data.img_size)
        if getattr(teacher, "classes", None):  # a finetune run's: its labels must mean the same classes
            check_classes(teacher.classes, training_classes(cfg.data), "the training data",
                          f"distill from a teacher fine-tuned on these classes, not {cfg.distillation.teacher}")
        log.info("distillation: head_dist learns the predicted classes of %s (%s), alpha %g",
                 cfg.distillation.teacher, type(teacher).__name__, cfg.distillation.alpha)
    elif cfg.model.dist_token:
        log.info("model.dist_token without distillation.teacher: head and head_dist both learn the labels")
    task = FinetuneTask(build_classifier(cfg, cfg.num_classes), cfg, cfg.num_classes, teacher)
    task.setup_model_ema()
    return task


def check_num_classes(num_classes: int, classes: list[str]) -> None:
    if num_classes < len(classes):
        raise ConfigError(f"num_classes={num_classes}, but the training data has {len(classes)} classes; "
                          "leave num_classes unset to take the data's count")


def classify_loaders(task: FinetuneTask, batch: int, rank: int, world: int, seed: int) -> Loaders:
    """The training loader and the evaluation loader of the same data, its classes checked against the
    training data's (which the run records in classes.json: evaluation checks its data against them)."""
    loader, sampler = build_classify_loaders(task.cfg.data, batch, rank, world, seed)
    classes = list(loader.dataset.source.classes)
    check_num_classes(task.num_classes, classes)
    split = "held-out training images" if task.cfg.data.holdout else "evaluation split"
    evaluation = limit_split(build_eval_loader(task.cfg.data, max(1, batch), rank, world), task.cfg.eval_limit,
                             rank, world)
    eval_of = limited_split_size(evaluation, task.cfg.eval_limit, split)
    check_classes(classes, evaluation.dataset.dataset.source.classes,
                  f"the evaluation data ({task.cfg.data.val_root or task.cfg.data.name})",
                  "give data.val_root the class folders of the training data")
    return Loaders(loader, sampler, evaluation, classes, eval_of)


SPEC = TaskSpec(task=FinetuneTask, config=FinetuneConfig, resolve=resolve, build=build_finetune_task,
                trained=lambda cfg: build_classifier(replace(cfg, init=None), cfg.num_classes),
                loaders=classify_loaders,
                optimizer_options=lambda cfg: {"layer_decay": cfg.layer_decay}, kind="classify", upstream="init",
                exports="classifier", load=load,
                help="fine-tune a pre-trained (or randomly initialized) ViT for classification")


