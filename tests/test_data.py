"""Paired views against torchvision's own color transforms; global batches for any process count."""
import pytest
import torch
from torchvision.transforms import functional as TF

from tinymim.data.loader import GlobalBatchSampler
from tinymim.data.pretrain import DataConfig, color_jitter
from tinymim.data.sources import SyntheticImages
from tinymim.data.view_dataset import PairedViewDataset


def test_color_jitter_matches_torchvision_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g)
    factors = 0.6 + 0.8 * torch.rand(4, 3, generator=g)
    orders = torch.stack([torch.randperm(3, generator=g) for _ in range(4)])
    ours = color_jitter(x, factors, orders)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for i in range(4):
        ref = x[i]
        for op in orders[i].tolist():
            ref = ops[op](ref, float(factors[i, op]))
        assert torch.allclose(ours[i], ref, atol=1e-5), i


def test_global_batches_do_not_depend_on_process_count():
    one = GlobalBatchSampler(100, 8, rank=0, world=1, seed=3)
    two = [GlobalBatchSampler(100, 8, rank=r, world=2, seed=3) for r in range(2)]
    for s in [one, *two]:
        s.set_epoch(2)
    for b1, b2a, b2b in zip(one, *two):
        assert b1 == b2a + b2b  # same samples and the same per-sample seeds
    one.set_epoch(2, start_step=5)  # resuming mid-epoch yields the rest of the same epoch
    rest = list(one)
    one.set_epoch(2)
    assert rest == list(one)[5:] and len(rest) == 12 - 5


def test_views_are_a_function_of_the_sample_seed():
    ds = PairedViewDataset(SyntheticImages(16, 32), DataConfig(img_size=24))
    a, b = ds[(3, 12345)], ds[(3, 12345)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].shape == (3, 24, 24)
    assert not torch.equal(ds[(3, 999)][0], a[0])


def test_holdout_is_a_fixed_split_of_the_training_images():
    from tinymim.data.classification import ClassifyDataConfig
    from tinymim.data.classification import classify_source as _source

    cfg = ClassifyDataConfig(name="synthetic", synthetic_size=200, img_size=32, holdout=50, subset=100)
    train, held = _source(cfg, None, True), _source(cfg, None, False)
    assert len(held) == 50 and len(train) == 100
    held_ids = {held.indices[i] for i in range(len(held))}
    train_ids = {train.source.indices[j] for j in train.indices}  # the subset is drawn from the rest
    assert not held_ids & train_ids and held_ids == {_source(cfg, None, False).indices[i] for i in range(50)}
    labels = {held.load(i)[1] for i in range(len(held))}
    assert len(labels) > 5  # a random sample, not the first images (one class in a folder tree)


def test_knn_bank_is_a_random_sample_not_the_first_class():
    import torch.utils.data as tud

    from tinymim.train.knn import _sample

    labels = [c for c in range(10) for _ in range(100)]  # a folder tree: class by class
    loader = tud.DataLoader(tud.Subset(labels, range(len(labels))), batch_size=50)
    kept = [labels[i] for i in _sample(loader, 200).dataset.indices]
    assert len(kept) == 200 and len(set(kept)) == 10 and kept == sorted(kept)


# ---------------------------------------------------------------------------------------------
# decoding: every mode to the right 8-bit RGB, bombs and unreadable files skipped and counted once


def _gradient16():
    import numpy as np

    return (np.arange(64 * 64, dtype=np.uint32) * 16).astype(np.uint16).reshape(64, 64)  # 0..65520


def _rgb(img):
    import numpy as np

    assert img.mode == "RGB"
    return np.asarray(img)


def test_16_bit_and_float_images_decode_to_their_8_bit_values(tmp_path):
    import numpy as np
    from PIL import Image

    from tinymim.data.images import decode_image
    from tinymim.data.sources import FolderImages

    a = _gradient16()
    gray = lambda x: np.repeat(x.astype(np.uint8)[..., None], 3, axis=2)  # noqa: E731
    (tmp_path / "c").mkdir()
    Image.fromarray(a).save(tmp_path / "c" / "png16.png")  # opens as I;16
    Image.frombytes("I;16B", (64, 64), a.astype(">u2").tobytes()).save(tmp_path / "c" / "big_endian.tif")
    Image.fromarray(a.astype(np.int32)).save(tmp_path / "c" / "int32.tif")  # mode I, 16-bit values
    assert Image.open(tmp_path / "c" / "png16.png").mode == "I;16"
    assert Image.open(tmp_path / "c" / "big_endian.tif").mode == "I;16B"
    assert Image.open(tmp_path / "c" / "int32.tif").mode == "I"
    for name in ("png16.png", "big_endian.tif", "int32.tif"):
        got = _rgb(decode_image(tmp_path / "c" / name))
        assert np.array_equal(got, gray(a >> 8)), name  # 0..65535 -> 0..255, not clipped to white
    # the training path (a folder source) decodes the same way
    source = FolderImages(tmp_path)
    png = [i for i in range(len(source)) if source.describe(i).endswith("png16.png")][0]
    assert np.array_equal(_rgb(source.load(png)[0]), gray(a >> 8))
    f = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(f).save(tmp_path / "unit.tif")  # F, 0..1: x 255
    assert np.array_equal(_rgb(decode_image(tmp_path / "unit.tif")), gray(np.rint(f * 255)))
    wide = (f * 400 - 50).astype(np.float32)  # F beyond 0..1: taken as 0..255, clipped
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    assert np.array_equal(_rgb(decode_image(tmp_path / "wide.tif")), gray(np.clip(np.rint(wide), 0, 255)))
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "int32_wide.tif")
    with pytest.raises(ValueError, match="outside 16-bit 0..65535"):
        decode_image(tmp_path / "int32_wide.tif")


