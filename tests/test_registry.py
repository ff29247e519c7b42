"""The task registry: what each task declares, resolve-then-build, and the one path from a run
directory to its trained model (`tinymim.tasks.load_trained`)."""
import copy
import json
from dataclasses import asdict

import pytest
import torch
from conftest import tiny_distill_config, tiny_vit
from safetensors.torch import load_file

import tinymim.tasks as tasks
from tinymim.core.config import load_config
from tinymim.models.checkpoint import CheckpointError
from tinymim.models.vit import TEACHER_FAMILIES, ModelConfig, create_vit, vit_sizes
from tinymim.tasks.finetune_config import FinetuneConfig


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_large_patch16_224",
                                  "vit_base_patch14_reg4_dinov2", "vit_small_patch16_224:depth=4",
                                  "vit_custom:depth=2,embed_dim=48,num_heads=3,patch_size=4",
                                  "vit_custom:depth=2,embed_dim=48,num_heads=3,patch_size=14,reg_tokens=4",
                                  "vit_base_patch16_siglip_224", "eva02_base_patch14_224.mim_in22k",
                                  "vit_small_patch16_dinov3"])
def test_vit_sizes_are_the_built_models(name):
    """Read without building; the reference is the model built on the meta device."""
    base, _, given = name.partition(":")
    sizes = {k: int(v) for k, v in (kv.split("=") for kv in given.split(",") if kv)}
    cfg = ModelConfig(name=base, **sizes)
    with torch.device("meta"):
        model = create_vit(cfg, families=TEACHER_FAMILIES)
    cls = model.cls_token is not None
    assert vit_sizes(cfg, TEACHER_FAMILIES) == {
        "depth": len(model.blocks), "embed_dim": model.embed_dim, "num_heads": model.blocks[0].attn.num_heads,
        "patch_size": model.patch_embed.patch_size[0], "reg_tokens": model.num_prefix_tokens - cls,
        "class_token": cls}


def test_every_task_declares_its_objects():
    for name, spec in tasks.TASKS.items():
        assert spec.name == name and spec.task.name == name
        assert isinstance(tasks.load_config(name), spec.config)
        assert spec.weights.endswith(".safetensors")
    with pytest.raises(Exception, match="unknown task 'nope'; tasks: distill, mae"):
        tasks.load_config("nope")


def test_resolve_fills_derived_keys_and_leaves_its_input_alone():
    cfg = tiny_distill_config()
    before = copy.deepcopy(cfg)
    resolved = tasks.TASKS["distill"].resolve(cfg)
    assert cfg == before  # pure: the caller's config is not touched
    assert resolved.student.img_size == resolved.teacher.model.img_size == 32
    assert resolved.teacher.target_block == 3 and resolved.teacher.relation_heads == 4  # the last block, its heads
    assert resolved.student.block_heads == {2: 4}  # the student's relation block takes the teacher's heads
    assert tasks.TASKS["distill"].resolve(resolved) == resolved  # resolving twice changes nothing
    task = tasks.build_task("distill", cfg)  # the builder resolves too, without changing `cfg`
    assert cfg == before and task.config == resolved
    assert task.student.blocks[-1].attn.num_heads == 4 and len(task.teacher.vit.blocks) == 3


def test_a_run_resolves_its_config_once(tmp_path, monkeypatch):
    """The engine resolves; the builder trusts a resolved config that has not changed since, and resolves
    again one that has."""
    import tinymim.tasks.distill_config as distill_config

    sizes_read = []
    real_vit_sizes = distill_config.vit_sizes
    monkeypatch.setattr(distill_config, "vit_sizes", lambda *a, **k: sizes_read.append(1) or real_vit_sizes(*a, **k))
    tasks.run("distill", tiny_distill_config(max_steps=1), tmp_path / "run")
    once = len(sizes_read)
    assert once > 0
    sizes_read.clear()
    tasks.TASKS["distill"].resolve(tiny_distill_config())
    assert len(sizes_read) == once  # a run reads the models' sizes as often as one resolve does
    resolved = tasks.TASKS["distill"].resolve(tiny_distill_config())
    assert tasks.TASKS["distill"].resolve(resolved) is resolved
    changed = copy.deepcopy(resolved)
    changed.student.img_size = None  # a derived key emptied after resolving: filled again
    again = tasks.TASKS["distill"].resolve(changed)
    assert again is not changed and again.student.img_size == 32 and changed.student.img_size is None


