"""Semantic segmentation data: `root/images/<split>/<name>.jpg|png` with `root/annotations/<split>/<name>.png`
label maps, the layout of ADE20K (`training` / `validation`, label 0 = "other", ignored, the rest shifted
down by one: `reduce_zero_label`) and of ../shared/data/camvid (`train` / `val` / `test`, 11 classes,
label 11 ignored).

Bad data is named, file by file: an image without a label map, a label map whose size differs from its
image, a label value that is neither a class nor the ignore label.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tinymim.core.errors import DataError
from tinymim.data.images import decode_image, open_decoded
from tinymim.data.sources import data_root
from tinymim.data.view_dataset import load_or_substitute

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# the datasets tinymim knows by name: classes and a colour palette for reports and pictures
CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
                  "pedestrian", "bicyclist"]
# ADE20K's 150 benchmark classes (SceneParsing), in label order 1..150 (0..149 after reduce_zero_label)
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag"]
CAMVID_PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]


@dataclass
class SegmentationDataConfig:
    root: str | None = None  # the folder holding images/ and annotations/, or a tar of it (camvid.tar)
    train_split: str = "train"  # images/<train_split>: training images (ADE20K: training)
    val_split: str = "val"  # images/<val_split>: evaluation images (ADE20K: validation)
    num_classes: int = 11  # classes after reduce_zero_label (ADE20K: 150, CamVid: 11)
    ignore_index: int = 255  # label value left out of the loss and the metrics (CamVid: 11)
    reduce_zero_label: bool = False  # ADE20K: label 0 is ignored, the others shift down by one
    class_names: list[str] = field(default_factory=list)  # empty: "0", "1", ...


def _palette(n: int) -> list[tuple[int, int, int]]:
    """A fixed, distinguishable colour per class for datasets without their own palette."""
    rng = np.random.default_rng(3)
    return [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(n)]


class SegmentationFolder:
    """Image / label-map pairs of one split; load(i) -> (RGB PIL image, H x W int64 labels)."""

    def __init__(self, cfg: SegmentationDataConfig, split: str):
        self.cfg = cfg
        root = Path(data_root(cfg.root) or "")  # a tar archive of the folder is extracted once
        images, labels = root / "images" / split, root / "annotations" / split
        for folder in (images, labels):
            if not folder.is_dir():
                raise DataError(f"{folder} does not exist: segmentation data.root must hold images/{split}/ and "
                                f"annotations/{split}/")
        self.images = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise DataError(f"no images in {images} (looked for {', '.join(IMAGE_SUFFIXES)})")
        self.labels = [labels / (p.stem + ".png") for p in self.images]
        missing = [img for img, lab in zip(self.images, self.labels) if not lab.is_file()]
        if missing:
            raise DataError(f"{missing[0]} has no label map {labels / (missing[0].stem + '.png')}"
                            f"{f' (and {len(missing) - 1} more images)' if len(missing) > 1 else ''}; "
                            "add the label maps or remove those images")
        self.classes = list(cfg.class_names) or [str(i) for i in range(cfg.num_classes)]
        self.palette = CAMVID_PALETTE if self.classes == CAMVID_CLASSES else _palette(cfg.num_classes)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """Raises DataError for a label map that does not fit its image (the user's to fix), other
        exceptions for a file that cannot be read (a sample to skip)."""
        image = decode_image(self.images[i])
        return image, self.label(i, (image.height, image.width))

    def label(self, i: int, shape: tuple[int, int]) -> np.ndarray:
        """The i-th label map (class indices, the ignore label elsewhere), checked against its image's
        (height, width) and the classes; DataError when it does not fit."""
        raw = read_label_map(self.labels[i])
        if raw.ndim != 2:
            raise DataError(f"{self.labels[i]} is not a label map (one value per pixel): it has {raw.shape[2]} "
                            "channels; save class indices as an 8-bit single-channel PNG")
        if raw.shape != tuple(shape):
            raise DataError(f"{self.labels[i]} is {raw.shape[1]}x{raw.shape[0]}, its image {self.images[i].name} "
                            f"{shape[1]}x{shape[0]}: a label map must match its image pixel for pixel")
        label = raw
        if self.cfg.reduce_zero_label:  # ADE20K: 0 ("other") ignored, 1..150 -> 0..149
            label = np.where(raw == 0, self.cfg.ignore_index, raw - 1)
        bad = np.unique(label[(label != self.cfg.ignore_index) & ((label < 0) | (label >= self.cfg.num_classes))])
        if bad.size:
            raise DataError(f"{self.labels[i]} holds label value(s) {', '.join(map(str, bad[:5].tolist()))}, neither "
                            f"a class (0..{self.cfg.num_classes - 1}) nor the ignore label {self.cfg.ignore_index}; "
                            "check num_classes, ignore_index and reduce_zero_label")
        return label

    def check_labels(self) -> None:
        """Every label map read and checked now (the images only by their headers): a bad one in the
        evaluation split would otherwise stop the run after its first epoch had trained. Files that
        cannot be read at all are left to the loader, which skips them."""
        for i in range(len(self)):
            try:
                with Image.open(self.images[i]) as img:
                    shape = (img.height, img.width)
                self.label(i, shape)
            except DataError:
                raise
            except Exception:  # noqa: BLE001 - unreadable: skipped (and counted) when it is loaded
                continue

    def describe(self, i: int) -> str:
        return str(self.images[i])


def read_label_map(path: Path) -> np.ndarray:
    """The class indices of a label map as stored, int64: 8- or 16-bit gray, palette indices, mode I; never
    through to_rgb8, whose rescaling is for pictures. A float map must hold whole numbers."""
    raw = np.asarray(open_decoded(path))
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all() or (raw != np.round(raw)).any():
            raise DataError(f"{path} holds non-integer label values (a float image); save class indices as an "
                            "8- or 16-bit single-channel PNG")
    return raw.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# transforms (mmseg's training pipeline), seeded per sample, and loaders


@dataclass
class SegmentDataConfig(SegmentationDataConfig):
    """Segmentation data plus the release's augmentation and evaluation settings."""

    scale: list[int] = field(default_factory=lambda: [2048, 512])  # (long, short) sides images are resized to
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # training: random factor on `scale`
    crop_size: int = 512  # training crop (padded with the ignore label when the image is smaller)
    cat_max_ratio: float = 0.75  # a training crop may hold at most this share of one class (10 tries)
    hflip: bool = True  # random horizontal flip
    photometric: bool = True  # random brightness, contrast, saturation and hue, each with probability 0.5
    # hue shift range in OpenCV's hue units (0-179, 2 degrees each), mmseg's hue_delta: 18 = +-36 degrees
    hue_delta: int = 18
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # per-channel normalization mean
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])  # per-channel normalization std
    eval_mode: str = "slide"  # slide: windows of crop_size every eval_stride pixels; whole: the image at once
    eval_stride: int = 341  # sliding-window stride (the release: 341 for 512 windows)
    # images an evaluation pass infers together when they share a size (their windows batched too); the
    # release: 1. More is faster on small images, at the memory of that many images' logits
    eval_batch_size: int = 1
    num_workers: int = 4  # data-loading worker processes per training process