def test_palette_alpha_and_cmyk_decode_to_the_expected_rgb(tmp_path):
    from PIL import Image

    from tinymim.data.images import decode_image

    palette = [[200, 10, 10], [10, 200, 10], [10, 10, 200]]
    p = Image.new("P", (2, 2))
    p.putdata([0, 1, 2, 0])
    p.putpalette([v for c in palette for v in c] + [0] * (768 - 9))
    p.save(tmp_path / "p.png", transparency=0)  # index 0 transparent: its colour is kept, alpha dropped
    assert Image.open(tmp_path / "p.png").info.get("transparency") == 0
    assert _rgb(decode_image(tmp_path / "p.png")).tolist() == [[palette[0], palette[1]], [palette[2], palette[0]]]
    Image.new("RGBA", (2, 2), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    assert _rgb(decode_image(tmp_path / "rgba.png")).tolist() == [[[10, 20, 30]] * 2] * 2
    Image.new("LA", (2, 2), (90, 0)).save(tmp_path / "la.png")
    assert _rgb(decode_image(tmp_path / "la.png")).tolist() == [[[90, 90, 90]] * 2] * 2
    cmyk = Image.new("CMYK", (3, 1))
    for x, v in enumerate([(0, 255, 255, 0), (0, 0, 0, 255), (128, 0, 0, 0)]):
        cmyk.putpixel((x, 0), v)
    cmyk.save(tmp_path / "cmyk.tif")
    # R = (255 - C)(255 - K) / 255, likewise G from M and B from Y
    assert _rgb(decode_image(tmp_path / "cmyk.tif")).tolist() == [[[255, 0, 0], [0, 0, 0], [127, 255, 255]]]


def _folder(root, per_class=8, classes=("a", "b")):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), (i * 20, 40, 200 - i * 10)).save(root / c / f"{i}.jpg")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_each_unreadable_image_is_counted_once_per_pass(tmp_path, workers):
    from tinymim.data.loader import build_loader

    root = _folder(tmp_path / "data")
    # neighbours in the listing: the first one's substitute is the second, which was counted twice
    (root / "a" / "3.jpg").write_bytes(b"garbage")
    (root / "a" / "4.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    loader, sampler = build_loader(DataConfig(name="folder", root=str(root), img_size=32, num_workers=workers), 8)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(loader)
        assert sum(len(b["label"]) for b in batches) == 16  # each pass draws all 16 images
        assert sum(b["skipped"] for b in batches) == 2, epoch


def _bomb_folder(root, monkeypatch):
    """A folder of 16 images of which two are 'bombs' under a lowered pixel limit: one between the limit
    and twice it (Pillow only warns), one over twice it (Pillow refuses)."""
    from PIL import Image

    root = _folder(root)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40)
    Image.new("RGB", (50, 50), (9, 9, 9)).save(root / "a" / "2.jpg")  # 2500 pixels: the warning range
    Image.new("1", (200, 200)).save(root / "b" / "2.png")  # 40000 pixels: Pillow's DecompressionBombError
    (root / "b" / "2.jpg").unlink()
    return root


def test_decompression_bombs_are_skipped_and_counted(tmp_path, monkeypatch, caplog):
    import warnings

    from PIL import Image

    from tinymim.data.images import decode_image
    from tinymim.data.loader import build_loader

    root = _bomb_folder(tmp_path / "data", monkeypatch)
    with pytest.raises(Image.DecompressionBombError):
        decode_image(root / "a" / "2.jpg")
    for decode in ("cpu", "device"):  # device: the header check sends it to the Pillow path, which skips it
        loader, _ = build_loader(DataConfig(name="folder", root=str(root), img_size=32, num_workers=0,
                                            decode=decode), 8)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # nothing reaches Pillow's warning
            batches = list(loader)
        assert sum(b["skipped"] for b in batches) == 2, decode
    assert "skipping unreadable image" in caplog.text and "2.png" in caplog.text
    assert "decompression bomb" in caplog.text


