"""Every shipped recipe loads, and every teacher/student pair in it fits (built on the meta device)."""
from pathlib import Path

import pytest
import torch

from tinymim.core.config import RECIPES, ConfigError, load_config
from tinymim.tasks.distill import build_distill_task
from tinymim.tasks.distill_config import DistillConfig, resolve

PIPELINES = sorted(RECIPES.glob("pipelines/*.yaml"))
# _-prefixed files (_base) are fragments
ALL = sorted(p for p in set(RECIPES.glob("*/*.yaml")) - set(PIPELINES) if not p.name.startswith("_"))


def test_recipes_exist():
    names = {str(p.relative_to(RECIPES)) for p in ALL}
    assert {"imagenet/distill_vit_base_from_mae_large.yaml", "imagenet/distill_vit_small_from_mae_base.yaml",
            "imagenet/distill_vit_tiny_from_tinymim_small.yaml", "cifar10/distill_micro.yaml",
            "cifar10/mae_micro.yaml"} <= names


def _kind(recipe: Path):
    """(config class, builder, overrides that need no files) of a recipe, by its task (the file name's prefix)."""
    from tinymim.tasks import TASKS

    task = recipe.stem.split("_")[0]
    overrides = {"distill": ["teacher.checkpoint=null"],
                 "finetune": ["init=null", "num_classes=10", "distillation.teacher=null"]}.get(task, [])
    return TASKS[task].config, TASKS[task].build, overrides


@pytest.mark.parametrize("recipe", ALL, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_builds(recipe: Path):
    kind, build, overrides = _kind(recipe)
    cfg = load_config(kind, recipe, overrides)
    with torch.device("meta"):
        task = build(cfg)
    if kind is DistillConfig and cfg.loss.relation.weight > 0:
        teacher_heads = task.teacher.heads  # the relation heads the teacher's block is split into
        assert task.student.blocks[-1].attn.num_heads == teacher_heads


def test_paper_pairs():
    """The paper's table: target block and the student's relation-block heads."""
    expected = {"distill_vit_base_from_mae_large": (18, 16), "distill_vit_small_from_mae_base": (12, 12)}
    for name, (block, heads) in expected.items():
        cfg = load_config(DistillConfig, f"imagenet/{name}", ["teacher.checkpoint=null", "teacher.target_block=null"])
        with torch.device("meta"):
            task = build_distill_task(cfg)
        assert resolve(cfg).teacher.target_block == block  # filled in by default for the paper's pairs
        assert task.config.teacher.target_block == block and cfg.teacher.target_block is None  # built, not changed
        assert task.student.blocks[-1].attn.num_heads == heads


def test_builtin_recipe_names_resolve():
    cfg = load_config(DistillConfig, "cifar10/distill_micro")
    assert cfg.student.embed_dim == 64
    with pytest.raises(ConfigError, match="not found.*cifar10/distill_micro"):
        load_config(DistillConfig, "cifar10/nope")


def test_ablation_rows_differ_from_the_default_only_where_they_say():
    from tinymim.core.config import diff_configs, to_dict

    default = to_dict(load_config(DistillConfig, "ablations/distill_relation_default"))
    assert default["train"]["epochs"] == 100 and default["teacher"]["target_block"] == 18
    expected = {"distill_teacher_block_21": ["teacher.target_block"],
                "distill_input_masked": ["mask_ratio"],
                "distill_drop_path_01_01": ["teacher.drop_path_rate"],
                "distill_feature_qkv": ["loss.feature.site", "loss.feature.weight", "loss.relation.weight"],
                "distill_relations_qq_kk_vv_no_softmax": ["loss.relation.relations", "loss.relation.softmax"]}
    for name, keys in expected.items():
        row = to_dict(load_config(DistillConfig, f"ablations/{name}"))
        assert list(diff_configs(default, row)) == keys, name


@pytest.mark.parametrize("recipe", PIPELINES, ids=lambda p: p.stem)
def test_pipeline_recipes_plan(recipe: Path, tmp_path):
    from tinymim.pipeline.planning import load, plan

    stages = plan(load(recipe), tmp_path)
    assert stages
    for stage, overrides, config in stages:
        if stage.teacher:  # wired to the earlier stage, with its architecture
            assert config["teacher"]["checkpoint"] == str(tmp_path / stage.teacher)
        if stage.init:
            assert config["init"] == str(tmp_path / stage.init)


def test_recipe_base_merges_and_cycles_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: cifar10/distill_micro\ntrain: {epochs: 2}\nmask_ratio: 0.5\n")
    cfg = load_config(DistillConfig, tmp_path / "a.yaml")
    assert cfg.train.epochs == 2 and cfg.mask_ratio == 0.5
    assert cfg.train.batch_size == 256 and cfg.student.embed_dim == 64  # the rest from the base
    (tmp_path / "b.yaml").write_text("base: c.yaml\n")
    (tmp_path / "c.yaml").write_text("base: b\n")
    with pytest.raises(ConfigError, match="its own base"):
        load_config(DistillConfig, tmp_path / "b.yaml")
