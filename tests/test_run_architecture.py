"""Runs carry their architecture: `init=RUN` in fine-tuning, linear probing and segmentation takes the
run's model sizes over a recipe written for another size (segmentation's pyramid blocks moved with the
depth), keeps a recipe written for the run as it is, and refuses in one line a command-line key that
contradicts the run; a pipeline's init stage follows the same rule; `tinymim export | knn | eval RUN`
rebuild the model from the run alone."""
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from conftest import MICRO_DISTILL, with_overrides
from safetensors.torch import load_file
from test_tar_roots import image_tar

from tinymim.cli import main
from tinymim.core.config import ConfigError
from tinymim.tasks import build_task, load_config

# the run: a 32-wide, 4-block student with 2 heads, patch 8, 32 px
STUDENT = {"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8}


@pytest.fixture(scope="module")
def student_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("arch") / "student"
    assert main(["distill", "--output", str(out), *with_overrides(MICRO_DISTILL, "student.depth=4")]) == 0
    return out


def recipe(tmp_path: Path, name: str, **tree) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def finetune_recipe(tmp_path, **model) -> str:
    """A micro fine-tuning recipe whose model is 48 wide, 6 blocks, 3 heads, patch 8 unless `model` says."""
    return recipe(tmp_path, "finetune", model={"name": "vit_custom", "patch_size": 8, "embed_dim": 48, "depth": 6,
                                                "num_heads": 3, **model},
                  data={"name": "synthetic", "img_size": 32, "synthetic_size": 8, "num_workers": 0,
                        "auto_augment": None, "reprob": 0.0},
                  mixup=0.0, cutmix=0.0,
                  train={"batch_size": 4, "max_steps": 1, "precision": "fp32", "progress": False,
                         "warmup_epochs": 0})


def student_weights(run: Path) -> dict:
    return load_file(run / "student.safetensors")


def test_finetune_takes_the_runs_architecture_over_a_recipe_of_another_size(student_run, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="tinymim"):
        cfg = load_config("finetune", finetune_recipe(tmp_path), [f"init={student_run}"])
    assert {k: getattr(cfg.model, k) for k in STUDENT} == STUDENT
    taken = [r.getMessage() for r in caplog.records if "takes the run's architecture" in r.getMessage()]
    assert len(taken) == 1 and "embed_dim 32" in taken[0] and "depth 4" in taken[0] and "num_heads 2" in taken[0]
    # the run's weights load into it (the recipe's sizes made a key mismatch before)
    backbone = build_task("finetune", cfg).model
    qkv = student_weights(student_run)["blocks.3.attn.qkv.weight"]
    torch.testing.assert_close(backbone.blocks[3].attn.qkv.weight, qkv, rtol=0, atol=0)


def test_a_recipe_written_for_the_run_keeps_its_head_count(student_run, tmp_path, caplog):
    """Heads do not change the weights: a recipe of the run's shapes with other heads is a choice."""
    shaped = finetune_recipe(tmp_path, embed_dim=32, depth=4, num_heads=4)
    with caplog.at_level(logging.INFO, logger="tinymim"):
        cfg = load_config("finetune", shaped, [f"init={student_run}"])
    assert cfg.model.num_heads == 4
    assert not [r for r in caplog.records if "takes the run's architecture" in r.getMessage()]
    # a head count given on the command line is kept too, the rest taken from the run
    cfg = load_config("finetune", finetune_recipe(tmp_path), [f"init={student_run}", "model.num_heads=4"])
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads) == (32, 4, 4)