def _rescale_size(w: int, h: int, long: float, short: float) -> tuple[int, int]:
    """mmseg's keep-ratio resize: the largest size with long side <= long and short side <= short."""
    factor = min(long / max(w, h), short / min(w, h))
    return max(1, int(w * factor + 0.5)), max(1, int(h * factor + 0.5))


# OpenCV's 8-bit RGB <-> HSV (hue 0-179, 2 degrees a unit), the space mmseg's saturation and hue steps
# work in (mmcv.bgr2hsv / hsv2bgr): RGB -> HSV by OpenCV's fixed-point tables, HSV -> RGB in float32 and
# truncated, as OpenCV 4's vectorised loop computes every pixel of an image but a row's last few
_HSV_SHIFT = 12
_DIVISORS = np.maximum(np.arange(256, dtype=np.float64), 1)
_SDIV = np.where(np.arange(256) > 0, np.rint((255 << _HSV_SHIFT) / _DIVISORS), 0).astype(np.int64)
_HDIV = np.where(np.arange(256) > 0, np.rint((180 << _HSV_SHIFT) / (6 * _DIVISORS)), 0).astype(np.int64)
_SECTORS = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])  # r, g, b of (v, p, q, t)


def rgb_to_hsv_cv(rgb: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(rgb, COLOR_RGB2HSV) for uint8 images."""
    x = rgb.astype(np.int64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v, diff = x.max(-1), x.max(-1) - x.min(-1)
    s = (diff * _SDIV[v] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    return np.stack([np.where(h < 0, h + 180, h), s, v], -1).astype(np.uint8)


def hsv_to_rgb_cv(hsv: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(hsv, COLOR_HSV2RGB) for uint8 images (hue 0-179), its vectorised loop's arithmetic."""
    one = np.float32(1)
    s = hsv[..., 1].astype(np.float32) * np.float32(1 / 255)
    v = hsv[..., 2].astype(np.float32) * np.float32(1 / 255)
    h = hsv[..., 0].astype(np.float32) * np.float32(6 / 180)
    whole = np.trunc(h)
    f = h - whole
    def one_minus(a, b):  # 1 - a*b rounded once: the fused multiply-add OpenCV's x86 builds compile it to
        return (1 - a.astype(np.float64) * b).astype(np.float32)

    table = np.stack([v, v * (one - s), v * one_minus(s, f), v * one_minus(s, one - f)], -1)  # v, p, q, t
    rgb = np.take_along_axis(table, _SECTORS[whole.astype(np.int64) % 6], -1)
    return np.clip(np.trunc(rgb * np.float32(255)), 0, 255).astype(np.uint8)


def _photometric(img: np.ndarray, rng: np.random.Generator, hue_delta: int = 18) -> np.ndarray:
    """mmseg 0.x's PhotoMetricDistortion, step by step and draw by draw: brightness +-32; a coin for
    whether contrast (0.5-1.5) comes now or last; saturation 0.5-1.5; hue by an integer in
    [-hue_delta, hue_delta) OpenCV units (0-179, 2 degrees each: mmseg's 18 is -36..+34 degrees); each
    step taken with probability 0.5. Every step ends in 8 bits as mmseg's `convert` does (x * alpha + beta
    in float32, clipped to 0..255, truncated to uint8): a brightened pixel is clipped before contrast
    scales it. Saturation and hue each make their own round trip through OpenCV's 8-bit HSV, as mmseg's do."""
    def convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(x.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)

    def contrast(x: np.ndarray) -> np.ndarray:
        return convert(x, alpha=rng.uniform(0.5, 1.5)) if rng.random() < 0.5 else x

    x = np.ascontiguousarray(img, dtype=np.uint8)
    if rng.random() < 0.5:  # brightness
        x = convert(x, beta=rng.uniform(-32, 32))
    contrast_first = rng.random() < 0.5  # mmseg's mode == 1
    if contrast_first:
        x = contrast(x)
    if rng.random() < 0.5:  # saturation
        hsv = rgb_to_hsv_cv(x)
        hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        x = hsv_to_rgb_cv(hsv)
    if rng.random() < 0.5:  # hue
        hsv = rgb_to_hsv_cv(x)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + int(rng.integers(-hue_delta, hue_delta))) % 180
        x = hsv_to_rgb_cv(hsv)
    if not contrast_first:
        x = contrast(x)
    return x


