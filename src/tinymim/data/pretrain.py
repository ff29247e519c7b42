"""Images in, paired views out.

Split of the work, chosen for speed and exact reproducibility:
- Loader workers decode each image and apply the geometry that both views share
  (RandomResizedCrop, bicubic, + horizontal flip), returning uint8 tensors, plus the random factors
  of the student's color jitter.
- On the training device, `paired_views` turns one uint8 batch into the teacher view (normalized)
  and the student view (ColorJitter, then normalized), in one batched pass.

Every random choice for a sample comes from a seed derived from (run seed, epoch, position in the
epoch), never from worker or process RNG state, so the same samples get the same views whatever the
number of workers or processes, and a resumed run sees exactly the data an uninterrupted one would.
"""
from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data as tud
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from tinymim.core.errors import DataError  # defined below this module: tinymim.data.shards raises it too
from tinymim.data.images import decode_image, open_decoded, to_rgb8  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    # folder: an ImageFolder tree (ImageNet layout root/<class>/<image>); shards: tar shards written by
    # `tinymim shards`; cifar10/cifar100: torchvision (downloaded into root when missing); synthetic:
    # procedural images generated on the fly, offline
    name: Literal["folder", "shards", "cifar10", "cifar100", "synthetic"] = "synthetic"
    # folder: the ImageFolder root; shards: their folder or URL prefix (http://, https://, file://);
    # cifar10/100: where torchvision keeps (or downloads) it
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
    subset: int | None = None  # use a fixed random sample of N images (quick experiments)
    synthetic_size: int = 2048  # synthetic: number of images
    synthetic_classes: int = 10  # synthetic: number of classes

    def validate(self) -> None:
        if self.name in ("folder", "shards") and not self.root:
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
        if self.subset is not None and self.subset < 1:
            raise ValueError(f"subset must be positive (or null for all images), got {self.subset}")
        if self.synthetic_size < 1 or self.synthetic_classes < 1:
            raise ValueError("synthetic_size and synthetic_classes must be positive")
        if self.color_jitter < 0:
            raise ValueError(f"color_jitter must be 0 or more, got {self.color_jitter}")


# ---------------------------------------------------------------------------------------------
# image sources: each returns a PIL image and an integer label for an index, or raises


def list_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, (path, label) per image) of an ImageFolder tree root/<class>/<image>: the one listing
    that reading a folder and `tinymim shards` use. torchvision's make_dataset order and paths (class,
    folder path, file name; paths as found under root). Symlinks are followed, but each file is taken once
    by its real path, and a link back into the tree (a loop, or another class's images under this class)
    or in a loop outside it is refused, as is a class folder without images (it would shift the labels)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist; set data.root to a folder laid out as "
                        "root/<class>/<image>.jpg (ImageNet's train/ folder)")
    top = os.path.realpath(root)
    prefix = top.rstrip(os.sep) + os.sep

    def scan(path: str) -> list:
        try:
            with os.scandir(path) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError as e:  # os.walk would skip it silently, and its images with it
            raise DataError(f"cannot list {path} ({e.strerror or e}); make it readable or remove it") from e

    def real(entry, parent: str) -> str:
        if not entry.is_symlink():  # no syscall: the real path follows from the parent's
            return os.path.join(parent, entry.name)
        target = os.path.realpath(entry.path)
        if target == top or target.startswith(prefix):
            raise DataError(f"{entry.path} is a symlink into the data folder {root} (to {target}): its images "
                            "would be read twice or under another class; remove the link, or copy what it "
                            "should hold")
        return target

    def walk(path: str, where: str, stack: tuple, out: list) -> None:
        files = []
        for e in scan(path):
            if e.is_dir():  # follows links, as os.walk(followlinks=True) does
                target = real(e, where)
                # only a link can lead back up: to a folder that holds one the walk came through
                up = target.rstrip(os.sep) + os.sep
                if e.is_symlink() and any(s == target or s.startswith(up) for s in stack):
                    raise DataError(f"{e.path} is a symlink loop (it leads to {target}, which holds it); "
                                    "remove the link")
                walk(e.path, target, (*stack, target), out)
            elif e.name.lower().endswith(IMG_EXTENSIONS):
                files.append((e.path, real(e, where)))
        out.append((path, files))

    classes, folders = [], []
    for e in scan(str(root)):
        if e.is_dir():
            target = real(e, top)
            classes.append(e.name)
            folders.append([])
            walk(e.path, target, (top, target), folders[-1])
    if not classes:
        raise DataError(f"no class folders in {root}; expected root/<class>/<image>.jpg")
    samples, seen, counts = [], set(), [0] * len(classes)
    for label, found in enumerate(folders):
        for _, files in sorted(found, key=lambda f: f[0]):  # make_dataset's sorted(os.walk(...))
            for path, target in files:
                if target not in seen:  # two links to one file outside the tree: taken once
                    seen.add(target)
                    samples.append((path, label))
                    counts[label] += 1
    if not samples:
        raise DataError(f"no images in {root} (looked for {', '.join(IMG_EXTENSIONS)} files in its class folders)")
    empty = [c for c, n in zip(classes, counts) if not n]
    if empty:
        raise DataError(f"class folder {root / empty[0]} holds no images ({len(empty)} such of {len(classes)}): "
                        "it would still take a class index and shift the others; remove the empty folder "
                        "or add images")
    return classes, samples


