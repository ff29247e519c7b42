"""`tinymim visualize`: a PNG grid of teacher vs student relation maps."""
import numpy as np
from conftest import tiny_distill_config
from PIL import Image

import tinymim.tasks as tasks
from tinymim.cli import main
from tinymim.data.sources import SyntheticImages
from tinymim.evaluate.visualize import colorize
from tinymim.tasks.distill import build_distill_task


def test_visualize_writes_a_grid(tmp_path, capsys):
    tasks.run("distill", tiny_distill_config(max_steps=2), tmp_path / "run")
    img, _ = SyntheticImages(1, 48).load(0)
    img.save(tmp_path / "img.png")
    assert main(["visualize", str(tmp_path / "run"), "--image", str(tmp_path / "img.png"), "--output",
                 str(tmp_path / "grid.png"), "--heads", "0", "3", "--queries", "1", "36", "--cell", "64"]) == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    # 2 relations x 2 heads x 2 queries rows, each a 14px label + 64px panels; 3 panels wide
    assert grid.shape == (8 * (64 + 14), 3 * 64, 3)
    teacher, student = grid[14:78, 64:128], grid[14:78, 128:192]
    assert teacher.std() > 0 and not np.array_equal(teacher, student)
    assert main(["visualize", str(tmp_path / "run"), "--image", str(tmp_path / "img.png"), "--output",
                 str(tmp_path / "bad.png"), "--heads", "9"]) == 1
    assert "head 9 does not exist" in capsys.readouterr().err
    # a 16-bit gray image draws exactly as its 8-bit version (value >> 8), not as a white one
    gray = np.asarray(img.convert("L"), dtype=np.uint16)
    Image.fromarray(gray.astype(np.uint8)).save(tmp_path / "gray8.png")
    Image.fromarray(gray * 256 + 100).save(tmp_path / "gray16.png")  # (g * 256 + 100) >> 8 == g
    assert [Image.open(tmp_path / f"{n}.png").mode for n in ("gray8", "gray16")] == ["L", "I;16"]
    for name in ("gray8", "gray16"):
        assert main(["visualize", str(tmp_path / "run"), "--image", str(tmp_path / f"{name}.png"), "--output",
                     str(tmp_path / f"{name}_grid.png"), "--cell", "32"]) == 0
    grid8, grid16 = (np.asarray(Image.open(tmp_path / f"{n}_grid.png")) for n in ("gray8", "gray16"))
    assert np.array_equal(grid8, grid16) and grid8[14:46, :32].std() > 0


def test_colorize_ramp():
    out = colorize(np.array([[0.0, 0.5, 1.0]]), 1.0)
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (68, 1, 84) and tuple(out[0, 2]) == (253, 231, 37)


def test_visualize_rebuilds_the_runs_teacher(tmp_path):
    import torch

    from tinymim.evaluate.visualize import load_run

    tasks.run("distill", tiny_distill_config(max_steps=1), tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    task, _ = load_run(tmp_path / "run")
    # the random teacher is rebuilt from the run's seed; the student comes from its weights
    import tinymim.train.engine as engine
    engine.seed_everything(0)
    again = build_distill_task(tiny_distill_config(max_steps=1))
    assert torch.equal(task.teacher.vit.blocks[0].attn.qkv.weight, again.teacher.vit.blocks[0].attn.qkv.weight)
    assert torch.equal(task.student.blocks[0].attn.qkv.weight, ckpt["model"]["vit.blocks.0.attn.qkv.weight"])
