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
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.data as tud
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from tinymim.checkpoint import load_vit_weights, load_weights, save_weights
from tinymim.config import ConfigError
from tinymim.data import DataConfig, GlobalBatchSampler, build_source, load_or_substitute, worker_init
from tinymim.engine import TrainConfig
from tinymim.models import ModelConfig, size_args, timm_architecture
from tinymim.tasks.base import Task

log = logging.getLogger("tinymim")


def _posterize_zero_bits_compat() -> None:
    """Pillow >= 12 refuses posterize(bits=0), which timm's 'PosterizeIncreasing' asks for at the top
    magnitude (m9 + noise reaches 10): keep the old result, an image with every bit cleared."""
    from PIL import Image, ImageOps
    from timm.data import auto_augment as aa

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
        return
    except ValueError:
        pass
    original = aa.posterize

    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return original(img, bits_to_keep, **kwargs)

    for name, fn in list(aa.NAME_TO_OP.items()):
        if fn is original:
            aa.NAME_TO_OP[name] = posterize


_posterize_zero_bits_compat()


@dataclass
class ClassifyDataConfig(DataConfig):
    """Labelled data: `root` (or cifar10/cifar100/synthetic) to train on, `val_root` to evaluate."""

    val_root: str | None = None  # the evaluation ImageFolder (or cifar/synthetic: their test split)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range [low, high]
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec (rand-m9-mstd0.5-inc1); null: none
    reprob: float = 0.25  # random-erasing probability
    eval_crop_pct: float = 0.875  # evaluation center crop: resize to img_size / crop_pct, crop img_size
    color_jitter: float = 0.0  # ignored by timm when auto_augment is set, as in MAE
    # hold out this many training images (a fixed random sample) and evaluate on them instead of
    # val_root: for tuning a recipe without looking at the test split. 0 = evaluate on val_root
    holdout: int = 0

    def validate(self) -> None:
        super().validate()
        if self.holdout < 0:
            raise ValueError(f"holdout must be 0 or more, got {self.holdout}")
        if not 0 < self.eval_crop_pct <= 1:
            raise ValueError(f"eval_crop_pct must be in (0, 1], got {self.eval_crop_pct}")
        if not 0 <= self.reprob <= 1:
            raise ValueError(f"reprob must be in [0, 1], got {self.reprob}")


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


class ClassifyDataset(tud.Dataset):
    """Indexed by (index, sample_seed): timm's training transform with every random choice seeded per
    sample (same augmentation for any number of workers/processes); unreadable images are replaced
    by the next readable one and counted."""

    def __init__(self, source, transform, length: int | None = None):
        self.source, self.transform = source, transform
        self.length = min(length or len(source), len(source))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        img, label, skipped = load_or_substitute(self.source, index, self.length)
        if seed is None:
            return self.transform(img), label, skipped
        in_worker = tud.get_worker_info() is not None
        with torch.random.fork_rng(devices=[], enabled=not in_worker):
            state = random.getstate()
            random.seed(seed)
            torch.manual_seed(seed)
            x = self.transform(img)
            if not in_worker:
                random.setstate(state)
        return x, label, skipped


def collate_classify(samples) -> dict:
    x, y, skipped = zip(*samples)
    return {"image": torch.stack(x), "label": torch.tensor(y), "skipped": sum(skipped)}


def _source(cfg: ClassifyDataConfig, root: str | None, train: bool):
    """The training images (data.subset of them), or the evaluation images: val_root's, or with
    data.holdout the training images held out (then the training side never sees them)."""
    from dataclasses import replace

    from tinymim.data import SubsetImages, TorchvisionCIFAR, split_holdout

    if cfg.holdout:
        rest, held = split_holdout(_source(replace(cfg, holdout=0, subset=None), cfg.root, True), cfg.holdout)
        if not train:
            return held
        return SubsetImages(rest, cfg.subset) if cfg.subset is not None else rest
    if cfg.name == "synthetic":  # a held-out synthetic split: other seeds
        return build_source(cfg if train else replace(cfg, subset=None), seed=0 if train else 1)
    if cfg.name in ("cifar10", "cifar100"):
        src = TorchvisionCIFAR(cfg.name, root, train=train)
        return SubsetImages(src, cfg.subset) if train and cfg.subset is not None else src
    if not root:
        raise ConfigError("data.val_root is needed to evaluate a folder dataset" if not train else "data.root is needed")
    return build_source(replace(cfg, root=root, subset=cfg.subset if train else None))


