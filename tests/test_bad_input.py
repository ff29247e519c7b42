"""Bad input: each a clear error that names the problem, or a counted skip."""
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from tinymim.checkpoint import CheckpointError, load_state_dict
from tinymim.cli import main
from tinymim.config import ConfigError, load_config
from tinymim.data import DataConfig, DataError, build_loader
from tinymim.engine import TrainConfig, run_task
from tinymim.errors import NonFiniteLossError
from tinymim.tasks.distill import DistillConfig, TeacherConfig, build_distill_task
from tinymim.rundir import RunDir

from conftest import tiny_distill_config, tiny_vit


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
    run_task(build_distill_task, cfg, tmp_path / "run")
    import json
    last = RunDir(tmp_path / "run").read_metrics()[-1]
    assert last["skipped_images"] == 1


def test_token_count_mismatch():
    cfg = tiny_distill_config()
    cfg.teacher.model = tiny_vit(dim=64, depth=3, heads=4, patch=8)
    with pytest.raises(ConfigError, match="token counts differ.*65.*17|token counts differ: the teacher sees 17"):
        build_distill_task(cfg)


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
    from tinymim.models import create_vit

    other = create_vit(tiny_vit(dim=32, depth=2, heads=2))
    save_file(other.state_dict(), tmp_path / "t.safetensors")
    cfg = tiny_distill_config()
    cfg.teacher.checkpoint = str(tmp_path / "t.safetensors")
    with pytest.raises(CheckpointError, match="(?s)does not fit the model.*missing keys.*blocks.2.*shape mismatches: cls_token"):
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
        run_task(build_distill_task, cfg, run)
    assert "last good checkpoint" in str(err.value)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["global_step"] >= 1 and not ckpt["finished"]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (run / "student.safetensors").exists()


def test_changed_config_on_resume_is_refused(tmp_path):
    run_task(build_distill_task, tiny_distill_config(max_steps=2), tmp_path / "run")
    with pytest.raises(ConfigError, match="different config.*train.blr"):
        run_task(build_distill_task, tiny_distill_config(max_steps=2, blr=5e-3), tmp_path / "run")
    # settings that do not change the result may differ
    assert run_task(build_distill_task, tiny_distill_config(max_steps=2, log_every=7), tmp_path / "run") is None


def test_cifar_offline_is_a_clear_error(tmp_path, monkeypatch):
    from torchvision import datasets

    def no_network(self):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets.CIFAR10, "download", no_network)
    with pytest.raises(DataError, match="cifar10 is not in .* could not be downloaded.*data.name=folder"):
        build_loader(DataConfig(name="cifar10", root=str(tmp_path / "cifar"), num_workers=0), 4)
