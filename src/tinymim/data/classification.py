"""Labelled images for classification: the data config, the dataset with seeded per-sample timm
transforms, the train / evaluation loaders (data.holdout included), and the top-1 / top-5 sums every
evaluation reduces over processes. Used by fine-tuning, linear probing, the k-NN monitor and `tinymim eval`."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.utils.data as tud
from PIL import Image, ImageOps
from timm.data import auto_augment as aa
from timm.data import create_transform

from tinymim.core.config import ConfigError
from tinymim.core.errors import DataError, StorageError
from tinymim.data.loader import batch_sampler, worker_init
from tinymim.data.pretrain import DataConfig
from tinymim.data.sources import SubsetImages, TorchvisionCIFAR, build_source, is_tar, split_holdout
from tinymim.data.view_dataset import load_or_substitute

log = logging.getLogger(__name__)


def _posterize_zero_bits_compat() -> None:
    """Pillow >= 12 refuses posterize(bits=0), which timm's 'PosterizeIncreasing' asks for at the top
    magnitude (m9 + noise reaches 10): keep the old result, an image with every bit cleared."""
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



@dataclass
class ClassifyDataConfig(DataConfig):
    """Labelled data: `root` (or cifar10/cifar100/synthetic) to train on, `val_root` to evaluate."""

    # the evaluation ImageFolder or a tar of one (test.tar holding test/<class>/*.jpg; shards: the evaluation
    # shards' folder or URL; cifar/synthetic: their test split)
    val_root: str | None = None
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range [low, high]
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec (rand-m9-mstd0.5-inc1); null: none
    reprob: float = 0.25  # random-erasing probability
    eval_crop_pct: float = 0.875  # evaluation center crop: resize to img_size / crop_pct, crop img_size
    color_jitter: float = 0.0  # ignored by timm when auto_augment is set, as in MAE
    prefetch: int = 0  # pre-training's prefetch of built views: nothing to build ahead here, 0 only
    jpeg_draft: bool = False  # pre-training's reduced-scale JPEG decode: timm's transforms take whole images, false
    # hold out this many training images (a fixed random sample) and evaluate on them instead of
    # val_root: for tuning a recipe without looking at the test split. 0 = evaluate on val_root
    holdout: int = 0

    def validate(self) -> None:
        if self.prefetch or self.jpeg_draft:  # before the pre-training checks of these keys
            key = "prefetch" if self.prefetch else "jpeg_draft"
            raise ValueError(f"data.{key} applies to pre-training views (distill, mae); fine-tuning, linear probes "
                             f"and k-NN run timm's transforms on whole decoded images: leave data.{key} off")
        super().validate()
        if self.decode != "cpu":
            raise ValueError("decode=device builds pre-training views (distill, mae); fine-tuning, linear probes "
                             "and k-NN decode with Pillow (timm's RandAugment works on PIL images): leave "
                             "data.decode at cpu")
        if self.holdout < 0:
            raise ValueError(f"holdout must be 0 or more, got {self.holdout}")
        if not 0 < self.eval_crop_pct <= 1:
            raise ValueError(f"eval_crop_pct must be in (0, 1], got {self.eval_crop_pct}")
        if not 0 <= self.reprob <= 1:
            raise ValueError(f"reprob must be in [0, 1], got {self.reprob}")


UNREADABLE = -1  # the label of an evaluation sample whose image could not be read: collate drops it


class ClassifyDataset(tud.Dataset):
    """Indexed by (index, sample_seed): timm's training transform with every random choice seeded per
    sample (same augmentation for any number of workers/processes); unreadable images are replaced
    by the next readable one and counted. With `skip_unreadable` (evaluation), an unreadable image is
    not replaced: its sample is left out of the batch by collate_classify and counted in "skipped"."""

    def __init__(self, source, transform, length: int | None = None, skip_unreadable: bool = False):
        self.source, self.transform, self.skip_unreadable = source, transform, skip_unreadable
        self.length = min(length or len(source), len(source))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        if self.skip_unreadable:
            try:
                img, label = self.source.load(index)
            except StorageError:  # a full or read-only cache: every image would be left out
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable file is left out, not fatal
                log.warning("skipping unreadable image %s: %s", self.source.describe(index), e)
                # a placeholder of the transform's output shape, so that a batch of none still stacks
                return self.transform(Image.new("RGB", (8, 8))), UNREADABLE, 1
            return self.transform(img), label, 0
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
    """A batch of the readable samples; "skipped" counts the unreadable images (substituted in training,
    left out in evaluation: an evaluation batch may hold no image at all)."""
    x, y, skipped = zip(*samples)
    image, label = torch.stack(x), torch.tensor(y)
    keep = label != UNREADABLE
    if not keep.all():
        image, label = image[keep], label[keep]
    return {"image": image, "label": label, "skipped": sum(skipped)}


def classify_source(cfg: ClassifyDataConfig, root: str | None, train: bool):
    """The training images (data.subset of them), or the evaluation images: val_root's, or with
    data.holdout the training images held out (then the training side never sees them)."""
    if cfg.holdout:
        rest, held = split_holdout(classify_source(replace(cfg, holdout=0, subset=None), cfg.root, True), cfg.holdout)
        if not train:
            return held
        return SubsetImages(rest, cfg.subset) if cfg.subset is not None else rest
    if cfg.name == "synthetic":  # a held-out synthetic split: other seeds
        return build_source(cfg if train else replace(cfg, subset=None), seed=0 if train else 1)
    if cfg.name in ("cifar10", "cifar100") and not is_tar(root):
        # torchvision's test split would need the network or its cache: ask for the test tar
        if not train and root is None and is_tar(cfg.root):
            raise ConfigError(f"data.root {cfg.root} is a tar of images: give the evaluation images the same way, "
                              "data.val_root=PATH/test.tar")
        src = TorchvisionCIFAR(cfg.name, root, train=train)
        return SubsetImages(src, cfg.subset) if train and cfg.subset is not None else src
    if not root:
        raise ConfigError("data.val_root is needed to evaluate a folder dataset" if not train
                          else "data.root is needed")
    source = build_source(replace(cfg, name="folder" if is_tar(root) else cfg.name, root=root,
                                  subset=cfg.subset if train else None))
    if not getattr(getattr(source, "source", source), "labelled", True):  # a subset's: its source's
        raise DataError(f"the shards in {root} were indexed without labels (--label none, for pre-training): "
                        "classification needs each image's class; index them again with --label cls, txt or "
                        "json:FIELD (delete their index.json first)")
    return source


def build_classify_loaders(cfg: ClassifyDataConfig, batch: int, rank: int, world: int, seed: int):
    _posterize_zero_bits_compat()
    train_tf = create_transform(cfg.img_size, is_training=True, scale=tuple(cfg.crop_scale),
                                auto_augment=cfg.auto_augment, interpolation="bicubic", re_prob=cfg.reprob,
                                re_mode="pixel", re_count=1, mean=tuple(cfg.mean), std=tuple(cfg.std),
                                color_jitter=cfg.color_jitter or None)
    train = ClassifyDataset(classify_source(cfg, cfg.root, True), train_tf)
    sampler = batch_sampler(train.source, batch, rank, world, seed)
    loader = tud.DataLoader(train, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate_classify,
                            worker_init_fn=worker_init,
                            generator=torch.Generator().manual_seed(seed), pin_memory=torch.cuda.is_available(),
                            prefetch_factor=4 if cfg.num_workers else None)
    return loader, sampler


def build_eval_loader(cfg: ClassifyDataConfig, batch: int, rank: int = 0, world: int = 1, root: str | None = None,
                      split_train: bool = False):
    """Evaluation transform (resize, center crop) over the validation split, or over the training
    split with split_train (a k-NN bank). Unreadable images are left out and counted in each batch's
    "skipped", so that scores are over the readable images only."""
    eval_tf = create_transform(cfg.img_size, is_training=False, interpolation="bicubic", crop_pct=cfg.eval_crop_pct,
                               mean=tuple(cfg.mean), std=tuple(cfg.std))
    source = classify_source(cfg, root or (cfg.root if split_train else cfg.val_root), split_train)
    ds = ClassifyDataset(source, eval_tf, skip_unreadable=True)
    shard = tud.Subset(ds, range(rank, len(ds), world))  # each process a strided shard; sums are reduced
    return tud.DataLoader(shard, batch_size=batch, num_workers=cfg.num_workers, collate_fn=collate_classify,
                          worker_init_fn=worker_init)


@torch.no_grad()
def classification_sums(model: nn.Module, loader, device: torch.device, class_indices=None) -> torch.Tensor:
    """[top-1 hits, top-5 hits, images, summed cross-entropy, unreadable images skipped] over a loader,
    as a float64 tensor on `device` (ready for an all-reduce); logits restricted to `class_indices` when
    given. Only readable images are scored."""
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    idx = torch.tensor(class_indices, device=device) if class_indices is not None else None
    for batch in loader:
        sums[4] += batch.get("skipped", 0)
        if not len(batch["label"]):
            continue
        x, y = batch["image"].to(device), batch["label"].to(device)
        logits = model(x).float()
        if idx is not None:
            logits = logits.index_select(1, idx)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.tensor([float((top[:, 0] == y).sum()), float((top == y[:, None]).any(1).sum()), len(y),
                              float(nn.functional.cross_entropy(logits, y, reduction="sum")), 0],
                             dtype=torch.float64, device=device)
    return sums


def sums_to_metrics(sums: torch.Tensor) -> dict:
    """Top-1 / top-5 (%) and mean loss over the readable images ("images"), and how many were skipped."""
    c1, c5, n, loss, skipped = sums.tolist()
    if not n:
        raise DataError(f"none of the {int(skipped)} evaluation images could be read (each is logged as "
                        "'skipping unreadable image'); replace the damaged files or point at the right folder")
    return {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "loss": loss / n, "images": int(n),
            "skipped_images": int(skipped)}


