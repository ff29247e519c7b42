"""`tinymim demo`: the built-in pipeline end to end (shrunk to a few steps here), and its --data forms."""
import tarfile

import pytest

from tinymim.config import ConfigError
from tinymim.demo import data_overrides


def test_demo_runs_offline_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    # the demo's stages, each cut to 3 steps and a small synthetic set (the full demo: README)
    from tinymim import demo
    demo.IMAGES, saved = 96, demo.IMAGES
    try:
        report = demo.run_demo(out, progress=False, overrides=["train.max_steps=3", "train.batch_size=32"])
    finally:
        demo.IMAGES = saved
    text = report.read_text()
    for stage in ("MAE teacher", "TinyMIM student", "fine-tuned TinyMIM student", "fine-tuned from scratch"):
        assert stage in text
    assert (out / "plots" / "losses.png").is_file() and (out / "plots" / "accuracy.png").is_file()
    assert (out / "student_tinymim" / "student.safetensors").is_file()


def test_demo_data_forms(tmp_path):
    assert data_overrides("synthetic", tmp_path)[0][0] == "data.name=synthetic"
    assert data_overrides("cifar10", tmp_path)[0][0] == "data.name=cifar10"
    # a folder with train.tar / test.tar (the layout of ../shared/data/cifar10) is extracted once
    src = tmp_path / "src"
    for split in ("train", "test"):
        (src / split / "cat").mkdir(parents=True)
        (src / split / "cat" / "0.jpg").write_bytes(b"x")
    packed = tmp_path / "packed"
    packed.mkdir()
    for split in ("train", "test"):
        with tarfile.open(packed / f"{split}.tar", "w") as t:
            t.add(src / split, arcname=split)
    common, finetune = data_overrides(str(packed), tmp_path / "out")
    assert f"data.root={(tmp_path / 'out' / 'data' / 'train').resolve()}" in common
    assert f"data.val_root={(tmp_path / 'out' / 'data' / 'test').resolve()}" in finetune
    # a plain train/ + val/ folder is used in place
    common, finetune = data_overrides(str(src), tmp_path / "out2")
    assert f"data.root={(src / 'train').resolve()}" in common
    with pytest.raises(ConfigError, match="train/ and val/"):
        data_overrides(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "only_train" / "train").mkdir(parents=True)
    with pytest.raises(ConfigError, match="val"):
        data_overrides(str(tmp_path / "only_train"), tmp_path)
