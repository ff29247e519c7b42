"""The public API: what `import tinymim` offers, and the README's own-training-loop snippet, run as is."""
import re
from pathlib import Path

import pytest
import torch

import tinymim

README = Path(__file__).resolve().parents[1] / "docs" / "export.md"  # its own-training-loop snippet


def readme_snippet() -> str:
    section = README.read_text().split("## In your own training loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_every_public_name_resolves():
    for name in tinymim.__all__:
        assert getattr(tinymim, name) is not None, name
    with pytest.raises(AttributeError):
        tinymim.no_such_thing  # noqa: B018


@pytest.mark.slow  # 30 steps of the shipped 128-wide teacher and a 64-wide student
def test_readme_snippet_distills_and_the_loss_goes_down(tmp_path, monkeypatch, capsys):
    code = readme_snippet()
    assert len(code.strip().splitlines()) <= 22
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/export.md", "exec"), scope)
    history = scope["history"]
    assert len(history) == 30 and history[-1] < 0.6 * history[0]
    assert "relation loss" in capsys.readouterr().out
    # the saved student is a plain timm ViT; the teacher stayed frozen and unchanged
    student = torch.load(tmp_path / "student.pt", weights_only=True)
    assert "blocks.3.attn.qkv.weight" in student
    distill = scope["distill"]
    assert not any(p.requires_grad for p in distill.teacher.parameters())
    assert distill.student.vit.blocks[-1].attn.num_heads == 4 and distill.student.vit.blocks[0].attn.num_heads == 2


def test_wrappers_match_the_distill_task(tmp_path):
    """RelationDistillation computes the same loss as the distill task's student for the same weights."""
    from conftest import tiny_distill_config

    from tinymim.tasks.distill import build_distill_task

    cfg = tiny_distill_config()
    cfg.student.drop_path_rate = 0.0
    task = build_distill_task(cfg).eval()
    distill = tinymim.RelationDistillation(task.teacher.vit, task.student, target_block=cfg.teacher.target_block
                                           or len(task.teacher.vit.blocks)).eval()
    from tinymim.data.pretrain import normalize

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)  # the task normalizes on the device
    x = normalize(images.float() / 255, cfg.data.mean, cfg.data.std)
    with torch.no_grad():
        ours = distill(x)
        theirs = task({"image": images, "jitter": torch.ones(4, 3),  # factors 1: no color jitter
                       "jitter_order": torch.arange(3).repeat(4, 1)})
    assert ours["loss"].item() == pytest.approx(theirs["loss_relation"].item(), rel=1e-5)


def test_tasks_run_from_python(tmp_path):
    from conftest import MICRO_DISTILL

    cfg = tinymim.load_config("distill", None, MICRO_DISTILL)
    last = tinymim.run("distill", cfg, tmp_path / "run")
    assert last["step"] == 2 and (tmp_path / "run" / "student.safetensors").is_file()
    vit = tinymim.load_vit(tmp_path / "run", features="final")  # the whole student (default: the blocks it trained)
    assert vit.embed_dim == 32 and len(vit.blocks) == 2


def _leaves(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in tree.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and k not in ("block_heads",) else {prefix + k}
    return out


def test_config_command_lists_every_key_with_type_and_meaning(capsys):
    from dataclasses import asdict

    from tinymim.cli import main

    assert main(["config", "distill", "--config", "cifar10/distill_micro", "train.epochs=7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    printed = {line.split(" = ", 1)[0] for line in lines}
    cfg = tinymim.load_config("distill", "cifar10/distill_micro")
    assert printed == _leaves(asdict(cfg)) and len(printed) == len(lines)
    text = "\n".join(lines)
    assert "train.epochs = 7" in text and 'teacher.checkpoint = "builtin:cifar10_mae_vit128x6"' in text
    for line in lines:
        meaning = line.split("  # ", 1)[1]
        assert ": " in meaning and meaning.split(": ", 1)[1].strip(), line  # a type, then a meaning


@pytest.mark.parametrize("task", ["distill", "mae", "finetune", "linprobe"])
def test_every_config_key_of_every_task_has_a_meaning(task):
    from tinymim.core.config_docs import describe

    cfg = tinymim.load_config(task, None, ["data.name=synthetic"])
    undocumented = [key for key, _, _, doc in describe(type(cfg), cfg) if not doc]
    assert undocumented == []
