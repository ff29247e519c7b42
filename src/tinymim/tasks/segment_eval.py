"""A segmenter's evaluation (tasks/segment.py trains it): class indices by sliding-window or
whole-image inference, the evaluation loader (cut to N evenly spaced images by
`limit_split`, which fine-tuning's evaluation uses too), mIoU, mAcc, aAcc and per-class IoU from a
confusion matrix summed over processes, and a picture of its predictions.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data as tud

from tinymim.core.errors import DataError
from tinymim.core.files import atomic_write
from tinymim.data.loader import worker_init
from tinymim.data.segmentation import (
    SegmentationDataset,
    SegmentationFolder,
    SegmentDataConfig,
    collate_segment_eval,
    eval_transform,
)
from tinymim.models.segmenter import confusion_matrix, segmentation_metrics, slide_inference
from tinymim.train.bookkeeping import evaluation_bar

log = logging.getLogger("tinymim")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, cfg: SegmentDataConfig, size) -> torch.Tensor:
    """Class indices at `size` (the label map's): sliding-window or whole-image logits, resized bilinearly."""
    if cfg.eval_mode == "slide":
        logits = slide_inference(model, x, cfg.num_classes, cfg.crop_size, cfg.eval_stride)
    else:
        logits = model(x)
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False).argmax(1)


def limited_split_size(loader: tud.DataLoader, limit: int | None, what: str) -> int | None:
    """The split's size when `limit` cut `loader` (limit_split) to fewer images, said in one line; else None."""
    size = len(loader.dataset.dataset)
    if limit is None or limit >= size:
        return None
    log.info("evaluating on %d of the %d images of the %s (eval_limit), evenly spaced over it", limit, size, what)
    return size


def eval_loader(cfg: SegmentDataConfig, split: str, rank: int = 0, world: int = 1,
                limit: int | None = None) -> tud.DataLoader:
    """data.eval_batch_size images at a time (labels keep their own sizes: images of one size stack, others
    go one by one), each process a strided shard of the split, or of `limit` images evenly spaced over
    it. Its label maps are checked now: in training, before the first epoch, not after it."""
    folder = SegmentationFolder(cfg, split)
    folder.check_labels()
    val = SegmentationDataset(folder, cfg, train=False)
    loader = tud.DataLoader(tud.Subset(val, range(rank, len(val), world)), batch_size=cfg.eval_batch_size,
                            num_workers=cfg.num_workers, collate_fn=collate_segment_eval, worker_init_fn=worker_init)
    return limit_split(loader, limit, rank, world)


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, loader, cfg: SegmentDataConfig, device: torch.device,
                       class_names=None, progress: bool = False) -> dict:
    """Metrics over an evaluation loader (eval_loader's batches, or single images; labels at their own
    size); the confusion matrix is summed over processes under torchrun. progress: a bar over the images
    while they are scored."""
    was_training = model.training
    model.eval()
    cm = torch.zeros(cfg.num_classes, cfg.num_classes, dtype=torch.int64, device=device)
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    for batches in evaluation_bar(loader, "segment eval", progress):
        for batch in batches if isinstance(batches, list) else [batches]:  # images of one size each
            skipped += int(batch.get("skipped", 0))
            if batch.get("skipped", 0) == len(batch["image"]):  # nothing readable: left out of the scores, counted
                continue
            # an unreadable image among readable ones: its label map is all ignored, it adds nothing
            x, label = batch["image"].to(device), batch["label"].to(device)
            cm += confusion_matrix(predict(model, x, cfg, label.shape[-2:]), label, cfg.num_classes,
                                   cfg.ignore_index)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(cm)
        dist.all_reduce(skipped)
    model.train(was_training)
    metrics = segmentation_metrics(cm.cpu(), class_names)
    if int(skipped):
        metrics["skipped_images"] = int(skipped)
    return metrics


def spread_picks(n: int, count: int) -> list[int]:
    """`count` indices evenly spaced over 0..n-1, first and last included: frames from across the split,
    not neighbours (consecutive frames of a video look alike)."""
    count = min(count, n)
    return sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(count)})