def test_a_run_records_its_resolved_config(tmp_path):
    from tinymim.core.rundir import RunDir

    cfg = tiny_distill_config(max_steps=1)
    tasks.run("distill", cfg, tmp_path / "run")
    stored = RunDir(tmp_path / "run").stored_config()
    expected = json.loads(json.dumps(asdict(tasks.TASKS["distill"].resolve(cfg))))  # as YAML keeps it
    assert stored["teacher"] == expected["teacher"] and stored["student"] == expected["student"]


def test_load_trained_gives_the_weights_the_run_wrote(tmp_path):
    tasks.run("distill", tiny_distill_config(max_steps=2), tmp_path / "distill")
    trained = tasks.load_trained(tmp_path / "distill")
    assert trained.task == "distill" and trained.weights.name == "student.safetensors"
    assert not trained.model.training
    written = load_file(str(trained.weights))
    state = trained.model.state_dict()
    assert set(state) == set(written)
    assert all(torch.equal(state[k], written[k]) for k in written)
    assert trained.model.blocks[-1].attn.num_heads == 4  # the relation block as trained


def test_load_trained_classifier_best_and_last(tmp_path):
    cfg = load_config(FinetuneConfig, None, [
        "model.name=vit_custom", "model.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "data.name=synthetic", "data.img_size=32", "data.synthetic_size=64", "data.num_workers=0",
        "mixup=0", "cutmix=0", "train.batch_size=16", "train.max_steps=2", "train.precision=fp32",
        "train.progress=false", "train.warmup_epochs=0"])
    tasks.run("finetune", cfg, tmp_path / "ft")
    last = tasks.load_trained(tmp_path / "ft")
    assert last.weights.name == "model.safetensors" and last.config.num_classes == 10
    x = torch.randn(2, 3, 32, 32)
    reference = create_vit(last.config.model, num_classes=10, global_pool=last.config.global_pool,
                           fc_norm=last.config.global_pool == "avg")
    reference.load_state_dict(load_file(str(last.weights)))
    with torch.no_grad():
        assert torch.allclose(last.model(x), reference.eval()(x))
    best = tasks.load_trained(tmp_path / "ft", best=True)
    assert best.weights.name in ("model.safetensors", "best.safetensors")


def test_load_trained_refuses_what_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a tinymim run directory.*--output folder"):
        tasks.load_trained(tmp_path / "empty")
    cfg = tiny_distill_config(max_steps=1)
    cfg.teacher.model = tiny_vit(dim=64, depth=3, heads=4)
    tasks.run("distill", cfg, tmp_path / "distill")
    from tinymim.tasks.base import load_run_model

    with pytest.raises(CheckpointError, match="is a tinymim distill run, not a finetune run"):
        load_run_model(tasks.TASKS["finetune"], tmp_path / "distill")


def test_a_run_still_training_gives_its_latest_checkpoint(tmp_path):
    """latest=True reads the student out of last.pt's trainable state (what visualize shows mid-run);
    the reference: the final weights file, written from the same state."""
    from tinymim.tasks.base import load_run_model

    tasks.run("distill", tiny_distill_config(max_steps=2), tmp_path / "run")
    final = load_file(str(tmp_path / "run" / "student.safetensors"))
    (tmp_path / "run" / "student.safetensors").unlink()  # as if it had not finished
    with pytest.raises(CheckpointError, match="holds no weights yet"):
        tasks.load_trained(tmp_path / "run")
    trained = load_run_model(tasks.TASKS["distill"], tmp_path / "run", latest=True)
    assert trained.weights.name == "last.pt"
    state = trained.model.state_dict()
    assert set(state) == set(final) and all(torch.equal(state[k], final[k]) for k in final)
