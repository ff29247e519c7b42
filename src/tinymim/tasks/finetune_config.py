"""The finetune task's config (tasks/finetune.py builds the task from it): the classifier, its
initial weights, the MAE fine-tuning recipe's settings and DeiT-style distillation; what fine-tuning
and linear probing check alike; and the keys derived from the data (`resolve`: input size, class count).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tinymim.core.config import checked_copy
from tinymim.data.classification import ClassifyDataConfig, classify_source
from tinymim.models.vit import ModelConfig, check_input_size
from tinymim.tasks.base import resolves_once
from tinymim.tasks.init_run import load_with_init
from tinymim.train.config import TrainConfig


@dataclass
class DistillationConfig:
    """DeiT's hard-label distillation (Touvron et al. 2021) for a model with a distillation token:
    `head` learns the labels, `head_dist` the teacher's predicted class (argmax) on the same, mixed
    images; evaluation averages the two heads. TinyMIM*-T was fine-tuned DeiT-style (docs/method.md
    section 5); the release has no code for it, so this follows DeiT."""

    # the frozen teacher classifier: a timm model name (its pretrained weights, e.g. regnety_160.deit_in1k,
    # DeiT's teacher), a tinymim finetune run directory, or a weights file (architecture: teacher_model);
    # null: no teacher (with model.dist_token both heads learn the labels)
    teacher: str | None = None
    alpha: float = 0.5  # loss = (1 - alpha) * loss on head + alpha * loss on head_dist (DeiT: 0.5)
    # the teacher's architecture when `teacher` is a weights file (pooling: avg when it has fc_norm, else token)
    teacher_model: ModelConfig | None = None

    def validate(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"distillation.alpha must be in [0, 1], got {self.alpha}")


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
    eval_every: int = 1  # evaluate every N epochs (and at the end of the run)
    # evaluate on this many images of the evaluation split, evenly spaced over it (the same ones every time,
    # as tinymim eval --limit picks them); the metrics say "N of M". null: the whole split
    eval_limit: int | None = None
    distillation: DistillationConfig = field(default_factory=DistillationConfig)  # needs model.dist_token
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
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be 1 or more, got {self.eval_every}")
        check_eval_limit(self.eval_limit)
        if self.distillation.teacher and not self.model.dist_token:
            raise ValueError(f"distillation.teacher={self.distillation.teacher} trains a distillation head, which "
                             "this model lacks: set model.dist_token=true (or distillation.teacher=null)")


def validate_classifier(cfg) -> None:
    """What fine-tuning and linear probing share: the model takes the data's images, a class count."""
    check_input_size(cfg.model, cfg.data.img_size, "model")
    if cfg.num_classes is not None and cfg.num_classes < 1:
        raise ValueError(f"num_classes must be positive (or null: the training data's), got {cfg.num_classes}")


def check_eval_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"eval_limit must be 1 or more (or null: the whole split), got {limit}")


@resolves_once
def resolve(cfg: FinetuneConfig) -> FinetuneConfig:
    """A copy of `cfg` with its derived keys filled: the model's (and a teacher file's) input size is
    the data's, the class count the training data's (its folders are listed, nothing is built)."""
    cfg = checked_copy(cfg)  # validated, as a loaded config is
    if cfg.model.img_size is None:
        cfg.model.img_size = cfg.data.img_size
    if cfg.distillation.teacher_model is not None and cfg.distillation.teacher_model.img_size is None:
        cfg.distillation.teacher_model.img_size = cfg.data.img_size
    if cfg.num_classes is None:
        cfg.num_classes = len(training_classes(cfg.data))
    return cfg


def training_classes(cfg: ClassifyDataConfig) -> list[str]:
    return list(classify_source(cfg, cfg.root, True).classes)


def load(recipe, overrides) -> FinetuneConfig:
    """The recipe with its overrides; a model initialized from a tinymim run takes its architecture
    (tasks/init_run.py)."""
    return load_with_init(FinetuneConfig, recipe, overrides)