def train_transform(image: Image.Image, label: np.ndarray, cfg: SegmentDataConfig, seed: int):
    """(3 x crop x crop float image, crop x crop int64 labels): random rescale, a crop with at most
    cat_max_ratio of one class, flip, photometric distortion, normalization, padding."""
    rng = np.random.default_rng(seed)
    ratio = rng.uniform(*cfg.ratio_range)
    w, h = _rescale_size(image.width, image.height, cfg.scale[0] * ratio, cfg.scale[1] * ratio)
    image = image.resize((w, h), Image.BILINEAR)
    label = np.asarray(Image.fromarray(label.astype(np.int32)).resize((w, h), Image.NEAREST), dtype=np.int64)
    c = cfg.crop_size
    for _ in range(10):
        y, x = int(rng.integers(0, max(h - c, 0) + 1)), int(rng.integers(0, max(w - c, 0) + 1))
        crop = label[y:y + c, x:x + c]
        _, counts = np.unique(crop[crop != cfg.ignore_index], return_counts=True)
        if len(counts) > 1 and counts.max() / counts.sum() < cfg.cat_max_ratio:
            break
    img = np.asarray(image, dtype=np.uint8)[y:y + c, x:x + c]
    label = label[y:y + c, x:x + c]
    if cfg.hflip and rng.random() < 0.5:
        img, label = img[:, ::-1], label[:, ::-1]
    if cfg.photometric:
        img = _photometric(np.ascontiguousarray(img), rng, cfg.hue_delta)
    return _pad(_normalize(img, cfg), label, c, cfg.ignore_index)


