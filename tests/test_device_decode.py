"""`data.decode: device`: workers send JPEG files and crop boxes, the training device decodes, crops,
resizes and flips. Checked here on CPU tensors against the Pillow path (the default)."""
import logging
import math
import random

import numpy as np
import pytest
import torch
from conftest import tiny_distill_config
from PIL import Image

from tinymim.data.pretrain import DataConfig, device_images
from tinymim.data.sources import FolderImages
from tinymim.data.view_dataset import PairedViewDataset, collate, random_resized_crop_params


def natural_jpegs(root, per_class=6, size=(500, 375), seed=0):
    """ImageNet-like JPEGs (500x375, quality 90): a smooth random field plus grain, two classes."""
    rng = np.random.default_rng(seed)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            small = Image.fromarray(rng.uniform(0, 255, (9, 12, 3)).astype(np.uint8))
            arr = np.asarray(small.resize(size, Image.BICUBIC)).astype(np.float32)
            arr += rng.normal(0, 8, arr.shape)
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(root / c / f"{i}.jpg", quality=90)
    return root


def both_paths(root, **cfg):
    def dataset(decode):
        return PairedViewDataset(FolderImages(root), DataConfig(name="folder", root=str(root), decode=decode, **cfg))
    return dataset("cpu"), dataset("device")


def test_device_decode_gives_the_pillow_views(tmp_path):
    root = natural_jpegs(tmp_path)
    pillow, device = both_paths(root, img_size=64)
    items = [(i, 7_000 + i) for i in range(len(pillow))]
    a = collate([pillow[x] for x in items])
    b = collate([device[x] for x in items])
    assert "image" in a and "jpeg" in b and "image" not in b  # decoded by the worker vs sent as files
    # the same random choices, drawn in the same order: crop boxes, flips, jitter factors and order
    assert torch.equal(a["jitter"], b["jitter"]) and torch.equal(a["jitter_order"], b["jitter_order"])
    for (index, seed), box in zip(items, b["jpeg_box"].tolist()):
        w, h = Image.open(FolderImages(root).samples[index][0]).size
        assert box[:4] == list(random_resized_crop_params(random.Random(seed), w, h, [0.2, 1.0]))
    cpu = torch.device("cpu")
    xa, xb = device_images(a, pillow.cfg, cpu), device_images(b, device.cfg, cpu)
    diff = (xa - xb).abs() * 255
    # libjpeg-turbo on both sides; PIL's antialiased bicubic vs torch's (same a = -0.5 filter) plus PIL's
    # rounding to uint8: within rounding, never a visible difference
    assert diff.mean() < 0.6 and diff.max() < 4, (diff.mean(), diff.max())
    for stat in (lambda x: x.mean((0, 2, 3)), lambda x: x.std((0, 2, 3))):
        assert torch.allclose(stat(xa), stat(xb), atol=2e-3)


def test_crop_statistics_follow_random_resized_crop(tmp_path):
    """Over many samples, the device path's boxes have the area and aspect distribution of
    torchvision's own RandomResizedCrop (drawn here with torch's RNG), and half of them are flipped."""
    from torchvision.transforms import RandomResizedCrop

    root = natural_jpegs(tmp_path, per_class=1)
    _, device = both_paths(root, img_size=32)
    boxes = torch.stack([device[(0, s)][0]["box"] for s in range(2000)]).double()
    area = boxes[:, 2] * boxes[:, 3] / (500 * 375)
    aspect = (boxes[:, 3] / boxes[:, 2]).log()
    torch.manual_seed(0)
    image = torch.empty(3, 375, 500)
    ref = torch.tensor([RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(2000)]).double()
    ref_area = ref[:, 2] * ref[:, 3] / (500 * 375)
    assert area.min() > 0.19 and area.max() <= 1.0
    assert abs(area.mean() - ref_area.mean()) < 0.02 and abs(area.std() - ref_area.std()) < 0.02
    assert abs(aspect.mean() - (ref[:, 3] / ref[:, 2]).log().mean()) < 0.02
    assert aspect.min() > math.log(3 / 4) - 0.02 and aspect.max() < math.log(4 / 3) + 0.02
    assert abs(boxes[:, 4].mean() - 0.5) < 0.04


def test_mixed_batch_and_an_undecodable_file(tmp_path, caplog):
    root = natural_jpegs(tmp_path, per_class=3)
    Image.new("RGB", (80, 60), (200, 10, 10)).save(root / "a" / "png.png")  # not a JPEG: Pillow in the worker
    broken = root / "b" / "broken.jpg"
    data = bytearray((root / "b" / "0.jpg").read_bytes())
    data[600:] = b"\xff\xd9" + bytes(len(data) - 602)  # valid header, then the image data is gone
    broken.write_bytes(bytes(data))
    pillow, device = both_paths(root, img_size=32)
    files = [p for p, _ in FolderImages(root).samples]
    items = [(i, 100 + i) for i in range(len(files))]
    b = collate([device[x] for x in items])
    png = files.index(str(root / "a" / "png.png"))
    assert b["image_index"].tolist() == [png] and png not in b["jpeg_index"].tolist()
    with caplog.at_level(logging.WARNING, logger="tinymim.data.pretrain"):
        x = device_images(b, device.cfg, torch.device("cpu"))
    assert x.shape == (len(files), 3, 32, 32) and torch.isfinite(x).all()
    a = collate([pillow[x] for x in items])
    # the PNG went through the same Pillow path
    assert torch.allclose(x[png], device_images(a, pillow.cfg, torch.device("cpu"))[png], atol=1e-6)
    if b["skipped"]:  # libjpeg may also decode a truncated file (grey fill); when it refuses, it is named
        assert "broken.jpg" in caplog.text


def test_distill_trains_with_device_decode(tmp_path):
    from tinymim.tasks import run

    root = natural_jpegs(tmp_path / "data", per_class=16)
    cfg = tiny_distill_config(batch_size=8, max_steps=3)
    cfg.data = DataConfig(name="folder", root=str(root), img_size=32, num_workers=1, decode="device")
    last = run("distill", cfg, str(tmp_path / "run"))
    assert last is not None and math.isfinite(last["loss"])
    assert (tmp_path / "run" / "student.safetensors").is_file()


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_decode_is_a_config_choice(decode):
    from tinymim.core.config import load_config
    from tinymim.tasks.distill_config import DistillConfig

    assert load_config(DistillConfig, None, [f"data.decode={decode}"]).data.decode == decode


def test_finetune_refuses_device_decode():
    from tinymim.core.config import ConfigError
    from tinymim.tasks import load_config

    with pytest.raises(ConfigError, match="decode=device builds pre-training views"):
        load_config("finetune", None, ["data.decode=device"])
