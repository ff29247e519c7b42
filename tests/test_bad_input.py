"""Bad input: each a clear error that names the problem, or a counted skip."""
import pickle
from pathlib import Path

import pytest
import torch
from conftest import tiny_distill_config, tiny_vit
from PIL import Image

import tinymim.tasks as tasks
from tinymim.cli import main
from tinymim.core.config import ConfigError, load_config
from tinymim.core.errors import DataError, NonFiniteLossError
from tinymim.core.rundir import RunDir
from tinymim.data.loader import build_loader
from tinymim.data.pretrain import DataConfig
from tinymim.models.checkpoint import CheckpointError, load_state_dict
from tinymim.tasks.distill import build_distill_task
from tinymim.tasks.distill_config import DistillConfig


def make_folder(root: Path, per_class=8, classes=("a", "b"), size=32):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (i * 20, 40, 200 - i * 10)).save(root / c / f"{i}.jpg")
    return root


def test_missing_data_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_loader(DataConfig(name="folder", root=str(tmp_path / "nope"), num_workers=0), 4)


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no class folders"):
        build_loader(DataConfig(name="folder", root=str(tmp_path), num_workers=0), 4)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images"):
        build_loader(DataConfig(name="folder", root=str(tmp_path), num_workers=0), 4)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_jpeg_is_skipped_and_counted(tmp_path, workers, caplog):
    root = make_folder(tmp_path / "data")
    (root / "a" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "b" / "5.jpg").write_bytes((root / "b" / "5.jpg").read_bytes()[:40])  # truncated
    loader, sampler = build_loader(DataConfig(name="folder", root=str(root), img_size=32, num_workers=workers), 8)
    skipped, n = 0, 0
    for batch in loader:
        skipped += batch["skipped"]
        n += batch["image"].shape[0]
        assert batch["image"].shape[1:] == (3, 32, 32)
    assert n == 16 and skipped == 2
    if workers == 0:
        assert "skipping unreadable image" in caplog.text and "3.jpg" in caplog.text


def test_corrupt_images_are_counted_in_metrics(tmp_path):
    root = make_folder(tmp_path / "data", per_class=16)
    (root / "a" / "0.jpg").write_bytes(b"garbage")
    cfg = tiny_distill_config()
    cfg.data = DataConfig(name="folder", root=str(root), img_size=32, num_workers=0)
    tasks.run("distill", cfg, tmp_path / "run")
    last = RunDir(tmp_path / "run").read_metrics()[-1]
    assert last["skipped_images"] == 1


def test_teacher_size_without_a_matching_grid():
    """A patch-8 teacher pinned at 32 px has a 4 x 4 grid; the patch-4 student's is 8 x 8: one line naming
    the size that would match. Unpinned, the same teacher is fed 64 px and pairs."""
    cfg = tiny_distill_config()
    cfg.teacher.model = tiny_vit(dim=64, depth=3, heads=4, patch=8)
    with pytest.raises(ConfigError, match=r"teacher.model.img_size=32 gives a 4-patch grid \(patch 8\), but the "
                                          r"student sees a 8 x 8 grid.*leave teacher.model.img_size unset .* 64 px"):
        build_distill_task(cfg)
    cfg.teacher.model.img_size = None
    task = build_distill_task(cfg)
    assert task.teacher.img_size == 64 and task.teacher(torch.zeros(1, 3, 32, 32))["qkv"].shape[1] == 65


@pytest.mark.parametrize("block", [0, 4])
def test_target_block_out_of_range(block):
    cfg = tiny_distill_config()
    cfg.teacher.target_block = block
    with pytest.raises(ConfigError, match=rf"target_block={block} is out of range: the teacher has blocks 1..3"):
        build_distill_task(cfg)


def test_incompatible_heads():
    cfg = tiny_distill_config()
    cfg.teacher.model = tiny_vit(dim=80, depth=3, heads=5)  # student width 48 cannot take 5 heads
    with pytest.raises(ConfigError, match="incompatible heads.*5 heads.*48"):
        build_distill_task(cfg)
    cfg = tiny_distill_config()
    cfg.student.block_heads = {2: 3}  # explicit relation-block heads that contradict the teacher's 4
    with pytest.raises(ConfigError, match="the teacher's block 3 has 4"):
        build_distill_task(cfg)


