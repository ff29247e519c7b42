"""The loader workers' half of pre-training's views: `random_resized_crop_params` (the crop drawn from a
per-sample stream), `load_or_substitute` (an unreadable image replaced by the next readable one),
`PairedViewDataset` (per sample the shared crop, its flip and the student's jitter factors; with
data.decode=device the encoded file and its crop box instead) and `collate`, which batches them."""
from __future__ import annotations

import io
import logging
import math
import random
import warnings

import torch
import torch.utils.data as tud
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from tinymim.core.errors import DataError
from tinymim.data.pretrain import DataConfig
from tinymim.data.sources import SubsetImages

log = logging.getLogger(__name__)


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