def build_classify_loaders(cfg: ClassifyDataConfig, batch: int, rank: int, world: int, seed: int):
    train_tf = create_transform(cfg.img_size, is_training=True, scale=tuple(cfg.crop_scale),
                                auto_augment=cfg.auto_augment, interpolation="bicubic", re_prob=cfg.reprob,
                                re_mode="pixel", re_count=1, mean=tuple(cfg.mean), std=tuple(cfg.std),
                                color_jitter=cfg.color_jitter or None)
    train = ClassifyDataset(_source(cfg, cfg.root, True), train_tf)
    sampler = GlobalBatchSampler(len(train), batch, rank, world, seed)
    loader = tud.DataLoader(train, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate_classify,
                            worker_init_fn=worker_init,
                            generator=torch.Generator().manual_seed(seed), pin_memory=torch.cuda.is_available(),
                            prefetch_factor=4 if cfg.num_workers else None)
    return loader, sampler


def build_eval_loader(cfg: ClassifyDataConfig, batch: int, rank: int = 0, world: int = 1, root: str | None = None,
                      split_train: bool = False):
    """Evaluation transform (resize, center crop) over the validation split, or over the training
    split with split_train (a k-NN bank)."""
    eval_tf = create_transform(cfg.img_size, is_training=False, interpolation="bicubic", crop_pct=cfg.eval_crop_pct,
                               mean=tuple(cfg.mean), std=tuple(cfg.std))
    source = _source(cfg, root or (cfg.root if split_train else cfg.val_root), split_train)
    ds = ClassifyDataset(source, eval_tf)
    shard = tud.Subset(ds, range(rank, len(ds), world))  # each process a strided shard; sums are reduced
    return tud.DataLoader(shard, batch_size=batch, num_workers=cfg.num_workers, collate_fn=collate_classify,
                          worker_init_fn=worker_init)


@torch.no_grad()
def classification_sums(model: nn.Module, loader, device: torch.device, class_indices=None) -> torch.Tensor:
    """[top-1 hits, top-5 hits, images, summed cross-entropy] over a loader, as a float64 tensor on
    `device` (ready for an all-reduce); logits restricted to `class_indices` when given."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    idx = torch.tensor(class_indices, device=device) if class_indices is not None else None
    for batch in loader:
        x, y = batch["image"].to(device), batch["label"].to(device)
        logits = model(x).float()
        if idx is not None:
            logits = logits.index_select(1, idx)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.tensor([float((top[:, 0] == y).sum()), float((top == y[:, None]).any(1).sum()), len(y),
                              float(nn.functional.cross_entropy(logits, y, reduction="sum"))],
                             dtype=torch.float64, device=device)
    return sums


def sums_to_metrics(sums: torch.Tensor) -> dict:
    c1, c5, n, loss = sums.tolist()
    return {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "loss": loss / n, "images": int(n)}


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
            object.__setattr__(self, "ema", ModelEmaV3(self.model, decay=self.cfg.ema_decay))

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
        save_weights(model.state_dict(), Path(run_dir) / "model.safetensors", {"format": "timm.VisionTransformer",
                                                                                 "model": json.dumps(asdict(self.cfg.model))})

    def export_best(self, run_dir: Path) -> None:
        model = self.ema.module if self.ema is not None else self.model
        save_weights(model.state_dict(), Path(run_dir) / "best.safetensors")


def build_classifier(cfg: FinetuneConfig, num_classes: int) -> nn.Module:
    m = cfg.model
    model = timm.create_model(timm_architecture(m), pretrained=False, num_classes=num_classes,
                              global_pool=cfg.global_pool, fc_norm=cfg.global_pool == "avg",
                              drop_path_rate=m.drop_path_rate, **size_args(m))
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
    return list(_source(cfg, cfg.root, True).classes)


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


