"""The student is set up as the public release sets it up (docs/method.md sections 2-3): MAE's fixed
sin-cos position embedding, MAE's init, ViT-T's pre-training heads, and declared head pairings."""
import logging

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_distill_config, tiny_vit
from safetensors.torch import load_file

import tinymim.tasks as tasks
from tinymim.core.config import load_config
from tinymim.models.vit import ModelConfig, create_vit
from tinymim.tasks.distill import build_distill_task
from tinymim.tasks.distill_config import DistillConfig


def mae_sincos_reference(dim: int, grid: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed (models/pos_embed.py of the MAE repository), restated in numpy:
    a zero row for the class token, then per patch [sin, cos] of the column, then of the row."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    table = np.concatenate([one_axis(dim // 2, w), one_axis(dim // 2, h)], axis=1)
    return np.concatenate([np.zeros([1, dim]), table], axis=0)


def test_student_pos_embed_is_mae_sincos_and_never_trained(tmp_path):

    cfg = tiny_distill_config(max_steps=3, weight_decay=0.5, blr=1e-2)
    task = build_distill_task(cfg)
    expected = torch.from_numpy(mae_sincos_reference(48, 8)).float()
    pos = task.student.pos_embed
    assert pos.shape == (1, 65, 48) and not pos.requires_grad
    torch.testing.assert_close(pos[0], expected, atol=1e-6, rtol=0)

    tasks.run("distill", cfg, str(tmp_path / "run"))  # a few steps with a large lr and weight decay
    trained = load_file(str(tmp_path / "run" / "student.safetensors"))
    torch.testing.assert_close(trained["pos_embed"][0], expected, atol=1e-6, rtol=0)
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], task.student.blocks[0].attn.qkv.weight.detach())


def test_student_init_statistics_match_mae():
    """ViT-S built from the release's recipe: qkv xavier-uniform over the fused 1152 x 384 matrix
    (std sqrt(2 / (384 + 1152)) = 0.0361), not timm's 0.02; class token std 0.02, not ~1e-6."""
    cfg = load_config(DistillConfig, "imagenet/distill_vit_small_from_mae_base", ["teacher.checkpoint=null"])
    torch.manual_seed(0)
    student = build_distill_task(cfg).student
    qkv = torch.cat([b.attn.qkv.weight.flatten() for b in student.blocks]).std().item()
    assert abs(qkv - 0.0361) / 0.0361 < 0.05, qkv
    fc1 = student.blocks[0].mlp.fc1.weight.std().item()  # 1536 x 384: sqrt(2 / 1920) = 0.0323
    assert abs(fc1 - (2 / 1920) ** 0.5) / (2 / 1920) ** 0.5 < 0.05
    patch = student.patch_embed.proj.weight.std().item()  # as a 384 x 768 linear layer: sqrt(2 / 1152)
    assert abs(patch - (2 / 1152) ** 0.5) / (2 / 1152) ** 0.5 < 0.05
    assert abs(student.cls_token.std().item() - 0.02) < 0.006
    assert all(float(b.attn.qkv.bias.detach().abs().max()) == 0 for b in student.blocks)
    norm = student.blocks[0].norm1
    assert float(norm.weight.detach().min()) == 1 and float(norm.bias.detach().abs().max()) == 0

    timm_default = create_vit(ModelConfig(name="vit_small_patch16_224"))  # the old init, for contrast
    assert timm_default.blocks[0].attn.qkv.weight.std().item() < 0.025
    assert timm_default.pos_embed.requires_grad


def test_vit_tiny_pretrains_with_6_heads_and_12_in_the_relation_block():
    cfg = load_config(DistillConfig, "imagenet/distill_vit_tiny_from_tinymim_small", ["teacher.checkpoint=null"])
    with torch.device("meta"):
        task = build_distill_task(cfg)
    assert [b.attn.num_heads for b in task.student.blocks] == [6] * 11 + [12]
    assert task.student.blocks[-1].attn.head_dim == 16
    from tinymim.tasks.finetune import build_finetune_task
    from tinymim.tasks.finetune_config import FinetuneConfig
    ft = load_config(FinetuneConfig, "imagenet/finetune_vit_tiny", ["init=null", "num_classes=10"])
    with torch.device("meta"):
        model = build_finetune_task(ft).model
    assert [b.attn.num_heads for b in model.blocks] == [3] * 12


