"""Your own images in one call (pipeline/own_images.py, tinymim distill --data/--teacher/--student): the
unlabeled image source, the derived settings, the memory guard, bad input refused in one line with
nothing written, and a real one-call run whose export loads in plain timm."""
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import timm
import torch
from conftest import subprocess_env
from PIL import Image

import tinymim
from tinymim import cli
from tinymim.data.image_files import ImageFiles
from tinymim.pipeline import own_images
from tinymim.tasks.distill_config import DistillConfig
from tinymim.train import memory

TEACHER = "builtin:cifar10_mae_vit128x6"  # 128 wide, 6 blocks, 4 heads, patch 4 at 32 px: an 8 x 8 grid
GiB = 2 ** 30


def write_images(folder, n=24, size=32, nested=True):
    """n random RGB images, half in a nested subfolder, plus a file that is not an image."""
    rng = np.random.default_rng(0)
    for i in range(n):
        where = folder / "a" / "b" if nested and i % 2 else folder
        where.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(where / f"{i:03d}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture
def images(tmp_path):
    return write_images(tmp_path / "images")


def test_image_files_reads_folders_at_any_depth_tars_and_zips(images, tmp_path):
    folder = ImageFiles(images)
    assert len(folder) == 24 and folder.items[0] == "000.png" and "a/b/001.png" in folder.items
    with tarfile.open(tmp_path / "images.tar", "w") as t:
        t.add(images, arcname="images")
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as z:
        for p in sorted(images.rglob("*")):
            z.write(p, p.relative_to(images).as_posix())
    for archive in ("images.tar", "images.zip"):
        source = ImageFiles(tmp_path / archive)
        assert len(source) == 24, archive
        got, label = source.load(0)
        assert label == 0 and got.size == (36, 32)
        name = source.items[0] if isinstance(source.items[0], str) else source.items[0][0]
        expected = np.asarray(Image.open(images / name.removeprefix("images/")).convert("RGB"))
        assert np.array_equal(np.asarray(got), expected), archive  # the same pixels as the file itself


def test_the_plan_derives_every_setting_from_the_teacher_student_and_data(images):
    cfg, plan = own_images.plan(str(images), TEACHER, "vit_tiny_patch16_224", free=16 * GiB)
    assert isinstance(cfg, DistillConfig)
    assert cfg.data.name == "images" and cfg.data.img_size == 32  # the teacher's own size; images are 32 px
    assert cfg.student.name == "vit_tiny_patch16_224" and cfg.student.patch_size == 4  # 8 x 8, the teacher's grid
    assert cfg.teacher.model.img_size == 32 and cfg.teacher.target_block == 6 and cfg.teacher.relation_heads == 4
    assert cfg.student.block_heads == {12: 4}  # the student's relation block takes the teacher's heads
    assert cfg.data.mean == [0.4914, 0.4822, 0.4465]  # the teacher's own normalization (its run's data)
    assert cfg.train.batch_size == 4  # a quarter of the 24 images, as a power of two
    assert 1 <= cfg.data.num_workers <= max(1, memory.usable_cores())
    assert cfg.train.epochs == 300 and cfg.train.warmup_epochs == 15  # 100,000 / 24 images, capped; 5% warmup
    text = "\n".join(plan.lines)
    for expected in ("image size: 32 px", "student patch 4 (changed from 16", "8 x 8",
                     "the teacher's block 6 of 6 split into 4 heads", "block 12", "batch: 4", "peak memory"):
        assert expected in text, expected
    # the user's overrides win over derived keys; sizes are a student too
    cfg, _ = own_images.plan(str(images), TEACHER, "dim64,depth3,heads2", epochs=2,
                             overrides=["train.blr=5e-4"], free=16 * GiB)
    s = cfg.student
    assert (s.name, s.embed_dim, s.depth, s.patch_size) == ("vit_custom", 64, 3, 4)
    assert cfg.train.epochs == 2 and cfg.train.blr == 5e-4
    # a bare weights file as the teacher: its sizes read from the shapes, its heads from tinymim's metadata
    from tinymim.models.checkpoint import builtin_teacher

    cfg, _ = own_images.plan(str(images), str(builtin_teacher(TEACHER) / "encoder.safetensors"), "dim64,depth2,heads2",
                             free=16 * GiB)
    t = cfg.teacher.model
    assert (t.name, t.patch_size, t.embed_dim, t.depth, t.num_heads) == ("vit_custom", 4, 128, 6, 4)


def test_the_memory_estimate_grows_with_the_batch_and_names_a_batch_that_fits(images):
    cfg, _ = own_images.plan(str(images), TEACHER, "vit_tiny_patch16_224", free=16 * GiB)
    est, _, _ = memory.distill_estimate(cfg)
    assert est.peak(256) > est.peak(64) > est.fixed > 0
    free = est.peak(100)
    fit = est.largest_batch(free)
    assert 0 < fit < 100 and fit % 8 == 0 and est.peak(fit) <= free * memory.SAFETY < est.peak(fit + 8)
    cfg.train.device, cfg.train.batch_size = "cpu", 256
    with pytest.raises(memory.MemoryFitError, match=f"train.batch_size={fit} fits"):
        memory.check_distill_fits(cfg, free=free)
    memory.check_distill_fits(cfg, free=est.peak(256))  # fits: nothing raised


def run_cli(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("case", ["empty folder", "not images", "grids cannot match", "unknown student",
                                  "batch cannot fit", "an override cannot fit", "no config, imagenet defaults",
                                  "one-call flag with a recipe"])
def test_bad_input_is_one_line_naming_the_fix_and_writes_nothing(case, tmp_path, images, capsys, monkeypatch):
    empty, junk = tmp_path / "empty", tmp_path / "junk"
    empty.mkdir()
    junk.mkdir()
    for i in range(3):
        (junk / f"{i}.txt").write_text("text")
    (junk / "fake.jpg").write_text("not a JPEG")
    monkeypatch.setattr(memory, "available_bytes", lambda: 8 * GiB)  # the same answer on any machine
    out = tmp_path / "run"
    argv = {
        "empty folder": ["--data", str(empty), "--teacher", TEACHER, "--student", "vit_tiny_patch16_224"],
        "not images": ["--data", str(junk), "--teacher", TEACHER, "--student", "vit_tiny_patch16_224"],
        "grids cannot match": ["--data", str(images), "--teacher", TEACHER, "--student", "dim64,depth2,heads4,patch5"],
        "unknown student": ["--data", str(images), "--teacher", TEACHER, "--student", "vit_tinyy_patch16_224"],
        "batch cannot fit": ["--data", str(images), "--teacher", TEACHER, "--student", "vit_tiny_patch16_224",
                             "--batch-size", "100000"],
        "an override cannot fit": ["--data", str(images), "--teacher", TEACHER, "--student", "vit_tiny_patch16_224",
                                   "train.batch_size=100000"],
        "no config, imagenet defaults": [],
        "one-call flag with a recipe": ["--config", "cifar10/distill_micro", "--epochs", "3"],
    }[case]
    code, err = run_cli(["distill", *argv, "--output", str(out)], capsys)
    assert code == 1 and err.startswith("error: ") and "\n" not in err, err
    assert not out.exists()
    fix = {"empty folder": "no images in", "not images": "can be read",
           "grids cannot match": "give patch4 or an image size divisible by 5 (--img-size 40)",
           "unknown student": "timm.list_models('vit_*')", "batch cannot fit": "--batch-size",
           "an override cannot fit": "with the overrides given", "no config, imagenet defaults":
           "--config cifar10/distill_micro", "one-call flag with a recipe": "give train.epochs=VALUE instead"}[case]
    assert fix in err, err
    if case == "batch cannot fit":
        fit = int(err.split("--batch-size ")[-1].split()[0])
        assert 8 <= fit < 100000
    if case == "an override cannot fit":
        fit = int(err.split("train.batch_size=")[-1].split()[0])
        assert 8 <= fit < 100000
    if case == "no config, imagenet defaults":
        assert "train.batch_size=" in err and "ImageNet recipe's defaults" in err


def test_one_call_needs_all_three_names(tmp_path, images, capsys):
    code, err = run_cli(["distill", "--data", str(images), "--output", str(tmp_path / "run")], capsys)
    assert code == 1 and "add --teacher and --student" in err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_one_call_trains_prints_the_derived_settings_and_exports_a_timm_folder(tmp_path):
    images = write_images(tmp_path / "images", n=64)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "tinymim", "distill", "--data", str(images), "--teacher", TEACHER,
                             "--student", "vit_tiny_patch16_224", "--output", str(out), "--epochs", "1",
                             "student.depth=2"], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout
    before_training = printed.split("time: about")[0]
    for expected in ("data: 64 images", "image size: 32 px", "student patch 4", "teacher is fed 32 px",
                     "the teacher's block 6 of 6 split into 4 heads", "batch: 16", "epochs: 1 (4 steps each",
                     "loader workers:", "peak memory: about"):
        assert expected in before_training, expected
    assert "tinymim knn" in printed and "tinymim export" in printed
    assert "tinymim finetune --config cifar10/finetune_short" in printed  # 32 px: the short recipe, not ImageNet's
    # the export is a plain timm model: the student's architecture, its weights
    model = timm.create_model(f"local-dir:{out / 'timm'}", pretrained=True).eval()
    assert model.patch_embed.patch_size == (4, 4) and model.embed_dim == 192
    from safetensors.torch import load_file

    trained = load_file(out / "student.safetensors")
    assert torch.equal(model.blocks[0].attn.qkv.weight, trained["blocks.0.attn.qkv.weight"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the same features as tinymim's own loader gives for the run
        assert torch.allclose(model(x), tinymim.load_vit(out)(x), atol=1e-5)


def test_loader_workers_are_capped_at_the_cores():
    from tinymim.data.loader import build_loader
    from tinymim.data.pretrain import DataConfig

    loader, _ = build_loader(DataConfig(name="synthetic", img_size=32, num_workers=64, synthetic_size=16), 8)
    assert loader.num_workers == min(64, memory.usable_cores())


def test_an_indexed_shard_folder_and_a_brace_pattern_are_data_too(tmp_path):
    from tinymim.data.shard_writer import write_shards
    from tinymim.data.sources import FolderImages

    write_images(tmp_path / "tree" / "things", n=12, nested=False)
    write_shards(FolderImages(tmp_path / "tree"), tmp_path / "shards", 5, 0)  # 3 shards of 5, 5 and 2
    cfg, plan = own_images.plan(str(tmp_path / "shards"), TEACHER, "dim64,depth2,heads2", free=16 * GiB)
    assert (cfg.data.name, plan.images) == ("shards", 12)
    cfg, plan = own_images.plan(str(tmp_path / "shards" / "shard-{000000..000001}.tar"), TEACHER,
                                "dim64,depth2,heads2", free=16 * GiB)
    assert (cfg.data.name, plan.images) == ("shards", 10)


@pytest.mark.slow
def test_the_python_call_trains_and_returns_the_run_its_export_and_the_next_commands(tmp_path):
    images = write_images(tmp_path / "images", n=16)
    result = tinymim.distill(data=images, teacher=TEACHER, student="dim32,depth2,heads2", output=tmp_path / "run",
                             overrides=["train.max_steps=2"], verbose=False)
    assert result.metrics is not None and result.metrics["step"] == 2
    assert (tmp_path / "run" / "student.safetensors").is_file() and (result.export / "config.json").is_file()
    assert any(c.startswith("k-NN") and str(tmp_path / "run") in c for c in result.next_commands)