class FolderImages(tud.Dataset):
    """ImageNet-layout folder: root/<class>/<image> (list_folder's listing). Listing does not open the images."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.classes, self.samples = list_folder(self.root)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        return decode_image(path), label

    def read_bytes(self, i: int) -> tuple[bytes, int]:
        """The encoded file and its label, undecoded (for decoding on the training device)."""
        path, label = self.samples[i]
        with open(path, "rb") as f:
            return f.read(), label

    def describe(self, i: int) -> str:
        return self.samples[i][0]


class TorchvisionCIFAR(tud.Dataset):
    def __init__(self, name: str, root: str | None, train: bool = True):
        from torchvision import datasets

        cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
        root = root or str(Path.home() / ".cache" / "tinymim" / name)
        try:
            self.ds = cls(root, train=train, download=False)
        except RuntimeError:
            try:
                self.ds = cls(root, train=train, download=True)
            except Exception as e:  # noqa: BLE001 - any network failure
                raise DataError(f"{name} is not in {root} and could not be downloaded ({e}); "
                                f"download it on a connected machine into {root}, or use "
                                "data.name=folder with an extracted copy") from e
        self.classes = list(self.ds.classes)

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, i: int) -> tuple[Image.Image, int]:
        return self.ds[i]

    def describe(self, i: int) -> str:
        return f"cifar[{i}]"


class SyntheticImages(tud.Dataset):
    """Procedural images, offline and deterministic: class c draws oriented stripes of a
    class-specific angle, frequency and palette over a noisy background, plus random blobs."""

    def __init__(self, size: int = 2048, img_size: int = 32, num_classes: int = 10, seed: int = 0):
        self.size, self.img_size, self.num_classes, self.seed = size, img_size, num_classes, seed
        self.classes = [f"class_{c}" for c in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def load(self, i: int) -> tuple[Image.Image, int]:
        rng = np.random.default_rng((self.seed, i))
        c = i % self.num_classes
        s = self.img_size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        angle = math.pi * c / self.num_classes + rng.normal(0, 0.05)
        freq = 2 + 3 * (c % 4) + rng.uniform(-0.3, 0.3)
        wave = np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + rng.uniform(0, 6.3))
        hue = np.array([math.cos(2 * math.pi * c / self.num_classes + k * 2.1) for k in range(3)], np.float32)
        img = 0.5 + 0.35 * wave[..., None] * hue + rng.normal(0, 0.06, (s, s, 3))
        for _ in range(rng.integers(1, 4)):  # blobs
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
            img[mask] = rng.uniform(0, 1, 3)
        return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)), c

    def describe(self, i: int) -> str:
        return f"synthetic[{i}]"


def fixed_sample(length: int, n: int, seed: int = 0) -> list[int]:
    """n of range(length), drawn at random with a fixed seed (the same for every run), in order: a
    folder's first n images would be its first classes only."""
    if n >= length:
        return list(range(length))
    return sorted(random.Random(seed).sample(range(length), n))


