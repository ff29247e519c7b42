"""Decoding: every image tinymim reads becomes 8-bit RGB here, whatever its mode, or fails in a way
the readers count as unreadable (a damaged file, a decompression bomb)."""
from __future__ import annotations

import logging
import warnings

import numpy as np
from PIL import Image


def to_rgb8(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of an image in any mode Pillow opens. Pillow's own convert("RGB") clips
    16-bit values at 255, which turns a 16-bit photo white; here each mode keeps its real range:
    - 16-bit integer (I;16, I;16L, I;16B, I;16N, and mode I with values in 0..65535, as 16-bit
      PNGs and TIFFs decode): 0..65535 -> 0..255, value >> 8; mode I outside 0..65535 is refused;
    - float (F): taken as 0..1 (x 255, rounded) when its maximum is at most 1, else as 0..255,
      clipped; NaN reads as 0;
    - with alpha (LA, PA, RGBA, P with a transparency entry): the alpha is dropped, colours
      kept as stored (not composited on a background);
    - 1, L, P, RGB, CMYK, YCbCr, LAB, HSV and the rest: Pillow's convert("RGB").
    Raises ValueError naming the mode when there is no conversion."""
    mode = img.mode
    if mode == "I" or mode.startswith("I;16"):
        a = np.asarray(img)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise ValueError(f"32-bit integer image (mode I) with values {int(a.min())}..{int(a.max())}, outside "
                             "16-bit 0..65535; save it as an 8- or 16-bit image")
        return Image.fromarray((a.astype(np.uint32) >> 8).astype(np.uint8)).convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.max() <= 1:
            a = a * 255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # through RGBA: Pillow warns on P -> RGB with transparency
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ValueError(f"image mode {mode} cannot be converted to RGB ({e}); save it as an RGB or "
                         "grayscale PNG/JPEG") from None


def open_header(fp) -> Image.Image:
    """Image.open(fp) (a path or a binary file object): the header parsed, nothing decoded yet (a JPEG
    may still be told to decode at a reduced scale, Image.draft). Raises when it has more than
    PIL.Image.MAX_IMAGE_PIXELS pixels: a possible decompression bomb (Pillow itself only warns up to
    twice that, and decoding one can exhaust memory)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below instead
        img = Image.open(fp)  # parses the header only
    limit, pixels = Image.MAX_IMAGE_PIXELS, img.width * img.height
    if limit and pixels > limit:
        img.close()
        raise Image.DecompressionBombError(f"Image size ({pixels} pixels) exceeds limit of {limit} pixels, "
                                           "could be decompression bomb DOS attack.")
    return img


def open_decoded(fp) -> Image.Image:
    """Image.open(fp) (a path or a binary file object), decoded as stored (no conversion). Raises,
    instead of returning a partial picture, when the file is unreadable, and when it is a possible
    decompression bomb (open_header)."""
    img = open_header(fp)
    try:
        img.load()  # decode now, so a corrupt file fails here
    except BaseException:
        img.close()
        raise
    return img


def decode_image(fp) -> Image.Image:
    """The image in `fp` (a path or a binary file object) as 8-bit RGB: open_decoded, then to_rgb8."""
    img = open_decoded(fp)
    try:
        return to_rgb8(img)  # always a new image
    finally:
        img.close()  # a multi-frame file (GIF, TIFF) stays open after load()


def warn_unreadable(skipped: int, readable) -> None:
    """One warning when unreadable images were left out of an evaluation's scores (each was named when
    it failed to decode): how many, and over how many readable ones the scores are."""
    if skipped:
        logging.getLogger("tinymim").warning(
            "%d unreadable images skipped (each named above): the scores are over the %s readable ones",
            skipped, readable)
