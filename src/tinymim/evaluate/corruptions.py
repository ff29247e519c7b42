"""ImageNet-C style corruptions (ImageNet-C parameters; spatial ones scaled from 224px to the image size):
`corrupt_folder` writes a corruption tree `root/<corruption>/<severity 1-5>/<class>/<image>` from any
ImageFolder (8 of the 15 corruptions, those that need nothing beyond numpy and Pillow), so CIFAR-10-C-style
checks run anywhere; `tinymim eval` scores a model on such a tree (evaluate/robustness.py).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from tinymim.core.errors import TinymimError
from tinymim.data.images import to_rgb8
from tinymim.data.sources import FolderImages


def _gaussian_noise(x, s, rng, size):
    c = [0.08, 0.12, 0.18, 0.26, 0.38][s - 1]
    return x + rng.normal(scale=c, size=x.shape)


def _shot_noise(x, s, rng, size):
    c = [60, 25, 12, 5, 3][s - 1]
    return rng.poisson(x * c) / c


def _impulse_noise(x, s, rng, size):
    c = [0.03, 0.06, 0.09, 0.17, 0.27][s - 1]
    x = x.copy()
    hit = rng.random(x.shape[:2]) < c
    salt = rng.random(x.shape[:2]) < 0.5
    x[hit & salt], x[hit & ~salt] = 1.0, 0.0
    return x


def _defocus_blur(x, s, rng, size):
    radius = [3, 4, 6, 8, 10][s - 1] * size / 224
    img = Image.fromarray((x * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius / 2))
    return np.asarray(img, dtype=np.float64) / 255


def _brightness(x, s, rng, size):
    c = [0.1, 0.2, 0.3, 0.4, 0.5][s - 1]
    hsv = np.asarray(Image.fromarray((x * 255).astype(np.uint8)).convert("HSV"), dtype=np.float64) / 255
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return np.asarray(Image.fromarray((hsv * 255).astype(np.uint8), "HSV").convert("RGB"), dtype=np.float64) / 255


def _contrast(x, s, rng, size):
    c = [0.4, 0.3, 0.2, 0.1, 0.05][s - 1]
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * c + means


def _pixelate(x, s, rng, size):
    c = [0.6, 0.5, 0.4, 0.3, 0.25][s - 1]
    img = Image.fromarray((x * 255).astype(np.uint8))
    w, h = img.size
    img = img.resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX).resize((w, h), Image.BOX)
    return np.asarray(img, dtype=np.float64) / 255


def _jpeg_compression(x, s, rng, size):
    quality = [25, 18, 15, 10, 7][s - 1]
    buf = io.BytesIO()
    Image.fromarray((x * 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.float64) / 255


CORRUPTIONS = {f.__name__[1:]: f for f in (_gaussian_noise, _shot_noise, _impulse_noise, _defocus_blur, _brightness,
                                           _contrast, _pixelate, _jpeg_compression)}


def corrupt_image(img: Image.Image, corruption: str, severity: int, seed: int = 0) -> Image.Image:
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; available: {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1..5, got {severity}")
    x = np.asarray(to_rgb8(img), dtype=np.float64) / 255
    y = CORRUPTIONS[corruption](x, severity, np.random.default_rng(seed), min(img.size))
    return Image.fromarray((np.clip(y, 0, 1) * 255).round().astype(np.uint8))


def corrupt_folder(src: str | Path, dst: str | Path, corruptions=None, severities=(1, 2, 3, 4, 5),
                   limit_per_class: int | None = None) -> int:
    """Write dst/<corruption>/<severity>/<class>/<image>.png from the ImageFolder src; returns images written."""
    corruptions = list(corruptions or CORRUPTIONS)
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise TinymimError(f"unknown corruption(s) {', '.join(unknown)}; available: {', '.join(CORRUPTIONS)}")
    if not all(1 <= s <= 5 for s in severities):
        raise TinymimError(f"severities must be 1..5, got {list(severities)}")
    if limit_per_class is not None and limit_per_class < 1:
        raise TinymimError(f"--per-class must be positive, got {limit_per_class}")
    source = FolderImages(src)
    per_class: dict[int, int] = {}
    chosen = []
    for i, (path, label) in enumerate(source.samples):
        if limit_per_class is None or per_class.get(label, 0) < limit_per_class:
            per_class[label] = per_class.get(label, 0) + 1
            chosen.append(i)
    written = 0
    for i in chosen:
        img, label = source.load(i)
        name = Path(source.samples[i][0]).stem + ".png"
        for c in corruptions:
            for s in severities:
                out = Path(dst) / c / str(s) / source.classes[label] / name
                out.parent.mkdir(parents=True, exist_ok=True)
                corrupt_image(img, c, s, seed=i * 31 + s).save(out)
                written += 1
    return written
