"""Semantic segmentation (docs/method.md section 4): UperNet + an auxiliary FCN head on a ViT backbone
initialized from any weights tinymim loads, trained with layer-wise lr decay, AdamW and a poly schedule
by iterations, evaluated by sliding-window (or whole-image) inference: mIoU, mAcc, aAcc and per-class IoU
from a confusion matrix summed over processes. RUN_DIR/segmenter.safetensors holds the whole model.
The inference, evaluation and prediction picture: tasks/segment_eval.py.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data as tud

from tinymim.core.config import ConfigError, checked_copy
from tinymim.data.images import warn_unreadable
from tinymim.data.loader import GlobalBatchSampler, worker_init
from tinymim.data.segmentation import SegmentationDataset, SegmentationFolder, SegmentDataConfig, collate_segment
from tinymim.models.checkpoint import load_vit_weights, load_weights, save_weights
from tinymim.models.segmenter import Segmenter, add_relative_position_bias, mmseg_init_, release_layer_id
from tinymim.models.vit import ModelConfig, check_input_size, create_vit
from tinymim.tasks.base import Task, TaskSpec, load_run_model, resolves_once
from tinymim.tasks.init_run import load_with_init
from tinymim.tasks.segment_eval import (
    eval_loader,
    evaluate_segmenter,
    limited_split_size,
    prediction_picture,
)
from tinymim.train.bookkeeping import Loaders
from tinymim.train.config import TrainConfig

log = logging.getLogger("tinymim")


SYNC_BN_ON_CPU = ("sync_bn=true needs GPU processes (PyTorch's SyncBatchNorm runs on CUDA only); "
                  "use sync_bn=auto, which keeps BatchNorm on CPU processes")


@dataclass
class SegmentConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="vit_base_patch16_224", drop_path_rate=0.1))
    # pre-trained backbone weights (run directory, file, timm name); None = random init. Position embeddings
    # are resized to the crop's grid by plain bicubic (no antialiasing), as the release's backbone loads them
    init: str | None = None
    blocks: list[int] = field(default_factory=lambda: [4, 6, 8, 12])  # backbone blocks (1-indexed) of the pyramid
    channels: int = 768  # UperNet head width (the release: 768; 192 for a light ViT-T head)
    aux_channels: int = 256  # auxiliary FCN head width
    aux_weight: float = 0.4  # auxiliary head's loss weight
    layer_decay: float = 0.75  # layer-wise lr decay over the backbone; the heads get the full lr
    # the release's backbone option (BEiT's): a relative position bias table per block, zero-initialised
    # and sized for the crop's patch grid
    rel_pos_bias: bool = False
    layer_scale: float | None = None  # layer scale on every block with this init value (the release: 1.0); null: none
    # BatchNorm in the pyramid and heads: "auto" = SyncBatchNorm under torchrun on GPUs (the release), plain
    # BatchNorm on one process or on CPU processes; true = SyncBatchNorm (GPU processes only); false = never
    sync_bn: bool | Literal["auto"] = "auto"
    # cross-entropy averaged over every pixel of the batch, ignored ones counting as zero (mmseg 0.x, the
    # release: avg_non_ignore=False), or over the non-ignored pixels only
    loss_average: Literal["all_pixels", "valid_pixels"] = "all_pixels"
    # decode-head init: "mmseg" (kaiming-normal convolutions, classifiers normal 0.01, the release) or
    # "pytorch" (PyTorch's defaults)
    head_init: Literal["mmseg", "pytorch"] = "mmseg"
    eval_every: int = 1  # validate every N epochs (and at the end of the run)
    # validate on this many images of the split, evenly spaced over it (the same ones every time, as
    # tinymim eval --limit picks them); the metrics say "N of M". null: the whole split
    eval_limit: int | None = None
    data: SegmentDataConfig = field(default_factory=SegmentDataConfig)
    # the release's: poly_mmcv is mmcv's poly with linear warmup. It ran fp16 with loss scaling; tinymim keeps
    # bf16 (fp32's exponent range, no loss scaling, no skipped steps); train.precision=fp16 is the release's
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=10_000, max_steps=160_000, batch_size=16, lr=1e-4, warmup_steps=1500, schedule="poly_mmcv",
        betas=[0.9, 0.999], weight_decay=0.05, checkpoint_every=2000))

    def validate(self) -> None:
        check_input_size(self.model, self.data.crop_size, "model")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be 1 or more, got {self.eval_every}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"eval_limit must be 1 or more (or null: the whole split), got {self.eval_limit}")
        if self.data.eval_batch_size < 1:
            raise ValueError(f"data.eval_batch_size must be 1 or more, got {self.data.eval_batch_size}")
        if self.layer_scale is not None and self.layer_scale <= 0:
            raise ValueError(f"layer_scale must be positive (the release: 1.0) or null, got {self.layer_scale}")
        if not 0 <= self.data.hue_delta <= 90:
            raise ValueError(f"data.hue_delta must be in 0..90 (OpenCV hue units, 2 degrees each), "
                             f"got {self.data.hue_delta}")
        if self.sync_bn is True and (self.train.device == "cpu"
                                     or (self.train.device == "auto" and not torch.cuda.is_available())):
            raise ValueError(SYNC_BN_ON_CPU)


def release_param_groups(model: Segmenter, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups as the release's LayerDecayOptimizerConstructor makes them: each parameter's
    lr scaled by layer_decay ** (depth + 1 - release_layer_id), no weight decay on 1-D parameters and
    biases. The release also means to exempt the position embedding and class token, but its check
    compares the bare names with prefixed ones and never matches: they (and the relative position
    tables, and TinyMIM*-T's distillation token) are decayed in the runs behind its numbers, and here."""
    depth = len(model.pyramid.vit.blocks)
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = release_layer_id(name, depth)
        no_decay = param.ndim == 1 or name.endswith(".bias")
        group = groups.setdefault((layer, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                      "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(param)
    return [g for _, g in sorted(groups.items())]


class SegmentTask(Task):
    """UperNet on a ViT backbone trained on label maps (the release's recipe), evaluated on mIoU."""

    name = "segment"
    weights = "segmenter.safetensors"
    best_metric = "mIoU"

    def __init__(self, model: Segmenter, cfg: SegmentConfig):
        super().__init__(model)
        self.model, self.cfg = model, cfg
        self.sync_bn = False

    def param_groups(self, weight_decay: float) -> list[dict]:
        return release_param_groups(self.model, weight_decay, self.cfg.layer_decay)

    def prepare(self, device: torch.device, precision: str) -> None:
        super().prepare(device, precision)
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        choice = self.cfg.sync_bn
        if choice is True and device.type != "cuda":
            raise ConfigError(SYNC_BN_ON_CPU)
        self.sync_bn = distributed and device.type == "cuda" and choice in (True, "auto")
        if not distributed or dist.get_rank() == 0:
            if self.sync_bn:
                why = f"SyncBatchNorm over {world} GPU processes"
            elif choice is False:
                why = "BatchNorm per process (sync_bn=false)"
            elif distributed:
                why = f"BatchNorm per process: {world} CPU processes, and PyTorch's SyncBatchNorm runs on GPUs only"
            else:
                why = "BatchNorm (one process)"
            log.info("pyramid and heads normalize with %s", why)

    def prepare_distributed(self, device_ids=None, **ddp_kwargs) -> "SegmentTask":
        if self.sync_bn:  # before DDP wraps it and before the optimizer sees its parameters
            nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        return super().prepare_distributed(device_ids=device_ids, **ddp_kwargs)

    def cross_entropy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ignore = self.cfg.data.ignore_index
        if self.cfg.loss_average == "valid_pixels":
            return F.cross_entropy(logits.float(), y, ignore_index=ignore)
        # mmseg 0.x: ignored pixels contribute 0 and still count in the mean
        return F.cross_entropy(logits.float(), y, ignore_index=ignore, reduction="none").mean()

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        logits, aux = self.trainable_forward(x)
        main, auxiliary = self.cross_entropy(logits, y), self.cross_entropy(aux, y)
        return {"loss": main + self.cfg.aux_weight * auxiliary, "loss_decode": main, "loss_aux": auxiliary}

    def evaluate(self, epoch: int) -> dict | None:
        if self.eval_loader is None or (epoch % self.cfg.eval_every and epoch != self.last_epoch):
            return None
        # under torchrun the engine has made every process's BatchNorm statistics rank 0's (same_buffers)
        metrics = evaluate_segmenter(self.model, self.eval_loader, self.cfg.data, self.device,
                                     progress=self.cfg.train.progress)
        if self.eval_of is not None:  # eval_limit: on N of the split's M images
            metrics.update(images=self.cfg.eval_limit - metrics.get("skipped_images", 0), of_images=self.eval_of)
        return {k: v for k, v in metrics.items() if k != "per_class_iou"}

    def export(self, run_dir: Path) -> None:
        meta = {"format": "tinymim.Segmenter", "model": json.dumps(asdict(self.cfg.model))}
        save_weights(self.model.state_dict(), Path(run_dir) / self.weights, meta)
        if self.eval_loader is not None:  # a look at what was learned
            folder = self.eval_loader.dataset.dataset.folder
            prediction_picture(self.model, folder, self.cfg.data, Path(run_dir) / "predictions.png", self.device)


# keys the release's backbone options add: newly initialised when the weights come from a plain ViT
RELEASE_BACKBONE_KEYS = ("attn.relative_position_bias_table", "ls1.gamma", "ls2.gamma")


@resolves_once
def resolve(cfg: SegmentConfig) -> SegmentConfig:
    """A copy of `cfg` with its derived key filled: the backbone's input size is the training crop's."""
    cfg = checked_copy(cfg)  # validated, as a loaded config is
    if cfg.model.img_size is None:
        cfg.model.img_size = cfg.data.crop_size
    return cfg


def build_backbone(cfg: SegmentConfig) -> nn.Module:
    """The ViT backbone of `cfg` (resolved here), with the release's options and its init weights."""
    cfg = resolve(cfg)
    vit = create_vit(cfg.model, **({"init_values": cfg.layer_scale} if cfg.layer_scale is not None else {}))
    if cfg.rel_pos_bias:
        try:
            add_relative_position_bias(vit)
        except ValueError as e:
            raise ConfigError(f"rel_pos_bias=true: {e}") from e
    if cfg.init:  # position embeddings resized to the crop's grid by plain bicubic, as the release's backbone init
        ignored = load_vit_weights(vit, load_weights(cfg.init), source=f"init weights {cfg.init}",
                                   ignore_prefixes=("decoder_", "mask_token", "head.", "fc_norm."),
                                   fresh=RELEASE_BACKBONE_KEYS, antialias=False)
        if ignored:
            log.info("init weights: set aside %s", ", ".join(ignored[:6]))
    return vit


def build_segment_task(cfg: SegmentConfig) -> SegmentTask:
    cfg = resolve(cfg)
    backbone = build_backbone(cfg)
    try:
        model = Segmenter(backbone, cfg.data.num_classes, tuple(cfg.blocks), cfg.channels, cfg.aux_channels)
    except ValueError as e:  # the pyramid's blocks do not fit the backbone: a config choice, said in one line
        raise ConfigError(f"blocks={list(cfg.blocks)}: {e}") from e
    if cfg.head_init == "mmseg":
        mmseg_init_(model.decode)
        mmseg_init_(model.aux)
    return SegmentTask(model, cfg)


def segment_loaders(task: SegmentTask, batch: int, rank: int, world: int, seed: int) -> Loaders:
    """The training split's loader and the evaluation split's, with the data's class names."""
    cfg = task.cfg.data
    train = SegmentationDataset(SegmentationFolder(cfg, cfg.train_split), cfg, train=True)
    sampler = GlobalBatchSampler(len(train), batch, rank, world, seed)
    loader = tud.DataLoader(train, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate_segment,
                            worker_init_fn=worker_init, generator=torch.Generator().manual_seed(seed),
                            prefetch_factor=2 if cfg.num_workers else None)
    evaluation = eval_loader(cfg, cfg.val_split, rank, world, task.cfg.eval_limit)
    eval_of = limited_split_size(evaluation, task.cfg.eval_limit, f"{cfg.val_split} split")
    return Loaders(loader, sampler, evaluation, train.folder.classes, eval_of)


def _without_unused_norm(state: dict) -> dict:
    """Segmenters saved before the pyramid dropped the backbone's unused final norm still hold it."""
    return {k: v for k, v in state.items() if not k.startswith("pyramid.vit.norm.")}


SPEC = TaskSpec(task=SegmentTask, config=SegmentConfig, resolve=resolve, build=build_segment_task,
                trained=lambda cfg: build_segment_task(replace(cfg, init=None)).model,
                trained_state=_without_unused_norm, loaders=segment_loaders,
                kind="segment", upstream="init", exports="segmenter",
                load=lambda recipe, overrides: load_with_init(SegmentConfig, recipe, overrides),
                help="semantic segmentation: UperNet on a pre-trained (or random) ViT backbone")


def evaluate_segmentation_run(run_dir: str | Path, data_root: str | Path, split: str, num_workers: int = 2,
                              limit: int | None = None, progress: bool = False) -> dict:
    """mIoU, mAcc, aAcc and per-class IoU of a segment run on `data_root`/images/`split` (its own settings);
    with `limit`, on that many images evenly spaced over the split (tinymim eval --limit, as eval_limit
    picks them); with `progress`, a bar over the images."""
    trained = load_run_model(SPEC, run_dir)
    model, cfg = trained.model, trained.config
    data = replace(cfg.data, root=str(data_root), num_workers=num_workers)
    loader = eval_loader(data, split, limit=limit)
    folder = loader.dataset.dataset.folder
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate_segmenter(model.to(device), loader, data, device, folder.classes, progress=progress)
    skipped = metrics.pop("skipped_images", 0)
    images = len(loader.dataset) - skipped
    warn_unreadable(skipped, images)
    return {"protocol": "segmentation", "split": split, "images": images, "of_images": len(folder), "limit": limit,
            "skipped_images": skipped,
            **metrics}
