"""Every shipped recipe loads, and every teacher/student pair in it fits (built on the meta device)."""
from pathlib import Path

import pytest
import torch

from tinymim.config import RECIPES, ConfigError, load_config
from tinymim.tasks.distill import DistillConfig, build_distill_task
from tinymim.tasks.mae import MAEConfig, build_mae_task

ALL = sorted(RECIPES.glob("*/*.yaml"))


def test_recipes_exist():
    names = {str(p.relative_to(RECIPES)) for p in ALL}
    assert {"imagenet/distill_vit_base_from_mae_large.yaml", "imagenet/distill_vit_small_from_mae_base.yaml",
            "imagenet/distill_vit_tiny_from_tinymim_small.yaml", "cifar10/distill_micro.yaml",
            "cifar10/mae_micro.yaml"} <= names


def _kind(recipe: Path):
    from tinymim.tasks.finetune import FinetuneConfig, build_finetune_task

    prefix = recipe.stem.split("_")[0]
    return {"distill": (DistillConfig, build_distill_task, ["teacher.checkpoint=null"]),
            "mae": (MAEConfig, build_mae_task, []),
            "finetune": (FinetuneConfig, build_finetune_task, ["init=null", "num_classes=10"])}[prefix]


@pytest.mark.parametrize("recipe", ALL, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_builds(recipe: Path):
    kind, build, overrides = _kind(recipe)
    cfg = load_config(kind, recipe, overrides)
    with torch.device("meta"):
        task = build(cfg)
    if kind is DistillConfig:
        assert cfg.loss.relation.relations == ["qk", "vv"] and cfg.loss.relation.softmax
        teacher_heads = task.teacher.vit.blocks[cfg.teacher.target_block - 1].attn.num_heads
        assert task.student.blocks[-1].attn.num_heads == teacher_heads


def test_paper_pairs():
    """The paper's table: target block and the student's relation-block heads."""
    expected = {"distill_vit_base_from_mae_large": (18, 16), "distill_vit_small_from_mae_base": (12, 12)}
    for name, (block, heads) in expected.items():
        cfg = load_config(DistillConfig, f"imagenet/{name}", ["teacher.checkpoint=null", "teacher.target_block=null"])
        with torch.device("meta"):
            task = build_distill_task(cfg)
        assert cfg.teacher.target_block == block  # filled in by default for the paper's pairs
        assert task.student.blocks[-1].attn.num_heads == heads


def test_builtin_recipe_names_resolve():
    cfg = load_config(DistillConfig, "cifar10/distill_micro")
    assert cfg.student.embed_dim == 64
    with pytest.raises(ConfigError, match="not found.*cifar10/distill_micro"):
        load_config(DistillConfig, "cifar10/nope")