def test_main_chain_resolves_the_papers_teacher_heads(tmp_path):
    """MAE ViT-L -> ViT-B: 16; TinyMIM ViT-B -> ViT-S: 12 (although its last block was distilled with
    16); TinyMIM ViT-S -> ViT-T: 12. The ViT-T fine-tuning stage goes back to 3 heads."""
    from tinymim.core.config import from_dict
    from tinymim.pipeline.planning import load, plan

    resolved = {}
    for stage, _, config in plan(load("pipelines/imagenet_main_chain"), tmp_path):
        if stage.task == "distill":
            cfg = from_dict(DistillConfig, {**config, "teacher": {**config["teacher"], "checkpoint": None}})
            with torch.device("meta"):
                task = build_distill_task(cfg)
            assert task.student.blocks[-1].attn.num_heads == task.teacher.heads  # the relation heads
            resolved[stage.name] = (cfg.teacher.target_block, task.teacher.heads)
        elif stage.name == "finetune_vit_tiny":
            assert config["model"]["num_heads"] == 3
    assert resolved == {"tinymim_vit_base": (18, 16), "tinymim_vit_small": (12, 12), "tinymim_vit_tiny": (12, 12)}


@pytest.mark.parametrize("relation_heads", [None, 2, 4])
def test_file_teacher_and_run_dir_teacher_pair_the_same(tmp_path, relation_heads, caplog):
    """A TinyMIM student used as a teacher: its run directory records 4 heads in its relation block
    (block_heads), its weights file records nothing. Both must give the same, declared pairing."""
    first = tiny_distill_config(max_steps=1)
    first.student = tiny_vit(dim=64, depth=2, heads=2)
    first.teacher.model = tiny_vit(dim=64, depth=3, heads=4)
    tasks.run("distill", first, str(tmp_path / "tinymim_teacher"))
    recorded = yaml.safe_load((tmp_path / "tinymim_teacher" / "config.yaml").read_text())
    assert {int(k): v for k, v in recorded["student"]["block_heads"].items()} == {2: 4}

    pairings = []
    for checkpoint in (tmp_path / "tinymim_teacher", tmp_path / "tinymim_teacher" / "student.safetensors"):
        cfg = tiny_distill_config()
        cfg.student = tiny_vit(dim=32, depth=2, heads=2)
        cfg.teacher.model = tiny_vit(dim=64, depth=2, heads=2)
        cfg.teacher.checkpoint = str(checkpoint)
        cfg.teacher.relation_heads = relation_heads
        with caplog.at_level(logging.INFO, logger="tinymim"):
            task = build_distill_task(cfg)
        t_heads = task.teacher.heads
        pairings.append((t_heads, task.student.blocks[-1].attn.num_heads))
        assert f"pairing: teacher block 2 of 2, {t_heads} heads of size {64 // t_heads}" in caplog.text
    assert pairings[0] == pairings[1] == ((relation_heads or 2),) * 2


def test_relation_heads_that_do_not_divide_the_teacher_are_a_config_error():
    from tinymim.core.config import ConfigError

    cfg = tiny_distill_config()
    cfg.teacher.relation_heads = 5
    with pytest.raises(ConfigError, match="relation_heads=5.*64"):
        build_distill_task(cfg)


def test_every_distill_recipe_declares_its_pairing():
    from tinymim.core.config import RECIPES

    for recipe in sorted(RECIPES.glob("*/distill_*.yaml")):
        cfg = load_config(DistillConfig, recipe)
        assert cfg.teacher.target_block is not None and cfg.teacher.relation_heads is not None, recipe.name