class SubsetImages:
    """A fixed random sample of n images of a source (the same for every run: seed 0), in source
    order; a folder's first n images would be its first classes only. `indices` selects given ones."""

    def __init__(self, source, n: int | None = None, indices: list[int] | None = None):
        self.source = source
        if indices is None:
            if n < 1:
                raise DataError(f"data.subset must be positive, got {n}")
            indices = fixed_sample(len(source), n)
        self.indices = list(indices)
        self.classes = getattr(source, "classes", None)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int):
        return self.source.load(self.indices[i])

    def read_bytes(self, i: int):
        return self.source.read_bytes(self.indices[i])

    def describe(self, i: int) -> str:
        return self.source.describe(self.indices[i])


def split_holdout(source, n: int) -> tuple[SubsetImages, SubsetImages]:
    """(the rest, n held-out images): a fixed random split of a training source (seed 1, independent
    of data.subset's sample), so that recipes are tuned on training images and the test split only
    scores the result."""
    if not 0 < n < len(source):
        raise DataError(f"data.holdout={n} must be between 1 and the {len(source)} training images - 1")
    held = set(random.Random(1).sample(range(len(source)), n))
    return (SubsetImages(source, indices=[i for i in range(len(source)) if i not in held]),
            SubsetImages(source, indices=sorted(held)))


def _listing(source) -> list[str] | None:
    """What a source holds, independent of where it is mounted (None: unknown kind of source)."""
    if isinstance(source, SubsetImages):
        inner = _listing(source.source)
        return None if inner is None else [*inner, "indices", *map(str, source.indices)]
    if isinstance(source, FolderImages):
        root = str(source.root)
        return [f"{Path(p).relative_to(root).as_posix()} {label}" for p, label in source.samples]
    if isinstance(source, TorchvisionCIFAR):
        return [f"{type(source.ds).__name__} train={source.ds.train} {len(source.ds)}"]
    if isinstance(source, SyntheticImages):
        return [f"synthetic {source.size} {source.img_size} {source.num_classes} {source.seed}"]
    from tinymim.data.shards import ShardImages

    if isinstance(source, ShardImages):  # its shards and sample keys: the same wherever it is served from
        return source.listing()
    return None


def data_fingerprint(dataset) -> dict:
    """What identifies a run's training data, wherever it is mounted: the number of images, the
    class count and a hash of the class names and of the images' paths relative to the root."""
    import hashlib

    source = getattr(dataset, "source", dataset)
    classes = list(getattr(source, "classes", None) or [])
    listing = _listing(source)
    out = {"images": len(dataset), "classes": len(classes)}
    if listing is not None:
        out["sha256"] = hashlib.sha256("\n".join([*classes, "--", *listing]).encode()).hexdigest()
    return out


def build_source(cfg: DataConfig, seed: int = 0):
    if cfg.name == "folder":
        src = FolderImages(cfg.root)
    elif cfg.name == "shards":
        from tinymim.data.shards import ShardImages

        src = ShardImages(cfg.root, cache=cfg.shard_cache)
    elif cfg.name in ("cifar10", "cifar100"):
        src = TorchvisionCIFAR(cfg.name, cfg.root)
    else:
        src = SyntheticImages(cfg.synthetic_size, cfg.img_size, cfg.synthetic_classes, seed)
    return SubsetImages(src, cfg.subset) if cfg.subset is not None else src


# ---------------------------------------------------------------------------------------------
# per-sample worker transform