def test_unknown_config_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown config key.*train.epoch\\b"):
        load_config(DistillConfig, None, ["train.epoch=3"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("student:\n  nmae: vit_small_patch16_224\n")
    assert main(["distill", "--config", str(recipe), "--output", str(tmp_path / "run")]) == 1
    assert "unknown config key(s) student.nmae" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(DistillConfig, None, ["train.epochs=three"])


def test_teacher_checkpoint_that_is_not_a_state_dict(tmp_path):
    bad = tmp_path / "teacher.pth"
    torch.save({"epoch": 3, "args": ["--lr", "1e-3"]}, bad)
    cfg = tiny_distill_config()
    cfg.teacher.checkpoint = str(bad)
    with pytest.raises(CheckpointError, match="not a state dict"):
        build_distill_task(cfg)
    torch.save([torch.zeros(3)], bad)
    with pytest.raises(CheckpointError, match="not a state dict.*list"):
        load_state_dict(bad)


def test_teacher_checkpoint_of_another_architecture(tmp_path):
    from safetensors.torch import save_file

    from tinymim.models.vit import create_vit

    other = create_vit(tiny_vit(dim=32, depth=2, heads=2))
    save_file(other.state_dict(), tmp_path / "t.safetensors")
    cfg = tiny_distill_config()
    cfg.teacher.checkpoint = str(tmp_path / "t.safetensors")
    with pytest.raises(CheckpointError,
                       match="(?s)does not fit the model.*missing keys.*blocks.2.*shape mismatches: cls_token"):
        build_distill_task(cfg)


class _Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("touch pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"model": _Exploit()}, f)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_state_dict(evil)
    assert not (tmp_path / "pwned").exists()
    torch.save({"model": {"w": torch.zeros(2)}}, evil)
    evil.write_bytes(evil.read_bytes()[:50])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        load_state_dict(evil)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "missing.safetensors")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_distill_config(blr=1e9, checkpoint_every=1, epochs=2)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step") as err:
        tasks.run("distill", cfg, run)
    assert "last good checkpoint" in str(err.value)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["global_step"] >= 1 and not ckpt["finished"]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (run / "student.safetensors").exists()


def test_changed_config_on_resume_is_refused(tmp_path):
    tasks.run("distill", tiny_distill_config(max_steps=2), tmp_path / "run")
    with pytest.raises(ConfigError, match="different config.*train.blr"):
        tasks.run("distill", tiny_distill_config(max_steps=2, blr=5e-3), tmp_path / "run")
    # settings that do not change the result may differ
    assert tasks.run("distill", tiny_distill_config(max_steps=2, log_every=7), tmp_path / "run") is None


def test_cifar_offline_is_a_clear_error(tmp_path, monkeypatch):
    from torchvision import datasets

    def no_network(self):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets.CIFAR10, "download", no_network)
    with pytest.raises(DataError, match="cifar10 is not in .* could not be downloaded.*data.name=folder"):
        build_loader(DataConfig(name="cifar10", root=str(tmp_path / "cifar"), num_workers=0), 4)


def bomb_png(path: Path, side: int = 14000) -> Path:
    """A real decompression bomb for Pillow's default limit: a mode-1 PNG of side x side pixels
    (14000: 196M, over twice PIL.Image.MAX_IMAGE_PIXELS) that takes a few KB on disk. Written chunk by
    chunk: Pillow would hold the whole image in memory."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    body = b"".join(packer.compress(row * 100) for _ in range(side // 100)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def _last_line(err: str) -> str:
    return [line for line in err.splitlines() if line.strip()][-1]


@pytest.mark.parametrize("kind", ["over twice the limit", "over the limit", "garbage"])
def test_visualize_of_an_unreadable_image_is_one_line(tmp_path, capsys, monkeypatch, kind):
    image = tmp_path / "img.png"
    if kind == "over twice the limit":  # Pillow's own refusal, at its default limit
        bomb_png(image)
        assert image.stat().st_size < 100_000
    elif kind == "over the limit":  # where Pillow only warns: refused all the same
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40)
        Image.new("RGB", (50, 50)).save(image)
    else:
        image.write_bytes(b"not an image")
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"an earlier grid")
    # the image is read before the run: a missing run is never reached
    assert main(["visualize", str(tmp_path / "run"), "--image", str(image), "--output", str(grid)]) == 1
    last = _last_line(capsys.readouterr().err)
    assert last.startswith(f"error: cannot read the image {image}")
    if kind != "garbage":
        assert "decompression bomb" in last and "downscaled copy" in last
    assert grid.read_bytes() == b"an earlier grid"


class _RedLevel(torch.nn.Module):
    """3-way logits: class 0 when the image's red level is low, 1 in the middle, 2 high."""

    def forward(self, x):
        level = x[:, 0].mean((1, 2))
        return torch.nn.functional.one_hot(torch.bucketize(level, torch.tensor([0.35, 0.65])), 3).float()


def test_evaluation_scores_only_the_readable_images(tmp_path):
    from tinymim.data.classification import ClassifyDataConfig, build_eval_loader
    from tinymim.evaluate.robustness import evaluate_folder

    reds = {"a": [50, 50, 200, 50], "b": [128, 50, 128], "c": [200, 200, 128]}  # 7 of 10 predicted right
    for c, levels in reds.items():
        (tmp_path / c).mkdir()
        for i, r in enumerate(levels):
            Image.new("RGB", (8, 8), (r, 0, 0)).save(tmp_path / c / f"{i}.png")
    garbage = [tmp_path / "a" / "0.png", tmp_path / "a" / "1.png", tmp_path / "a" / "2.png", tmp_path / "c" / "2.png"]
    for f in garbage:
        f.write_bytes(b"garbage")  # a batch of 4 entirely unreadable, among others
    # by hand over the readable ones: a/3 right, b/0 right, b/1 wrong, b/2 right, c/0 right, c/1 right
    cfg = ClassifyDataConfig(name="folder", val_root=str(tmp_path), img_size=8, eval_crop_pct=1.0,
                             mean=[0, 0, 0], std=[1, 1, 1], num_workers=0)
    result = evaluate_folder(_RedLevel(), build_eval_loader(cfg, 4), torch.device("cpu"))
    assert result["images"] == 6 and result["skipped_images"] == 4
    assert result["top1"] == pytest.approx(100 * 5 / 6)
    for f in (tmp_path / c / f"{i}.png" for c, levels in reds.items() for i in range(len(levels))):
        f.write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 10 evaluation images could be read"):
        evaluate_folder(_RedLevel(), build_eval_loader(cfg, 4), torch.device("cpu"))


def test_eval_command_skips_unreadable_images_and_says_so(tmp_path, capsys, caplog):
    import json
    import shutil

    from test_downstream import tiny_finetune_config

    from tinymim.data.sources import SyntheticImages

    cfg = tiny_finetune_config(max_steps=2)
    cfg.data.synthetic_classes = 3
    tasks.run("finetune", cfg, str(tmp_path / "run"))
    clean, damaged = tmp_path / "clean", tmp_path / "damaged"
    images = SyntheticImages(size=12, img_size=32, num_classes=3, seed=5)
    for i in range(12):
        img, c = images.load(i)
        (clean / f"class_{c}").mkdir(parents=True, exist_ok=True)
        img.save(clean / f"class_{c}" / f"{i}.png")
    shutil.copytree(clean, damaged)
    for name in ("class_0/0.png", "class_1/4.png", "class_2/5.png"):
        (damaged / name).write_bytes(b"\x89PNG garbage")
        (clean / name).unlink()  # the reference: the readable images alone
    assert main(["eval", str(tmp_path / "run"), "--data", str(clean), "--workers", "0",
                 "--json", str(tmp_path / "clean.json")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--data", str(damaged), "--workers", "0",
                 "--json", str(tmp_path / "damaged.json")]) == 0
    out = capsys.readouterr().out
    assert "(9 images, 3 unreadable skipped)" in out
    assert "3 unreadable images skipped (each named above): the scores are over the 9 readable ones" in caplog.text
    reference, result = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("clean", "damaged"))
    assert result["images"] == 9 and result["skipped_images"] == 3 and reference["skipped_images"] == 0
    assert {k: result[k] for k in ("top1", "top5", "loss")} == pytest.approx(
        {k: reference[k] for k in ("top1", "top5", "loss")})