@pytest.mark.parametrize("override, said", [
    ("model.embed_dim=48", "model.embed_dim=48 but the run {run} was trained with embed_dim 32"),
    ("model.depth=6", "model.depth=6 but the run {run} was trained with depth 4"),
    ("model.name=vit_tiny_patch16_224", "model.name=vit_tiny_patch16_224) has"),
])
def test_a_key_that_contradicts_the_run_is_one_line_and_nothing_is_written(student_run, tmp_path, capsys, override,
                                                                             said):
    out = tmp_path / "run"
    code = main(["finetune", "--config", finetune_recipe(tmp_path), "--output", str(out), f"init={student_run}",
                 override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and said.format(run=student_run) in err[0], err
    assert "drop the override" in err[0]
    assert not out.exists()


def test_linear_probe_takes_the_runs_architecture(student_run, tmp_path):
    probe = recipe(tmp_path, "probe", model={"name": "vit_small_patch16_224"},
                   data={"name": "synthetic", "img_size": 32, "synthetic_size": 8, "num_workers": 0})
    cfg = load_config("linprobe", probe, [f"init={student_run}"])
    assert {k: getattr(cfg.model, k) for k in STUDENT} == STUDENT
    backbone = build_task("linprobe", cfg).probe.backbone
    torch.testing.assert_close(backbone.blocks[0].attn.qkv.weight,
                               student_weights(student_run)["blocks.0.attn.qkv.weight"], rtol=0, atol=0)


def test_segmentation_takes_the_runs_architecture_and_moves_its_pyramid_blocks(student_run, tmp_path, caplog):
    seg = recipe(tmp_path, "seg", model={"name": "vit_custom", "patch_size": 8, "embed_dim": 48, "depth": 6,
                                         "num_heads": 3},
                 blocks=[2, 3, 4, 6], channels=16, aux_channels=8, data={"crop_size": 32, "num_classes": 3})
    with caplog.at_level(logging.INFO, logger="tinymim"):
        cfg = load_config("segment", seg, [f"init={student_run}"])
    assert {k: getattr(cfg.model, k) for k in STUDENT} == STUDENT
    assert cfg.blocks == [1, 2, 3, 4]  # the same fractions of 4 blocks as 2, 3, 4, 6 of 6
    assert any("blocks [1, 2, 3, 4]" in r.getMessage() for r in caplog.records)
    segmenter = build_task("segment", cfg).model
    torch.testing.assert_close(segmenter.pyramid.vit.blocks[2].attn.qkv.weight,
                               student_weights(student_run)["blocks.2.attn.qkv.weight"], rtol=0, atol=0)
    # blocks given on the command line are the user's: checked against the run's depth, not moved
    with pytest.raises(ConfigError, match=r"blocks=\[2, 3, 4, 6\]: four different backbone blocks in 1..4"):
        build_task("segment", load_config("segment", seg, [f"init={student_run}", "blocks=[2,3,4,6]"]))


def test_a_pipeline_init_stage_follows_the_same_rule(tmp_path):
    from tinymim.pipeline.planning import PipelineConfig, StageConfig, plan

    distill = StageConfig(name="student", task="distill", overrides=with_overrides(MICRO_DISTILL, "student.depth=4"))
    finetune = StageConfig(name="ft", task="finetune", config=finetune_recipe(tmp_path), init="student")
    planned = plan(PipelineConfig(stages=[distill, finetune]), tmp_path / "pipe")
    model = planned[1][2]["model"]
    assert {k: model[k] for k in STUDENT} == STUDENT
    finetune.overrides = ["model.embed_dim=48"]
    with pytest.raises(ConfigError, match="model.embed_dim=48 but the run .*student was trained with embed_dim 32"):
        plan(PipelineConfig(stages=[distill, finetune]), tmp_path / "pipe")


def test_export_knn_and_eval_rebuild_the_model_from_the_run(student_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TINYMIM_CACHE", str(tmp_path / "cache"))
    # the whole student (by default a distilled student leaves out its relation block, which distillation
    # trained only through its attention maps)
    assert main(["export", str(student_run), "--output", str(tmp_path / "timm"), "--features", "final"]) == 0
    exported = json.loads((tmp_path / "timm" / "config.json").read_text())["model_args"]
    assert {k: exported[k] for k in ("embed_dim", "depth", "patch_size")} == {"embed_dim": 32, "depth": 4,
                                                                              "patch_size": 8}
    train, test = image_tar(tmp_path / "train.tar", "train"), image_tar(tmp_path / "test.tar", "test")
    capsys.readouterr()
    assert main(["knn", str(student_run), "--data", str(train), "--val", str(test), "--k", "2",
                 "--workers", "0"]) == 0
    assert "6 queries, bank of 6" in capsys.readouterr().out
    # a fine-tuning run from the student, on the tars; `tinymim eval` scores it from its directory alone
    # (on the test tar as it is)
    ft = tmp_path / "ft"
    assert main(["finetune", "--config", finetune_recipe(tmp_path), "--output", str(ft), f"init={student_run}",
                 "data.name=folder", f"data.root={train}", f"data.val_root={test}"]) == 0
    assert yaml.safe_load((ft / "config.yaml").read_text())["model"]["embed_dim"] == 32
    capsys.readouterr()
    assert main(["eval", str(ft), "--data", str(test), "--workers", "0", "--no-progress"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_a_template_of_another_size_takes_the_runs_image_size_unless_one_is_given(student_run, tmp_path):
    # the run was trained at 32 px; a recipe of another size written for 64 px (the ImageNet defaults: 224)
    template = finetune_recipe(tmp_path)
    tree = yaml.safe_load(Path(template).read_text())
    tree["data"]["img_size"] = 64
    Path(template).write_text(yaml.safe_dump(tree))
    assert load_config("finetune", template, [f"init={student_run}"]).data.img_size == 32
    assert load_config("finetune", None, [f"init={student_run}"]).data.img_size == 32  # no recipe: not 224
    assert load_config("finetune", template, [f"init={student_run}", "data.img_size=48"]).data.img_size == 48
    # a recipe written for the run keeps its own size: fine-tuning at another resolution is a choice
    own = finetune_recipe(tmp_path, **STUDENT)
    tree = yaml.safe_load(Path(own).read_text())
    tree["data"]["img_size"] = 64
    Path(own).write_text(yaml.safe_dump(tree))
    assert load_config("finetune", own, [f"init={student_run}"]).data.img_size == 64