def _segmentation_pairs(root, images: dict, labels: dict | None = None):
    import numpy as np
    from PIL import Image

    for split in ("train",):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
        img.save(root / "images" / "train" / name)
        stem = name.rsplit(".", 1)[0]
        label = (labels or {}).get(stem)
        if label is None:
            label = Image.fromarray(np.resize(np.array([0, 1, 2], np.uint8), (img.height, img.width)))
        label.save(root / "annotations" / "train" / f"{stem}.png")
    return root


def test_a_16_bit_segmentation_image_trains_on_its_real_values(tmp_path):
    import numpy as np
    from PIL import Image

    from tinymim.data.segmentation import SegmentationDataset, SegmentationFolder, SegmentDataConfig, train_transform

    a = _gradient16()
    root = _segmentation_pairs(tmp_path, {"g.png": Image.fromarray(a)})
    cfg = SegmentDataConfig(root=str(root), num_classes=3, scale=[64, 64], crop_size=32, photometric=False,
                            mean=[0, 0, 0], std=[1, 1, 1])
    folder = SegmentationFolder(cfg, "train")
    image, label = folder.load(0)
    assert np.array_equal(np.asarray(image), np.repeat((a >> 8).astype(np.uint8)[..., None], 3, axis=2))
    sample = SegmentationDataset(folder, cfg, train=True)[(0, 7)]
    reference = train_transform(Image.fromarray((a >> 8).astype(np.uint8)).convert("RGB"), label, cfg, 7)
    assert torch.equal(sample["image"], reference[0]) and torch.equal(sample["label"], reference[1])
    assert sample["image"].max() < 1 and sample["skipped"] == 0  # not a white frame


def test_16_bit_label_maps_keep_their_values(tmp_path):
    import numpy as np
    from PIL import Image

    from tinymim.data.pretrain import DataError
    from tinymim.data.segmentation import SegmentationFolder, SegmentDataConfig

    values = np.resize(np.array([0, 1, 2, 255], np.uint16), (8, 8))
    root = _segmentation_pairs(tmp_path / "ok", {"x.png": Image.new("RGB", (8, 8))}, {"x": Image.fromarray(values)})
    assert Image.open(root / "annotations" / "train" / "x.png").mode == "I;16"
    _, label = SegmentationFolder(SegmentDataConfig(root=str(root), num_classes=3), "train").load(0)
    assert np.array_equal(label, values.astype(np.int64))  # indices as stored, not rescaled like pictures
    values[0, 0] = 1000
    root = _segmentation_pairs(tmp_path / "bad", {"x.png": Image.new("RGB", (8, 8))}, {"x": Image.fromarray(values)})
    with pytest.raises(DataError, match=r"x\.png holds label value\(s\) 1000, neither a class") as e:
        SegmentationFolder(SegmentDataConfig(root=str(root), num_classes=3), "train").load(0)
    assert "\n" not in str(e.value)


def test_unreadable_segmentation_images_are_skipped_and_counted(tmp_path, monkeypatch):
    from PIL import Image

    from tinymim.data.pretrain import DataError
    from tinymim.data.segmentation import SegmentationDataset, SegmentationFolder, SegmentDataConfig, collate_segment

    images = {f"{i}.png": Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(4)}
    images["1.png"] = Image.new("RGB", (50, 50))  # a bomb under the lowered limit
    root = _segmentation_pairs(tmp_path, images)
    (root / "images" / "train" / "2.png").write_bytes(b"garbage")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40)
    cfg = SegmentDataConfig(root=str(root), num_classes=3, scale=[16, 16], crop_size=16, photometric=False)
    folder = SegmentationFolder(cfg, "train")
    train = SegmentationDataset(folder, cfg, train=True)
    batch = collate_segment([train[(i, i)] for i in range(4)])
    assert batch["skipped"] == 2 and batch["image"].shape == (4, 3, 16, 16)
    val = SegmentationDataset(folder, cfg, train=False)
    samples = [val[i] for i in range(4)]
    assert [s["skipped"] for s in samples] == [0, 1, 1, 0]
    # an unreadable evaluation image adds nothing to the metrics: every pixel of its label is ignored
    assert all((s["label"] == cfg.ignore_index).all() for s in samples[1:3])
    Image.new("L", (16, 16), 9).save(root / "annotations" / "train" / "3.png")  # a label outside the classes
    with pytest.raises(DataError, match="holds label value"):  # the user's to fix: stops, not skipped
        train[(3, 0)]
