"""Pre-training's image sources: an ImageFolder tree (`list_folder`, `FolderImages`), torchvision's CIFAR,
procedural synthetic images, a fixed random subset or held-out split of any of them, `build_source` (the
source a DataConfig names) and `data_fingerprint` (what identifies a run's training data, wherever it is
mounted). Each source returns a PIL image and an integer label for an index, or raises. A data root may
be a tar archive of such a folder (`data_root`: extracted once into a cache)."""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import shutil
import tarfile
import uuid
from pathlib import Path

import numpy as np
import torch.utils.data as tud
from PIL import Image
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS

from tinymim.core.errors import DataError
from tinymim.data.image_files import ImageFiles
from tinymim.data.images import decode_image
from tinymim.data.pretrain import DataConfig
from tinymim.data.shards import ShardImages

log = logging.getLogger("tinymim")

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def is_tar(root: str | Path | None) -> bool:
    """Whether a data root names a tar archive (a file with a tar suffix) rather than a folder."""
    return root is not None and str(root).lower().endswith(TAR_SUFFIXES) and Path(root).is_file()


def tar_cache() -> Path:
    """Where tar roots are extracted: $TINYMIM_CACHE/tars, else ~/.cache/tinymim/tars."""
    return Path(os.environ.get("TINYMIM_CACHE") or Path.home() / ".cache" / "tinymim").expanduser() / "tars"


def _inner_folder(folder: Path) -> Path:
    """The data folder an extracted archive holds: its one top folder when that holds folders itself
    (train.tar -> train/<class>/..., camvid.tar -> camvid/images/...), else the archive's top."""
    entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and any(e.is_dir() for e in entries[0].iterdir()):
        return entries[0]
    return folder


def data_root(root: str | None) -> str | None:
    """A data root as a folder: `root` itself, or for a tar archive (train.tar holding train/<class>/*.jpg,
    as the demo takes; camvid.tar holding camvid/images/...) the folder it holds, extracted once into
    tar_cache() (keyed by the archive's path, size and modification time; read-only archives are fine).
    Several processes may extract the same archive at once: each into its own temporary folder, the first
    rename wins."""
    if root is None or not str(root).lower().endswith(TAR_SUFFIXES) or Path(root).is_dir():
        return root
    path = Path(root)
    if not path.is_file():
        raise DataError(f"data root {root} does not exist; give an ImageFolder, or a tar archive of one "
                        "(such as CIFAR-10's train.tar)")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = path.name[:-len(next(s for s in TAR_SUFFIXES if path.name.lower().endswith(s)))]
    cache = tar_cache()
    dest = cache / f"{stem}-{key}"
    if not dest.is_dir():
        tmp = cache / f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        log.info("extracting %s into %s (once; later runs reuse it)", path, dest)
        try:
            tmp.mkdir(parents=True)
            with tarfile.open(path) as tar:
                tar.extractall(tmp, filter="data")  # no absolute paths, no links out of the folder
        except (tarfile.TarError, OSError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, tarfile.TarError):
                raise DataError(f"data root {root} is not a readable tar archive; give an ImageFolder or a tar of "
                                "one") from None
            raise DataError(f"data root {root} could not be extracted into {cache} ({e.strerror or e}); set "
                            "TINYMIM_CACHE to a folder with room that can be written") from None
        try:
            os.rename(tmp, dest)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not dest.is_dir():  # not another process's extraction that won
                raise
    return str(_inner_folder(dest))


def list_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, (path, label) per image) of an ImageFolder tree root/<class>/<image>: the one listing
    that reading a folder and `tinymim shards` use. torchvision's make_dataset order and paths (class,
    folder path, file name; paths as found under root). Symlinks are followed, but each file is taken once
    by its real path, and a link back into the tree (a loop, or another class's images under this class)
    or in a loop outside it is refused, as is a class folder without images (it would shift the labels)."""
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
    if isinstance(source, ImageFiles):
        return source.listing()
    if isinstance(source, ShardImages):  # its shards and sample keys: the same wherever it is served from
        return source.listing()
    return None


def data_fingerprint(dataset) -> dict:
    """What identifies a run's training data, wherever it is mounted: the number of images, the
    class count and a hash of the class names and of the images' paths relative to the root."""
    source = getattr(dataset, "source", dataset)
    classes = list(getattr(source, "classes", None) or [])
    listing = _listing(source)
    out = {"images": len(dataset), "classes": len(classes)}
    if listing is not None:
        out["sha256"] = hashlib.sha256("\n".join([*classes, "--", *listing]).encode()).hexdigest()
    return out


def build_source(cfg: DataConfig, seed: int = 0):
    # a tar root is a folder of images, whatever the name (data.name=cifar10 data.root=PATH/train.tar)
    if cfg.name == "folder" or (cfg.name in ("cifar10", "cifar100") and is_tar(cfg.root)):
        src = FolderImages(data_root(cfg.root))
    elif cfg.name == "shards":
        src = ShardImages(cfg.root, cache=cfg.shard_cache)
    elif cfg.name == "images":
        src = ImageFiles(cfg.root)
    elif cfg.name in ("cifar10", "cifar100"):
        src = TorchvisionCIFAR(cfg.name, cfg.root)
    else:
        src = SyntheticImages(cfg.synthetic_size, cfg.img_size, cfg.synthetic_classes, seed)
    return SubsetImages(src, cfg.subset) if cfg.subset is not None else src
