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
corruption and severity in CorruptedTree.problems, which `tinymim corrupt` prints. A source image that
cannot be read (damaged, truncated, or a possible decompression bomb: more pixels than
PIL.Image.MAX_IMAGE_PIXELS) is skipped and named in CorruptedTree.unreadable; when none can be read the
command refuses. The tree is written into a staging folder beside the output and moved in at the end, so
a failure (a full disk, an image too small for the reference) leaves the output as it was.
"""
from __future__ import annotations

import errno
import glob
import io
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tinymim.core.errors import TinymimError
from tinymim.data.images import to_rgb8
from tinymim.data.sources import FolderImages, data_root

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
    """What corrupt_folder wrote: how many images; the degenerate ones among them (constant or empty) as
    "corruption/severity" -> their paths under the tree, with the kind of each; and the source images it
    skipped as unreadable, as (path under the source, why)."""

    written: int = 0
    problems: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

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

    def unreadable_summary(self, limit: int = 5) -> str:
        """One line naming the skipped source images (the first `limit`) and why; '' when none."""
        if not self.unreadable:
            return ""
        named = "; ".join(f"{path} ({why})" for path, why in self.unreadable[:limit])
        more = f"; and {len(self.unreadable) - limit} more" if len(self.unreadable) > limit else ""
        return (f"{len(self.unreadable)} unreadable source images skipped, not in the tree: {named}{more}; "
                "replace or remove them and run again for a complete tree")


def _why_unreadable(e: Exception) -> str:
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"a possible decompression bomb, refused: {e}"
    return " ".join(str(e).split()) or type(e).__name__


def _write_refused(e: OSError, dst: Path) -> TinymimError:
    """The one-line error for a failed write of the staged tree beside `dst` (nothing of it is kept)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on its device"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "its file system is read-only" if e.errno == errno.EROFS else "permission denied"
    else:
        why = e.strerror or str(e)
    return TinymimError(f"cannot write the corruption tree beside {dst}: {why}; nothing was written to {dst} "
                        "(what was there is as it was): choose an --output folder with room that you can write to")


def _remove_stale_staging(dst: Path) -> None:
    """What an earlier corrupt_folder into `dst` left when it was killed: its staging folder (removed),
    and an existing tree it was swapping out at that instant (put back when `dst` is missing)."""
    for old in sorted(dst.parent.glob(f".{glob.escape(dst.name)}.*-*")):
        kind, _, pid = old.name[len(dst.name) + 2:].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its process still runs
        except ProcessLookupError:
            pass
        except OSError:
            continue  # alive under another user
        if kind == "old" and not dst.exists():
            os.rename(old, dst)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _move_in(staging: Path, dst: Path) -> None:
    """The staged tree becomes `dst`. When `dst` is absent or empty: one rename. Into an existing tree: its
    files that the staged tree does not replace join it first (hard links, no copies), then the two
    folders swap by two renames in one folder, so the tree is whole before and after."""
    try:
        os.rename(staging, dst)  # atomic; replaces an empty folder
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    for folder, dirs, files in os.walk(dst):  # symlinks to folders are listed in dirs, not followed
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = Path(folder) / name
            target = staging / path.relative_to(dst)
            if target.exists() or target.is_symlink():
                continue  # written anew
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink():
                os.symlink(os.readlink(path), target)
            else:
                try:
                    os.link(path, target)
                except OSError:
                    shutil.copy2(path, target)  # a file system without hard links
        staged = staging / Path(folder).relative_to(dst)
        if staged.is_dir():
            shutil.copymode(folder, staged)  # a shared tree's folders keep their modes (group-writable ...)
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    os.rename(dst, old)
    try:
        os.rename(staging, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def corrupt_folder(src: str | Path, dst: str | Path, corruptions=None, severities=(1, 2, 3, 4, 5),
                   limit_per_class: int | None = None) -> CorruptedTree:
    """Write dst/<corruption>/<severity>/<class>/<image>.png from the ImageFolder src (or a tar of one);
    returns how many were written, which came out constant or empty, and which source images were skipped
    as unreadable (refused when none can be read).

    No partial output: the tree is written into a staging folder beside `dst` (`.NAME.partial-PID`,
    removed on failure, and by the next call when a kill left it) and moved in at the end (_move_in: a
    rename; into an existing tree, whose other files are kept, a swap of two folders). A failure (a full
    or read-only disk, an image too small for the reference, an interrupt) leaves `dst` as it was."""
    corruptions = list(corruptions or available())
    for c in corruptions:
        _check_name(c)
    if not all(1 <= s <= 5 for s in severities):
        raise TinymimError(f"severities must be 1..5, got {list(severities)}")
    if limit_per_class is not None and limit_per_class < 1:
        raise TinymimError(f"--per-class must be positive, got {limit_per_class}")
    source = FolderImages(data_root(str(src)))
    per_class: dict[int, int] = {}
    chosen = []
    for i, (path, label) in enumerate(source.samples):
        if limit_per_class is None or per_class.get(label, 0) < limit_per_class:
            per_class[label] = per_class.get(label, 0) + 1
            chosen.append(i)
    dst = Path(dst).absolute()
    if dst.is_symlink():  # a link to the folder: the tree goes where it points, the link stays
        dst = dst.resolve()
    if dst.exists() and not dst.is_dir():
        raise TinymimError(f"--output {dst} is a file; give a folder for the corruption tree")
    missing = [d for d in (dst.parent, *dst.parent.parents) if not d.exists()]
    staging = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    tree = CorruptedTree()
    try:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_staging(dst)
            staging.mkdir()
        except OSError as e:
            raise _write_refused(e, dst) from None
        for i in chosen:
            rel = os.path.relpath(source.samples[i][0], source.root)
            try:
                img, label = source.load(i)
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped and named
                tree.unreadable.append((rel, _why_unreadable(e)))
                continue
            name = Path(source.samples[i][0]).stem + ".png"
            for c in corruptions:
                for s in severities:
                    where = f"{c}/{s}/{source.classes[label]}/{name}"
                    corrupted = corrupt_image(img, c, s, seed=i * 31 + s)
                    try:
                        (staging / where).parent.mkdir(parents=True, exist_ok=True)
                        corrupted.save(staging / where)
                    except OSError as e:
                        raise _write_refused(e, dst) from None
                    tree.written += 1
                    kind = degenerate(corrupted)
                    if kind:
                        tree.problems.setdefault(f"{c} severity {s}", []).append((where, kind))
        if chosen and not tree.written:
            path, why = tree.unreadable[0]
            raise TinymimError(f"none of the {len(chosen)} source images in {src} can be read (e.g. {path}: {why}); "
                               "nothing was written: check the source folder")
        try:
            _move_in(staging, dst)
        except OSError as e:
            raise _write_refused(e, dst) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for d in missing:  # the parents this call made, deepest first, if still empty
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return tree
