"""A segmenter's evaluation (tasks/segment.py trains it): class indices by sliding-window or
whole-image inference, the one-image-at-a-time evaluation loader, mIoU, mAcc, aAcc and per-class IoU
from a confusion matrix summed over processes, and a picture of its predictions.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data as tud
from PIL import Image

from tinymim.core.errors import DataError
from tinymim.core.files import atomic_write
from tinymim.data.loader import worker_init
from tinymim.data.segmentation import (
    SegmentationDataset,
    SegmentationFolder,
    SegmentDataConfig,
    collate_segment,
    eval_transform,
)
from tinymim.models.segmenter import confusion_matrix, segmentation_metrics, slide_inference


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, cfg: SegmentDataConfig, size) -> torch.Tensor:
    """Class indices at `size` (the label map's): sliding-window or whole-image logits, resized bilinearly."""
    if cfg.eval_mode == "slide":
        logits = slide_inference(model, x, cfg.num_classes, cfg.crop_size, cfg.eval_stride)
    else:
        logits = model(x)
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False).argmax(1)


def eval_loader(cfg: SegmentDataConfig, split: str, rank: int = 0, world: int = 1) -> tud.DataLoader:
    """One image at a time (labels keep their own sizes), each process a strided shard of the split.
    Its label maps are checked now: in training, before the first epoch, not after it."""
    folder = SegmentationFolder(cfg, split)
    folder.check_labels()
    val = SegmentationDataset(folder, cfg, train=False)
    return tud.DataLoader(tud.Subset(val, range(rank, len(val), world)), batch_size=1, num_workers=cfg.num_workers,
                          collate_fn=collate_segment, worker_init_fn=worker_init)


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, loader, cfg: SegmentDataConfig, device: torch.device,
                       class_names=None) -> dict:
    """Metrics over a loader of single images (labels at their own size); the confusion matrix is summed
    over processes under torchrun."""
    was_training = model.training
    model.eval()
    cm = torch.zeros(cfg.num_classes, cfg.num_classes, dtype=torch.int64, device=device)
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    for batch in loader:
        skipped += int(batch.get("skipped", 0))
        if batch.get("skipped"):  # an unreadable image: left out of the scores, counted
            continue
        x, label = batch["image"].to(device), batch["label"].to(device)
        cm += confusion_matrix(predict(model, x, cfg, label.shape[-2:]), label, cfg.num_classes, cfg.ignore_index)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(cm)
        dist.all_reduce(skipped)
    model.train(was_training)
    metrics = segmentation_metrics(cm.cpu(), class_names)
    if int(skipped):
        metrics["skipped_images"] = int(skipped)
    return metrics


@torch.no_grad()
def prediction_picture(model: nn.Module, folder: SegmentationFolder, cfg: SegmentDataConfig, path: Path,
                       device: torch.device, count: int = 4, width: int = 240) -> Path:
    """A PNG with one row per image (the first `count` of the split): image | ground truth | prediction,
    in the dataset's palette (ignored pixels black)."""
    was_training = model.training
    model.eval()
    palette = np.array([*folder.palette, (0, 0, 0)], dtype=np.uint8)  # the last colour: ignored

    def paint(label: np.ndarray) -> Image.Image:
        index = np.where(label == cfg.ignore_index, len(palette) - 1, np.clip(label, 0, len(palette) - 2))
        return Image.fromarray(palette[index])

    rows = []
    for i in range(len(folder)):
        if len(rows) == count:
            break
        try:
            image, label = folder.load(i)
        except DataError:
            raise
        except Exception:  # noqa: BLE001 - unreadable (already counted by the evaluation): the next one
            continue
        pred = predict(model, eval_transform(image, cfg)[None].to(device), cfg, label.shape)[0]
        height = round(width * image.height / image.width)
        rows.append([p.resize((width, height), Image.NEAREST)
                     for p in (image, paint(label), paint(pred.cpu().numpy()))])
    model.train(was_training)
    if not rows:  # no readable image to show
        return path
    canvas = Image.new("RGB", (3 * width, sum(r[0].height for r in rows)), "white")
    y = 0
    for row in rows:
        for col, panel in enumerate(row):
            canvas.paste(panel, (col * width, y))
        y += row[0].height

    def write(f):
        buffer = io.BytesIO()
        canvas.save(buffer, "PNG")
        f.write(buffer.getvalue())

    atomic_write(path, write)
    return path
