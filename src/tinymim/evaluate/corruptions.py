"""ImageNet-C corruptions: `corrupt_folder` writes a corruption tree `root/<corruption>/<severity 1-5>/<class>/
<image>` from any ImageFolder, and `tinymim eval` scores a model on it (evaluate/robustness.py; mCE over
the 15 of ImageNet-C, normalized by AlexNet's errors).

With the `corruptions` extra (`pip install 'tinymim[corruptions]'`: the maintained imagecorruptions-imaug
package, Hendrycks & Dietterich's reference definitions) every ImageNet-C corruption is there, plus the
four validation ones (speckle_noise, gaussian_blur, spatter, saturate), each seeded per image. Without
it, the six that tinymim writes itself to the same definitions with numpy and Pillow (noise, contrast,
pixelate, JPEG; spatial sizes scaled from 224px to the image's) still work, and the others say how to
get them.

`corrupt_folder` checks every image it writes: one of a single colour (the reference's spatter divides
by zero on some small images and writes them all black) or with no pixels is counted and named by
corruption and severity in CorruptedTree.problems, which `tinymim corrupt` prints.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tinymim.core.errors import TinymimError
from tinymim.data.images import to_rgb8
from tinymim.data.sources import FolderImages

IMAGENET_C = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
              "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
              "jpeg_compression")
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")  # ImageNet-C's validation corruptions
_SEEDED_BY_ARGUMENT = ("impulse_noise", "glass_blur")  # they draw from their own generators, seeded by `seed=`


def reference():
    """The imagecorruptions package, or None when the extra is not installed."""
    try:
        import imagecorruptions  # lazy: optional dependency (tinymim[corruptions]), slow to import (numba)
    except ImportError:
        return None
    return imagecorruptions


def _gaussian_noise(x, s, rng, size):
    c = [0.08, 0.12, 0.18, 0.26, 0.38][s - 1]
    return x + rng.normal(scale=c, size=x.shape)


def _shot_noise(x, s, rng, size):
    c = [60, 25, 12, 5, 3][s - 1]
    return rng.poisson(x * c) / c


def _impulse_noise(x, s, rng, size):
    c = [0.03, 0.06, 0.09, 0.17, 0.27][s - 1]
    x = x.copy()
    hit = rng.random(x.shape) < c  # per value, as skimage's s&p noise (the reference) draws it
    salt = rng.random(x.shape) < 0.5
    x[hit & salt], x[hit & ~salt] = 1.0, 0.0
    return x


def _contrast(x, s, rng, size):
    c = [0.4, 0.3, 0.2, 0.1, 0.05][s - 1]
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * c + means


def _pixelate(x, s, rng, size):
    c = [0.6, 0.5, 0.4, 0.3, 0.25][s - 1]
    img = Image.fromarray((x * 255).astype(np.uint8))
    w, h = img.size
    img = img.resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX).resize((w, h), Image.NEAREST)
    return np.asarray(img, dtype=np.float64) / 255


def _jpeg_compression(x, s, rng, size):
    quality = [25, 18, 15, 10, 7][s - 1]
    buf = io.BytesIO()
    Image.fromarray((x * 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.float64) / 255


BUILTIN = {f.__name__[1:]: f for f in (_gaussian_noise, _shot_noise, _impulse_noise, _contrast, _pixelate,
                                       _jpeg_compression)}


def available() -> list[str]:
    """The corruptions this installation writes: all 19 with the extra, else the built-in six."""
    return [*IMAGENET_C, *EXTRA] if reference() is not None else list(BUILTIN)


def _check_name(corruption: str) -> None:
    if corruption in available():
        return
    if corruption in IMAGENET_C + EXTRA:
        raise TinymimError(f"the {corruption} corruption needs the reference definitions: pip install "
                           f"'tinymim[corruptions]' (built in without it: {', '.join(BUILTIN)})")
    raise TinymimError(f"unknown corruption {corruption!r}; available: {', '.join(available())}")


def corrupt_image(img: Image.Image, corruption: str, severity: int, seed: int = 0) -> Image.Image:
    """`img` (any Pillow mode) corrupted at `severity` 1..5, the same for the same seed."""
    _check_name(corruption)
    if not 1 <= severity <= 5:
        raise TinymimError(f"severity must be 1..5, got {severity}")
    ref = reference()
    if ref is None:
        x = np.asarray(to_rgb8(img), dtype=np.float64) / 255
        y = BUILTIN[corruption](x, severity, np.random.default_rng(seed), min(img.size))
        return Image.fromarray((np.clip(y, 0, 1) * 255).round().astype(np.uint8))
    x = np.asarray(to_rgb8(img))
    if min(x.shape[:2]) < 32:
        raise TinymimError(f"an image of {x.shape[1]}x{x.shape[0]} px is too small for the ImageNet-C definitions "
                           "(at least 32 px a side); resize the source images first")
    state = np.random.get_state()  # the reference draws from numpy's global generator: seeded, then restored
    try:
        np.random.seed(seed % 2**32)
        kwargs = {"seed": seed} if corruption in _SEEDED_BY_ARGUMENT else {}
        # its 0/0 on some images (spatter) is a warning per image; corrupt_folder counts the result instead
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            return Image.fromarray(ref.corrupt(x, severity=severity, corruption_name=corruption, **kwargs))
    finally:
        np.random.set_state(state)


def degenerate(img: Image.Image) -> str | None:
    """'empty' for an image without pixels, 'constant' for one of a single colour, else None."""
    pixels = np.asarray(img)
    if pixels.size == 0:
        return "empty"
    flat = pixels.reshape(-1, pixels.shape[-1]) if pixels.ndim == 3 else pixels.reshape(-1, 1)
    return "constant" if (flat == flat[0]).all() else None


@dataclass
class CorruptedTree:
    """What corrupt_folder wrote: how many images, and the degenerate ones among them (constant or empty)
    as "corruption/severity" -> their paths under the tree, with the kind of each."""

    written: int = 0
    problems: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def summary(self) -> str:
        """One line naming each corruption and severity with constant or empty outputs; '' when none."""
        if not self.problems:
            return ""
        count = sum(len(v) for v in self.problems.values())
        parts = []
        for where, items in self.problems.items():
            kinds = sorted({kind for _, kind in items})
            parts.append(f"{where}: {len(items)} {'/'.join(kinds)} (e.g. {items[0][0]})")
        return (f"{count} of {self.written} written images are constant (one colour) or empty, useless for "
                f"scoring: {'; '.join(parts)}; leave those corruptions out (--corruptions) or check the source images")


def corrupt_folder(src: str | Path, dst: str | Path, corruptions=None, severities=(1, 2, 3, 4, 5),
                   limit_per_class: int | None = None) -> CorruptedTree:
    """Write dst/<corruption>/<severity>/<class>/<image>.png from the ImageFolder src; returns how many were
    written and which came out constant or empty."""
    corruptions = list(corruptions or available())
    for c in corruptions:
        _check_name(c)
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
    tree = CorruptedTree()
    for i in chosen:
        img, label = source.load(i)
        name = Path(source.samples[i][0]).stem + ".png"
        for c in corruptions:
            for s in severities:
                out = Path(dst) / c / str(s) / source.classes[label] / name
                out.parent.mkdir(parents=True, exist_ok=True)
                corrupted = corrupt_image(img, c, s, seed=i * 31 + s)
                corrupted.save(out)
                tree.written += 1
                kind = degenerate(corrupted)
                if kind:
                    tree.problems.setdefault(f"{c} severity {s}", []).append(
                        (f"{c}/{s}/{source.classes[label]}/{name}", kind))
    return tree
