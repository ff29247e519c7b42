"""`tinymim visualize`: teacher vs student relation maps as a PNG a person reads at a glance."""
import numpy as np
from conftest import tiny_distill_config
from PIL import Image

import tinymim.tasks as tasks
from tinymim.cli import main
from tinymim.data.sources import SyntheticImages
from tinymim.tasks.distill import build_distill_task


def test_visualize_writes_a_grid(tmp_path, capsys):
    tasks.run("distill", tiny_distill_config(max_steps=2), tmp_path / "run")
    img, _ = SyntheticImages(1, 48).load(0)
    img.save(tmp_path / "img.png")
    assert main(["visualize", str(tmp_path / "run"), "--image", str(tmp_path / "img.png"), "--output",
                 str(tmp_path / "grid.png"), "--heads", "0", "3", "--queries", "1", "36", "--cell", "64"]) == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape[0] > 8 * 64 and grid.shape[1] > 3 * 64 and grid.std() > 0  # 8 rows of 64-pixel panels
    assert main(["visualize", str(tmp_path / "run"), "--image", str(tmp_path / "img.png"), "--output",
                 str(tmp_path / "bad.png"), "--heads", "9"]) == 1
    assert "head 9 does not exist" in capsys.readouterr().err and not (tmp_path / "bad.png").exists()
    # a 16-bit gray image draws exactly as its 8-bit version (value >> 8), not as a white one
    gray = np.asarray(img.convert("L"), dtype=np.uint16)
    Image.fromarray(gray.astype(np.uint8)).save(tmp_path / "gray8.png")
    Image.fromarray(gray * 256 + 100).save(tmp_path / "gray16.png")  # (g * 256 + 100) >> 8 == g
    assert [Image.open(tmp_path / f"{n}.png").mode for n in ("gray8", "gray16")] == ["L", "I;16"]
    for name in ("gray8", "gray16"):
        assert main(["visualize", str(tmp_path / "run"), "--image", str(tmp_path / f"{name}.png"), "--output",
                     str(tmp_path / f"{name}_grid.png"), "--cell", "32"]) == 0
    grid8, grid16 = (np.asarray(Image.open(tmp_path / f"{n}_grid.png")) for n in ("gray8", "gray16"))
    assert np.array_equal(grid8, grid16)


def test_relation_figure_layout(tmp_path):
    """A row per (relation, head, query): image | teacher | gap | student | colorbar, titled on top, the
    two maps on the row's one colour scale, which its colorbar shows; a visible gap before the student."""
    import matplotlib.pyplot as plt

    from tinymim.evaluate.visualize import relation_figure

    tasks.run("distill", tiny_distill_config(max_steps=1), tmp_path / "run")
    SyntheticImages(1, 48).load(0)[0].save(tmp_path / "img.png")
    fig = relation_figure(tmp_path / "run", tmp_path / "img.png", relations=("qk", "vv"), heads=(0, 2),
                          queries=(1, 36))
    kinds = ("image", "teacher", "student", "colorbar")
    by_kind = {k: [ax for ax in fig.axes if ax.get_label() == k] for k in kinds}
    assert [len(by_kind[k]) for k in kinds] == [8, 8, 8, 8] and len(fig.axes) == 32
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[:3] == ["image\n(query outlined)", "teacher\nblock 3", "student\nlast block"]
    assert [ax.get_ylabel() for ax in by_kind["image"]] == [
        f"{rel}, head {h}\nquery {q}" for rel in ("QK", "VV") for h in (0, 2) for q in (1, 36)]
    for image, teacher, student, bar in zip(*by_kind.values()):
        t, s = teacher.get_images()[0], student.get_images()[0]
        vmax = max(t.get_array().max(), s.get_array().max())
        assert t.get_clim() == s.get_clim() == (0, vmax)  # one scale for both maps ...
        assert bar.get_ylim() == (0, vmax)  # ... the one the colorbar shows
        gap = student.get_position().x0 - teacher.get_position().x1
        assert gap > 2 * (teacher.get_position().x0 - image.get_position().x1) > 0
        assert len(image.patches) == len(teacher.patches) == len(student.patches) == 1  # the query outlined
    plt.close(fig)


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