def random_resized_crop_params(rng: random.Random, width: int, height: int, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, drawing from `rng` instead of global state."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: central crop
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ---------------------------------------------------------------------------------------------
# reading with substitutes (decoding itself: tinymim.data.images)


MAX_SUBSTITUTIONS = 16


def load_or_substitute(source, index: int, length: int, fatal: tuple = ()) -> tuple[Image.Image, int, int]:
    """(image, label, skipped): the image at `index`, or, when it cannot be read, the next readable
    one; skipped is 1 when the image at `index` was unreadable (logged), else 0. A substitute that
    fails is not counted here: it is counted when its own index is drawn, once per occurrence.
    Exceptions of the `fatal` types propagate (errors in the data the user must fix)."""
    for attempt in range(MAX_SUBSTITUTIONS):
        i = (index + attempt) % length
        try:
            img, label = source.load(i)
            return img, label, int(attempt > 0)
        except fatal:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, not fatal
            (log.warning if attempt == 0 else log.debug)("skipping unreadable image %s: %s", source.describe(i), e)
    raise DataError(f"{MAX_SUBSTITUTIONS} consecutive images could not be read near index {index}; "
                    "is the dataset corrupt?")


def reads_encoded(source) -> bool:
    """Whether a source can hand out encoded files (a folder of files can; CIFAR arrays cannot)."""
    inner = source.source if isinstance(source, SubsetImages) else source
    return hasattr(inner, "read_bytes")


class PairedViewDataset(tud.Dataset):
    """Indexed by (index, sample_seed). Returns the shared crop as uint8 CxHxW, the student's jitter
    factors (brightness, contrast, saturation) and their order, and the label. A sample that cannot
    be read is replaced by the next readable one and reported in `skipped`.

    With `decode: device`, a JPEG is not decoded here: the sample carries the file's bytes and the crop
    box (top, left, height, width, flip) drawn from its header, from the same random stream in the same
    order as the Pillow path, and `device_images` finishes it on the training device."""

    def __init__(self, source, cfg: DataConfig):
        self.source, self.cfg = source, cfg
        self.length = len(source)
        self.encoded = cfg.decode == "device" and reads_encoded(source)

    def __len__(self) -> int:
        return self.length

    def draw(self, rng: random.Random, width: int, height: int):
        """Every random choice of one sample, in a fixed order: crop box, flip, jitter factors and order."""
        box = random_resized_crop_params(rng, width, height, self.cfg.crop_scale)
        flip = bool(self.cfg.hflip and rng.random() < 0.5)
        j = self.cfg.color_jitter
        factors = [rng.uniform(max(0.0, 1 - j), 1 + j) for _ in range(3)]
        order = list(range(3))
        rng.shuffle(order)
        return box, flip, torch.tensor(factors), torch.tensor(order)

    def __getitem__(self, item):
        index, sample_seed = item
        if self.encoded:
            sample = self._encoded(index, sample_seed)
            if sample is not None:
                return sample
        img, label, skipped = load_or_substitute(self.source, index, self.length)
        (top, left, h, w), flip, factors, order = self.draw(random.Random(sample_seed), img.width, img.height)
        s = self.cfg.img_size
        img = TF.resized_crop(img, top, left, h, w, [s, s], InterpolationMode.BICUBIC)
        if flip:
            img = TF.hflip(img)
        return TF.pil_to_tensor(img), factors, order, label, skipped

    def _encoded(self, index: int, sample_seed: int):
        """The undecoded sample, or None when the file is not a baseline RGB/gray JPEG or its header
        cannot be read (then the Pillow path decodes it, or skips it as unreadable)."""
        import io
        import warnings

        try:
            data, label = self.source.read_bytes(index)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # decode_image refuses it
                with Image.open(io.BytesIO(data)) as header:  # parses the header only
                    if header.format != "JPEG" or header.mode not in ("RGB", "L"):
                        return None
                    width, height = header.size
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                return None  # a possible decompression bomb: the Pillow path skips it
        except Exception:  # noqa: BLE001 - the Pillow path reports it
            return None
        (top, left, h, w), flip, factors, order = self.draw(random.Random(sample_seed), width, height)
        encoded = {"data": torch.frombuffer(bytearray(data), dtype=torch.uint8),
                   "box": torch.tensor([top, left, h, w, int(flip)]), "name": self.source.describe(index)}
        return encoded, factors, order, label, 0


def collate(samples) -> dict:
    """A batch: "image" (uint8 B x 3 x S x S) when every sample was decoded by the worker; otherwise
    "jpeg" (the encoded files end to end, "jpeg_sizes" long each), "jpeg_box", "jpeg_name", "jpeg_index"
    (their positions) and, for the rest, "image" with "image_index"."""
    payloads, factors, orders, labels, skipped = zip(*samples)
    batch = {"jitter": torch.stack(factors), "jitter_order": torch.stack(orders), "label": torch.tensor(labels),
             "skipped": sum(skipped)}
    encoded = [i for i, p in enumerate(payloads) if isinstance(p, dict)]
    if not encoded:
        batch["image"] = torch.stack(payloads)
        return batch
    batch["jpeg_index"] = torch.tensor(encoded)
    # one flat tensor, not one per file: each tensor crossing from a worker costs a shared-memory
    # segment (and a pinning call), which made the loader, not the decode, the bottleneck on a GPU
    batch["jpeg"] = torch.cat([payloads[i]["data"] for i in encoded])
    batch["jpeg_sizes"] = torch.tensor([len(payloads[i]["data"]) for i in encoded])
    batch["jpeg_box"] = torch.stack([payloads[i]["box"] for i in encoded])
    batch["jpeg_name"] = [payloads[i]["name"] for i in encoded]
    decoded = [i for i, p in enumerate(payloads) if not isinstance(p, dict)]
    if decoded:
        batch["image_index"] = torch.tensor(decoded)
        batch["image"] = torch.stack([payloads[i] for i in decoded])
    return batch


# ---------------------------------------------------------------------------------------------
# sampling: the same global batches for any number of processes, resumable mid-epoch


class GlobalBatchSampler:
    """Yields this rank's slice of each global batch of an epoch as (index, sample_seed) pairs.

    The epoch's order is a permutation seeded by (seed, epoch); global batch t is positions
    [t*G, (t+1)*G) of it, and rank r takes the r-th contiguous 1/world of that batch. Incomplete
    final batches are dropped. `set_epoch(epoch, start_step)` resumes mid-epoch.
    """

    def __init__(self, length: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        if length < global_batch:
            raise DataError(f"the dataset has {length} images, fewer than one global batch ({global_batch})")
        self.length, self.global_batch, self.rank, self.world, self.seed = length, global_batch, rank, world, seed
        self.local_batch = global_batch // world
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    @property
    def steps_per_epoch(self) -> int:
        return self.length // self.global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.length, generator=g).tolist()
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003
        for step in range(self.start_step, self.steps_per_epoch):
            lo = step * self.global_batch + self.rank * self.local_batch
            yield [(perm[p], base + p) for p in range(lo, lo + self.local_batch)]


class ShardBatchSampler(GlobalBatchSampler):
    """Yields this rank's part of each global batch of an epoch as (index, sample_seed) pairs, reading
    whole shards per rank (tinymim.data.shards' docstring states the split); GlobalBatchSampler's length,
    steps and resumption, another order. Everything follows from (seed, epoch, step), so a run resumed
    mid-epoch sees what an uninterrupted one would."""

    def __init__(self, shard_ranges, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0):
        self.ranges = [r if isinstance(r, range) else range(*r) for r in shard_ranges]
        length = sum(len(r) for r in self.ranges)
        if world > len(self.ranges) and not global_batch % world:  # an indivisible batch: GlobalBatchSampler says so
            raise DataError(f"{world} processes but {len(self.ranges)} shards: each process reads whole shards; "
                            f"write smaller ones (tinymim shards SRC --output DIR --shard-size N, N at most "
                            f"{max(1, length // world)})")
        super().__init__(length, global_batch, rank, world, seed)

    def assignment(self, epoch: int) -> list[list[int]]:
        """Per rank, the shards (positions in shard_ranges) it reads in `epoch`, in its shuffled order."""
        order = _rng(1, self.seed, epoch, 0).permutation(len(self.ranges)).tolist()
        loads, out = [0] * self.world, [[] for _ in range(self.world)]
        # largest first (a stable sort: equal shards keep the shuffled order), each to the least loaded rank
        for s in sorted(order, key=lambda s: -len(self.ranges[s])):
            r = min(range(self.world), key=lambda r: (loads[r], r))
            out[r].append(s)
            loads[r] += len(self.ranges[s])
        return out

    def __iter__(self):
        mine = self.assignment(self.epoch)[self.rank]
        indices = np.concatenate([np.arange(self.ranges[s].start, self.ranges[s].stop) for s in mine])
        # all of the rank's shards mixed: reads are preads by offset, locality within a shard buys nothing
        perm = _rng(2, self.seed, self.epoch, self.rank).permutation(indices).tolist()
        n, high = self.local_batch, ((self.seed * 100_003 + self.epoch) << 32)
        for step in range(self.start_step, self.steps_per_epoch):
            lo = step * n
            # sample seeds: unique per (epoch, global position), below 2**63 (torch.manual_seed takes them)
            first = step * self.global_batch + self.rank * n
            yield [(perm[p % len(perm)], (high | (first + j)) & (2**63 - 1)) for j, p in enumerate(range(lo, lo + n))]


def _rng(*key: int) -> np.random.Generator:
    """A stream per key: a tag, then the numbers (numpy's seeding ignores trailing zeros, [1] and [1, 0]
    give one stream, so every key has the same length and its own tag)."""
    return np.random.default_rng([k % 2**64 for k in key])


def worker_init(worker_id: int) -> None:
    """Loader workers leave stop signals to the main process: a scheduler signals every process of a
    job, and a worker that died of SIGTERM would end the run before its checkpoint is written."""
    import signal

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


def _end_leftover_workers() -> None:
    """At exit, loader workers still alive (an iterator nobody shut down) are killed: they ignore the
    SIGTERM that multiprocessing's own exit handler sends, and it would wait for them forever."""
    import multiprocessing

    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()
            p.join(1)


def _register_exit_handler() -> None:
    import atexit
    import multiprocessing.util  # noqa: F401 - its exit handler is registered first, so ours runs before it

    atexit.register(_end_leftover_workers)


_register_exit_handler()


def batch_sampler(source, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0):
    """The sampler for a source: whole shards per process for shards (ShardBatchSampler), GlobalBatchSampler
    for everything else (a subset of shards included)."""
    from tinymim.data.shards import ShardImages

    if isinstance(source, ShardImages):
        return ShardBatchSampler(source.shard_ranges, global_batch, rank, world, seed)
    return GlobalBatchSampler(len(source), global_batch, rank, world, seed)


def build_loader(cfg: DataConfig, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0,
                 pin_memory: bool = False) -> tuple[tud.DataLoader, GlobalBatchSampler]:
    source = build_source(cfg, seed)
    dataset = PairedViewDataset(source, cfg)
    sampler = batch_sampler(source, global_batch, rank, world, seed)
    # the loader gets its own generator: starting an iterator must not consume the global RNG
    # (drop path draws from it), or a run resumed mid-epoch would diverge from an uninterrupted one
    loader = tud.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate,
                            pin_memory=pin_memory, persistent_workers=False, worker_init_fn=worker_init,
                            generator=torch.Generator().manual_seed(seed),
                            prefetch_factor=4 if cfg.num_workers else None)
    return loader, sampler


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
    from torchvision.io import ImageReadMode, decode_jpeg

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
    loader workers decoded them, decoded and cropped here when they sent the files (decode: device)."""
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


def plain_view(batch: dict, cfg: DataConfig, device: torch.device) -> torch.Tensor:
    """The shared crop, normalized, as a float tensor on `device` (the teacher's view)."""
    return normalize(device_images(batch, cfg, device), cfg.mean, cfg.std)


def paired_views(batch: dict, cfg: DataConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher view, student view) as normalized float tensors on `device`."""
    x = device_images(batch, cfg, device)
    teacher = normalize(x, cfg.mean, cfg.std)
    student = x
    if cfg.color_jitter > 0:
        student = color_jitter(x, batch["jitter"].to(device), batch["jitter_order"].to(device))
    return teacher, normalize(student, cfg.mean, cfg.std)