def _normalize(img: np.ndarray, cfg: SegmentDataConfig):
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
    return (x - torch.tensor(cfg.mean).view(3, 1, 1)) / torch.tensor(cfg.std).view(3, 1, 1)


def _pad(x, label: np.ndarray, size: int, ignore: int):
    h, w = label.shape
    image = torch.zeros(3, max(h, size), max(w, size))
    image[:, :h, :w] = x
    target = torch.full((max(h, size), max(w, size)), ignore, dtype=torch.int64)
    target[:h, :w] = torch.from_numpy(np.ascontiguousarray(label))
    return image, target


def eval_transform(image: Image.Image, cfg: SegmentDataConfig):
    """The image resized to `scale` (keep ratio) and normalized; labels stay at their own size."""
    w, h = _rescale_size(image.width, image.height, *cfg.scale)
    return _normalize(np.asarray(image.resize((w, h), Image.BILINEAR), dtype=np.uint8), cfg)


class SegmentationDataset:
    """Indexed by (index, sample_seed) for training (GlobalBatchSampler), by index for evaluation."""

    def __init__(self, folder: SegmentationFolder, cfg: SegmentDataConfig, train: bool):
        self.folder, self.cfg, self.train = folder, cfg, train
        self.source = folder  # what data_fingerprint reads

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, 0)
        if self.train:  # an unreadable pair: the next readable one, counted (a bad label map stops the run)
            image, label, skipped = load_or_substitute(self.folder, index, len(self.folder), fatal=(DataError,))
            x, y = train_transform(image, label, self.cfg, seed)
            return {"image": x, "label": y, "skipped": skipped}
        try:
            image, label = self.folder.load(index)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - evaluation leaves an unreadable pair out
            log.warning("skipping unreadable image %s: %s", self.folder.describe(index), e)
            # a blank crop whose every pixel is the ignore label: it adds nothing to the metrics
            c = self.cfg.crop_size
            return {"image": torch.zeros(3, c, c), "label": torch.full((c, c), self.cfg.ignore_index), "skipped": 1}
        return {"image": eval_transform(image, self.cfg), "label": torch.from_numpy(np.array(label)), "skipped": 0}


def collate_segment(samples: list[dict]) -> dict:
    return {"image": torch.stack([s["image"] for s in samples]), "label": torch.stack([s["label"] for s in samples]),
            "skipped": sum(s["skipped"] for s in samples)}


def collate_segment_eval(samples: list[dict]) -> list[dict]:
    """Evaluation batches (labels at their images' own sizes): one batch when every image and label map
    shares its size, else one batch an image."""
    if len({(s["image"].shape, s["label"].shape) for s in samples}) == 1:
        return [collate_segment(samples)]
    return [collate_segment([s]) for s in samples]
