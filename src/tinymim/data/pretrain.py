"""Images in, paired views out: pre-training's data config (`DataConfig`) and the views the training
device builds from a loader batch (`paired_views`, `plain_view`: decoding with data.decode=device, color
jitter, normalization).

Split of the work, chosen for speed and exact reproducibility:
- Loader workers decode each image and apply the geometry that both views share
  (RandomResizedCrop, bicubic, + horizontal flip), returning uint8 tensors, plus the random factors
  of the student's color jitter (tinymim.data.view_dataset; the image sources: tinymim.data.sources;
  the samplers and the loader: tinymim.data.loader).
- On the training device, `paired_views` turns one uint8 batch into the teacher view (normalized)
  and the student view (ColorJitter, then normalized), in one batched pass.

Every random choice for a sample comes from a seed derived from (run seed, epoch, position in the
epoch), never from worker or process RNG state, so the same samples get the same views whatever the
number of workers or processes, and a resumed run sees exactly the data an uninterrupted one would.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.io import ImageReadMode, decode_jpeg

from tinymim.core.errors import DataError  # defined below this module: tinymim.data.shards raises it too

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    # folder: an ImageFolder tree (ImageNet layout root/<class>/<image>); shards: tar shards written by
    # `tinymim shards`; cifar10/cifar100: torchvision (downloaded into root when missing); synthetic:
    # procedural images generated on the fly, offline; images: every image under root (a folder at any
    # depth, or a .tar/.zip), unlabeled (pre-training only)
    name: Literal["folder", "shards", "cifar10", "cifar100", "synthetic", "images"] = "synthetic"
    # folder: the ImageFolder root, or a tar of it (train.tar holding train/<class>/*.jpg, extracted once
    # into ~/.cache/tinymim/tars or $TINYMIM_CACHE/tars; with cifar10/100 too); shards: their folder or URL
    # prefix (http://, https://, file://); cifar10/100: where torchvision keeps (or downloads) it
    root: str | None = None
    shard_cache: str | None = None  # shards from a URL: where to download them (null: ~/.cache/tinymim/shards)
    img_size: int = 224  # training image size in pixels (the random crop's output)
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop area range [low, high]
    hflip: bool = True  # random horizontal flip
    color_jitter: float = 0.4  # brightness = contrast = saturation strength of the student view
    # per-channel normalization mean (R, G, B)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_DEFAULT_MEAN))
    # per-channel normalization std (R, G, B)
    std: list[float] = field(default_factory=lambda: list(IMAGENET_DEFAULT_STD))
    num_workers: int = 8  # data-loading worker processes per training process
    # where JPEGs are decoded: "cpu" (Pillow in the loader workers) or "device" (workers only read the
    # file and its header and draw the same random crop; the training device decodes the batch at once,
    # torchvision.io.decode_jpeg on CUDA, then crops, resizes and flips; other formats stay on Pillow)
    decode: Literal["cpu", "device"] = "cpu"
    # batches prepared ahead of their step in a background thread (tinymim.data.prefetch): the next
    # batch's images are built (with decode: device decoded, cropped and resized; on a GPU on a side CUDA
    # stream) while the current one trains; the same views as without. 0: built inside the step
    prefetch: int = 1
    # decode: cpu: decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's draft) when its
    # random crop still has at least img_size pixels a side at that scale, then one resize; faster on
    # images much larger than the crop's output, pixels within about a level of the full decode's
    # (benchmarks/speed/jpeg_loader_throughput.py --draft-study); off: every JPEG decoded whole
    jpeg_draft: bool = False
    subset: int | None = None  # use a fixed random sample of N images (quick experiments)
    synthetic_size: int = 2048  # synthetic: number of images
    synthetic_classes: int = 10  # synthetic: number of classes

    def validate(self) -> None:
        if self.name in ("folder", "shards", "images") and not self.root:
            raise ValueError(f"data.root is needed for data.name={self.name}")
        if self.img_size < 1:
            raise ValueError(f"img_size must be positive, got {self.img_size}")
        for key in ("mean", "std"):
            if len(getattr(self, key)) != 3:
                raise ValueError(f"{key} needs 3 numbers (R, G, B), got {getattr(self, key)}")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be 0 or more, got {self.num_workers}")
        if self.jpeg_draft and (self.decode != "cpu" or self.name not in ("folder", "shards")):
            raise ValueError("data.jpeg_draft reduces JPEG files Pillow decodes (data.name folder or shards, "
                             f"data.decode=cpu); with data.name={self.name}, data.decode={self.decode} it would "
                             "change nothing: leave it off")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be 0 (none) or more batches, got {self.prefetch}")
        if self.subset is not None and self.subset < 1:
            raise ValueError(f"subset must be positive (or null for all images), got {self.subset}")
        if self.synthetic_size < 1 or self.synthetic_classes < 1:
            raise ValueError("synthetic_size and synthetic_classes must be positive")
        if self.color_jitter < 0:
            raise ValueError(f"color_jitter must be 0 or more, got {self.color_jitter}")


# ---------------------------------------------------------------------------------------------
# on-device view construction

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = x.new_tensor(_GRAY).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Per-sample ColorJitter(brightness, contrast, saturation) on a float batch in [0, 1].

    factors: B x 3 (brightness, contrast, saturation multipliers); order: B x 3, a permutation of
    0..2 per sample giving the order the three adjustments are applied in (as torchvision does).
    """
    f = factors.to(x.dtype).view(-1, 3, 1, 1, 1)
    # every adjustment is computed for the whole batch and selected per sample: 3x the arithmetic of
    # indexing each sample's own op, but no data-dependent indexing (no device syncs on GPU)
    for slot in range(3):
        op = order[:, slot].view(-1, 1, 1, 1)
        b = (x * f[:, 0]).clamp(0, 1)
        c = (f[:, 1] * x + (1 - f[:, 1]) * _gray(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1)
        s = (f[:, 2] * x + (1 - f[:, 2]) * _gray(x)).clamp(0, 1)
        x = torch.where(op == 0, b, torch.where(op == 1, c, s))
    return x


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = x.new_tensor(mean).view(1, -1, 1, 1)
    s = x.new_tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


def decode_jpegs(files: list[torch.Tensor], names: list[str], device: torch.device) -> list[torch.Tensor | None]:
    """Encoded JPEGs -> uint8 3 x H x W images on `device`, the whole batch in one call (nvJPEG on
    CUDA). A file that does not decode gives None (it is logged by name)."""
    try:
        return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # a damaged file fails the batch: decode one by one to find it
        out = []
        for data, name in zip(files, names):
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as e:
                log.warning("skipping unreadable image %s: %s", name, str(e).splitlines()[0])
                out.append(None)
        return out


def crop_resize_flip(img: torch.Tensor, box, size: int) -> torch.Tensor:
    """uint8 3 x H x W -> float 3 x size x size in [0, 1]: the crop box (top, left, h, w, flip), resized
    by antialiased bicubic interpolation (PIL's filter, a = -0.5), then flipped when asked."""
    top, left, h, w, flip = box
    crop = img[:, top:top + h, left:left + w].unsqueeze(0).float()
    out = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
    out = out.div_(255).clamp_(0, 1)
    return out.flip(-1) if flip else out


def device_images(batch: dict, cfg: DataConfig, device: torch.device) -> torch.Tensor:
    """The batch's shared crops as floats in [0, 1] on `device`, B x 3 x S x S: transferred when the
    loader workers decoded them, decoded and cropped here when they sent the files (decode: device);
    built already when the batch was prefetched (`with_device_images`)."""
    if "device_image" in batch:
        return batch["device_image"]
    if "jpeg" not in batch:
        return batch["image"].to(device, non_blocking=True).float().div_(255)
    s = cfg.img_size
    out = torch.empty(len(batch["label"]), 3, s, s, device=device)
    if "image_index" in batch:
        out[batch["image_index"].to(device)] = batch["image"].to(device, non_blocking=True).float().div_(255)
    files = list(torch.split(batch["jpeg"], batch["jpeg_sizes"].tolist()))
    images = decode_jpegs(files, batch["jpeg_name"], device)
    good = [i for i, img in enumerate(images) if img is not None]
    if not good:
        raise DataError(f"no image of the batch could be decoded ({', '.join(batch['jpeg_name'][:3])} ...); "
                        "is the dataset corrupt?")
    boxes = batch["jpeg_box"].tolist()
    for i, pos in enumerate(batch["jpeg_index"].tolist()):
        j = i if images[i] is not None else good[i % len(good)]  # an unreadable file: another of the batch
        out[pos] = crop_resize_flip(images[j], boxes[j], s)
    batch["skipped"] = batch["skipped"] + len(images) - len(good)
    return out


# what `device_images` reads of a batch: with_device_images drops them once the images are built
RAW_IMAGE_KEYS = ("image", "image_index", "jpeg", "jpeg_sizes", "jpeg_box", "jpeg_index")


def with_device_images(batch: dict, cfg: DataConfig, device: torch.device) -> dict:
    """The batch with its images built ahead of its step (tinymim.data.prefetch runs this in its
    thread): "device_image" holds `device_images`' result, which the views then take as it is; the
    files and crops it was made from are dropped (nothing is left to transfer), and unreadable files
    are counted in "skipped" as they would be inside the step. No random draw happens here: the
    views are the same as without prefetching."""
    batch["device_image"] = device_images(batch, cfg, device)
    for key in RAW_IMAGE_KEYS:
        batch.pop(key, None)
    return batch


def plain_view(batch: dict, cfg: DataConfig, device: torch.device) -> torch.Tensor:
    """The shared crop, normalized, as a float tensor on `device` (the teacher's view)."""
    return normalize(device_images(batch, cfg, device), cfg.mean, cfg.std)


def paired_views(batch: dict, cfg: DataConfig, device: torch.device, teacher_mean=None,
                 teacher_std=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher view, student view) as normalized float tensors on `device`; the teacher's with its own
    mean/std when given (a CLIP teacher expects CLIP's), else the data's."""
    x = device_images(batch, cfg, device)
    teacher = normalize(x, teacher_mean or cfg.mean, teacher_std or cfg.std)
    student = x
    if cfg.color_jitter > 0:
        student = color_jitter(x, batch["jitter"].to(device), batch["jitter_order"].to(device))
    return teacher, normalize(student, cfg.mean, cfg.std)
