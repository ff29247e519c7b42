"""The loader workers' half of pre-training's views: `random_resized_crop_params` (the crop drawn from a
per-sample stream), `load_or_substitute` (an unreadable image replaced by the next readable one),
`PairedViewDataset` (per sample the shared crop, its flip and the student's jitter factors; with
data.decode=device the encoded file and its crop box instead; with data.jpeg_draft a JPEG decoded at
a reduced scale when its crop allows, `draft_scale`) and `collate`, which batches them."""
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

from tinymim.core.errors import DataError, StorageError
from tinymim.data.images import open_header, to_rgb8
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


DRAFT_SCALES = (8, 4, 2)  # the reductions libjpeg decodes at directly (its DCT scaling), largest first


def draft_scale(crop_h: int, crop_w: int, size: int) -> int:
    """The largest JPEG reduction (8, 4 or 2; 1: none) at which a crop of crop_h x crop_w pixels still
    has at least `size` pixels a side: decoding at it and resizing the scaled crop to size x size never
    upsamples what the full decode would have downsampled."""
    for scale in DRAFT_SCALES:
        if min(crop_h, crop_w) >= size * scale:
            return scale
    return 1


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
        except (StorageError, *fatal):  # a full or read-only cache: the next image cannot be stored either
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
        self.drafted = cfg.jpeg_draft and reads_encoded(source)

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
        if self.drafted:
            view, label, skipped = load_or_substitute(DraftedViews(self, sample_seed), index, self.length)
            return (*view, label, skipped)
        img, label, skipped = load_or_substitute(self.source, index, self.length)
        return (*self.view(img, self.draw(random.Random(sample_seed), img.width, img.height)), label, skipped)

    def view(self, img: Image.Image, draws):
        """(uint8 crop, jitter factors, jitter order) of a decoded RGB image and its draws: the crop
        (RandomResizedCrop's box, bicubic), flipped when drawn so."""
        (top, left, h, w), flip, factors, order = draws
        s = self.cfg.img_size
        img = TF.resized_crop(img, top, left, h, w, [s, s], InterpolationMode.BICUBIC)
        if flip:
            img = TF.hflip(img)
        return TF.pil_to_tensor(img), factors, order

    def drafted_view(self, data: bytes, sample_seed: int):
        """`view` of an encoded file: a JPEG decoded at the largest reduction its crop allows
        (draft_scale), the crop box scaled to the reduced image (fractional edges kept) and resized
        from there in one pass; exactly `view` of the whole decode when no reduction applies or the
        file is not a JPEG."""
        img = open_header(io.BytesIO(data))
        try:
            width, height = img.size
            draws = self.draw(random.Random(sample_seed), width, height)
            (top, left, h, w), flip, factors, order = draws
            s = self.cfg.img_size
            scale = draft_scale(h, w, s) if img.format == "JPEG" else 1
            drafted = img.draft(img.mode, (width // scale, height // scale)) if scale > 1 else None
            if drafted is None:  # decoded whole: the view without jpeg_draft, pixel for pixel
                img.load()
                return self.view(to_rgb8(img), draws)
            _, (_, _, reduced_w, reduced_h) = drafted  # the original's extent in the reduced image
            fx, fy = reduced_w / width, reduced_h / height
            img.load()
            rgb = img if img.mode == "RGB" else to_rgb8(img)
            out = rgb.resize((s, s), Image.BICUBIC, box=(left * fx, top * fy, (left + w) * fx, (top + h) * fy))
            if flip:
                out = out.transpose(Image.FLIP_LEFT_RIGHT)
            return TF.pil_to_tensor(out), factors, order
        finally:
            img.close()

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


class DraftedViews:
    """A source for load_or_substitute whose images are finished views (PairedViewDataset.drafted_view
    with the sample's seed): a file that fails anywhere in it is replaced by the next, as a whole decode
    would be."""

    def __init__(self, dataset: PairedViewDataset, sample_seed: int):
        self.dataset, self.sample_seed = dataset, sample_seed

    def load(self, i: int):
        data, label = self.dataset.source.read_bytes(i)
        return self.dataset.drafted_view(data, self.sample_seed), label

    def describe(self, i: int) -> str:
        return self.dataset.source.describe(i)


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
