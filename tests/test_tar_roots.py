"""data.root / data.val_root take a tar archive of the folder they would name (train.tar holding
train/<class>/*.jpg, as the demo takes; camvid.tar holding camvid/images/...): extracted once into the
cache, then read as the folder."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import MICRO_FINETUNE, SHARED_DATA
from PIL import Image

from tinymim.core.config import ConfigError
from tinymim.core.errors import DataError
from tinymim.data.classification import ClassifyDataConfig, classify_source
from tinymim.data.sources import FolderImages, data_fingerprint, data_root


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None) -> None:
    info = tarfile.TarInfo(name)
    if data is None:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _image(seed: int, mode="RGB", fmt="JPEG", size=32) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, fmt)
    return buf.getvalue()


def image_tar(path: Path, split: str, classes=("cat", "dog"), per_class=3) -> Path:
    """A tar as ../shared/data/cifar10's: split/<class>/NNNN.jpg."""
    with tarfile.open(path, "w") as tar:
        _add(tar, f"{split}/")
        for c, name in enumerate(classes):
            _add(tar, f"{split}/{name}/")
            for i in range(per_class):
                _add(tar, f"{split}/{name}/{i:04d}.jpg", _image(10 * c + i))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TINYMIM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tars"


def test_a_tar_root_reads_as_the_folder_it_holds_and_is_extracted_once(tmp_path, cache, monkeypatch):
    tar = image_tar(tmp_path / "train.tar", "train")
    cfg = ClassifyDataConfig(name="folder", root=str(tar), img_size=32)
    source = classify_source(cfg, cfg.root, True)
    assert source.classes == ["cat", "dog"] and len(source) == 6
    assert [label for _, label in source.samples] == [0, 0, 0, 1, 1, 1]
    assert source.load(4)[0].size == (32, 32)
    # the same images as the extracted folder, so a run resumed from either sees the same data
    with tarfile.open(tar) as t:
        t.extractall(tmp_path / "by_hand", filter="data")
    assert data_fingerprint(source) == data_fingerprint(FolderImages(tmp_path / "by_hand" / "train"))
    assert [p.name for p in cache.iterdir()] == [Path(source.root).parent.name]  # one folder, no leftovers

    def no_second_extraction(*a, **k):
        raise AssertionError("the archive was extracted again")

    monkeypatch.setattr(tarfile, "open", no_second_extraction)
    assert data_root(str(tar)) == str(source.root)


def test_cifar10_named_data_takes_the_tars_and_asks_for_the_evaluation_tar(tmp_path, cache):
    train, test = image_tar(tmp_path / "train.tar", "train"), image_tar(tmp_path / "test.tar", "test", per_class=2)
    cfg = ClassifyDataConfig(name="cifar10", root=str(train), val_root=str(test), img_size=32)
    assert len(classify_source(cfg, cfg.root, True)) == 6
    assert len(classify_source(cfg, cfg.val_root, False)) == 4
    no_val = ClassifyDataConfig(name="cifar10", root=str(train), img_size=32)
    with pytest.raises(ConfigError, match=r"data.val_root=PATH/test.tar"):
        classify_source(no_val, None, False)


def test_a_file_that_is_not_a_tar_is_one_line_and_leaves_nothing(tmp_path, cache):
    bad = tmp_path / "train.tar"
    bad.write_text("not an archive")
    with pytest.raises(DataError, match="is not a readable tar archive") as e:
        data_root(str(bad))
    assert "\n" not in str(e.value)
    assert not cache.exists() or not any(cache.iterdir())
    with pytest.raises(DataError, match="does not exist"):
        data_root(str(tmp_path / "missing.tar"))


def test_segmentation_root_takes_a_tar(tmp_path, cache):
    from tinymim.data.segmentation import SegmentationDataConfig, SegmentationFolder

    with tarfile.open(tmp_path / "seg.tar", "w") as tar:
        for i in range(2):
            _add(tar, f"seg/images/val/{i}.jpg", _image(i, size=16))
            label = np.full((16, 16), i, np.uint8)
            buf = io.BytesIO()
            Image.fromarray(label, "L").save(buf, "PNG")
            _add(tar, f"seg/annotations/val/{i}.png", buf.getvalue())
    folder = SegmentationFolder(SegmentationDataConfig(root=str(tmp_path / "seg.tar"), num_classes=2), "val")
    assert len(folder) == 2
    image, label = folder.load(1)
    assert image.size == (16, 16) and (label == 1).all()


def test_finetune_trains_and_evaluates_on_tars_from_the_command_line(tmp_path, cache, capsys):
    from tinymim.cli import main

    train, test = image_tar(tmp_path / "train.tar", "train"), image_tar(tmp_path / "test.tar", "test", per_class=2)
    code = main(["finetune", "--output", str(tmp_path / "run"), *MICRO_FINETUNE, "data.name=cifar10",
                 f"data.root={train}", f"data.val_root={test}"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "classes.json").read_text())["classes"] == ["cat", "dog"]


@pytest.mark.slow
def test_the_real_cifar10_tars_read_as_image_folders(cache):
    train, test = SHARED_DATA / "cifar10" / "train.tar", SHARED_DATA / "cifar10" / "test.tar"
    if not (train.is_file() and test.is_file()):
        pytest.skip(f"real data not present: {train} (the shared data folder beside the project)")
    cfg = ClassifyDataConfig(name="folder", root=str(train), val_root=str(test), img_size=32)
    train_images, test_images = classify_source(cfg, cfg.root, True), classify_source(cfg, cfg.val_root, False)
    assert (len(train_images), len(test_images)) == (50000, 10000)
    assert train_images.classes == test_images.classes and len(train_images.classes) == 10
    assert train_images.load(0)[0].size == (32, 32)
