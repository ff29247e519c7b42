"""Semantic segmentation data: `root/images/<split>/<name>.jpg|png` with `root/annotations/<split>/<name>.png`
label maps, the layout of ADE20K (`training` / `validation`, label 0 = "other", ignored, the rest shifted
down by one: `reduce_zero_label`) and of ../shared/data/camvid (`train` / `val` / `test`, 11 classes,
label 11 ignored).

Bad data is named, file by file: an image without a label map, a label map whose size differs from its
image, a label value that is neither a class nor the ignore label.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tinymim.data import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# the datasets tinymim knows by name: classes and a colour palette for reports and pictures
CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
                  "pedestrian", "bicyclist"]
CAMVID_PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]


@dataclass
class SegmentationDataConfig:
    root: str | None = None  # the folder holding images/ and annotations/
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
        root = Path(cfg.root or "")
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
        image = Image.open(self.images[i]).convert("RGB")
        raw = np.asarray(Image.open(self.labels[i]), dtype=np.int64)
        if raw.ndim != 2:
            raise DataError(f"{self.labels[i]} is not a label map (one value per pixel): it has {raw.shape[2]} "
                            "channels; save class indices as an 8-bit single-channel PNG")
        if raw.shape != (image.height, image.width):
            raise DataError(f"{self.labels[i]} is {raw.shape[1]}x{raw.shape[0]}, its image {self.images[i].name} "
                            f"{image.width}x{image.height}: a label map must match its image pixel for pixel")
        label = raw
        if self.cfg.reduce_zero_label:  # ADE20K: 0 ("other") ignored, 1..150 -> 0..149
            label = np.where(raw == 0, self.cfg.ignore_index, raw - 1)
        bad = np.unique(label[(label != self.cfg.ignore_index) & ((label < 0) | (label >= self.cfg.num_classes))])
        if bad.size:
            raise DataError(f"{self.labels[i]} holds label value(s) {', '.join(map(str, bad[:5].tolist()))}, neither "
                            f"a class (0..{self.cfg.num_classes - 1}) nor the ignore label {self.cfg.ignore_index}; "
                            "check num_classes, ignore_index and reduce_zero_label")
        return image, label

    def describe(self, i: int) -> str:
        return str(self.images[i])