def limit_split(loader: tud.DataLoader, limit: int | None, rank: int = 0, world: int = 1) -> tud.DataLoader:
    """An evaluation loader (this process's strided share of a split) cut to `limit` images of the split,
    evenly spaced over it (spread_picks: the same images in every evaluation and run, every class of a
    folder tree listed class by class), each process a strided share of them; without a limit, or with
    one the split does not exceed, the loader as it is. Fine-tuning's evaluation is cut the same way."""
    split = loader.dataset.dataset
    if limit is None or limit >= len(split):
        return loader
    picks = spread_picks(len(split), limit)
    return tud.DataLoader(tud.Subset(split, picks[rank::world]), batch_size=loader.batch_size,
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                          worker_init_fn=loader.worker_init_fn)


@torch.no_grad()
def prediction_figure(model: nn.Module, folder: SegmentationFolder, cfg: SegmentDataConfig, device: torch.device,
                      count: int = 4, width: int = 240):
    """(the matplotlib figure, the split's indices shown) of a segmenter's predictions: one row per image,
    `count` images evenly spaced over the split (an unreadable one gives way to its next), titled columns
    image | ground truth | prediction in the dataset's palette, ignored pixels black, and a legend of the
    classes (every one up to 24 classes, else those shown) and the ignored label; None when no image reads."""
    import matplotlib  # lazy: plotting is the picture's business only; Agg is chosen before pyplot loads
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    was_training = model.training
    model.eval()
    palette = np.array([*folder.palette, (0, 0, 0)], dtype=np.uint8)  # the last colour: ignored

    def paint(label: np.ndarray) -> np.ndarray:
        return palette[np.where(label == cfg.ignore_index, len(palette) - 1, np.clip(label, 0, len(palette) - 2))]

    rows, shown, seen = [], [], set()
    for pick in spread_picks(len(folder), count):
        for i in range(pick, len(folder)):
            if i in shown:
                continue
            try:
                image, label = folder.load(i)
            except DataError:
                raise
            except Exception:  # noqa: BLE001 - unreadable (already counted by the evaluation): the next one
                continue
            pred = predict(model, eval_transform(image, cfg)[None].to(device), cfg, label.shape)[0].cpu().numpy()
            seen |= set(np.unique(label).tolist()) | set(np.unique(pred).tolist())
            rows.append((folder.images[i].stem, np.asarray(image), paint(label), paint(pred)))
            shown.append(i)
            break
    model.train(was_training)
    if not rows:  # no readable image to show
        return None, []
    classes = [c for c in range(len(folder.palette)) if len(folder.palette) <= 24 or c in seen]
    legend = [(folder.classes[c] if c < len(folder.classes) else str(c), palette[c]) for c in classes]
    legend.append((f"ignored ({cfg.ignore_index})", palette[-1]))
    panel_w = width / 100  # inches at 100 dpi: `width` pixels per panel
    panel_h = max(panel_w * r[1].shape[0] / r[1].shape[1] for r in rows)
    legend_rows = -(-len(legend) // 6)
    fig_h = 0.35 + len(rows) * (panel_h + 0.08) + 0.25 + 0.22 * legend_rows
    fig = plt.figure(figsize=(3 * panel_w + 0.45, fig_h), dpi=100)
    spec = fig.add_gridspec(len(rows), 3, wspace=0.03, hspace=0.08, left=0.4 / (3 * panel_w + 0.45), right=0.99,
                            top=1 - 0.35 / fig_h, bottom=(0.25 + 0.22 * legend_rows) / fig_h)
    for r, (stem, *panels) in enumerate(rows):
        for col, (title, pixels) in enumerate(zip(("image", "ground truth", "prediction"), panels)):
            ax = fig.add_subplot(spec[r, col])
            ax.imshow(pixels, interpolation="nearest" if col else "bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_label(title)
            if r == 0:
                ax.set_title(title, fontsize=10)
            if col == 0:
                ax.set_ylabel(stem, fontsize=7)
    fig.legend(handles=[Patch(facecolor=colour / 255, edgecolor="0.4", label=name) for name, colour in legend],
               loc="lower center", ncol=min(6, len(legend)), fontsize=7, frameon=False, handlelength=1.2,
               columnspacing=1.0)
    return fig, shown


def prediction_picture(model: nn.Module, folder: SegmentationFolder, cfg: SegmentDataConfig, path: Path,
                       device: torch.device, count: int = 4, width: int = 240) -> Path:
    """prediction_figure written as a PNG at `path` (nothing written when no image reads)."""
    import matplotlib.pyplot as plt

    fig, _ = prediction_figure(model, folder, cfg, device, count, width)
    if fig is None:
        return path
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path
