"""tinymim.RelationDistillationTask, a timm.task.TrainingTask: the loss and every gradient of `tinymim distill`
on the same batch and weights, a few optimizer steps of a timm-style loop, the teacher's normalization through
timm's DistillationTeacher, and the docs' example run as written."""
import copy
import logging
import re
from pathlib import Path

import pytest
import timm.optim
import torch
from timm.task import DistillationTeacher, TrainingTask

import tinymim
from tinymim.data.pretrain import normalize
from tinymim.models.distillation import RelationDistillation
from tinymim.tasks.distill import build_distill_task

DOCS = Path(__file__).resolve().parents[1] / "docs" / "export.md"
# a 48-wide 2-block student (3 heads: its last block takes the teacher's 4) of block 2 of a 64-wide 3-block teacher
TINY = ["student.name=vit_custom", "student.img_size=32", "student.patch_size=4", "student.embed_dim=48",
        "student.depth=2", "student.num_heads=3", "student.drop_path_rate=0", "teacher.model.name=vit_custom",
        "teacher.model.img_size=32", "teacher.model.patch_size=4", "teacher.model.embed_dim=64",
        "teacher.model.depth=3", "teacher.model.num_heads=4", "teacher.target_block=2", "data.name=synthetic",
        "data.img_size=32", "data.color_jitter=0", "train.precision=fp32"]


def distill_task_and_ours():
    """`tinymim distill`'s task from TINY, and a RelationDistillationTask of copies of its two ViTs."""
    torch.manual_seed(0)
    cfg = tinymim.load_config("distill", None, TINY)
    task = build_distill_task(cfg)
    student = tinymim.create_vit(task.config.student)  # a fresh one: nothing frozen by the distill task
    student.load_state_dict(task.student.state_dict())
    ours = tinymim.RelationDistillationTask(student, copy.deepcopy(task.teacher.vit), target_block=2, verbose=False)
    return cfg, task, ours


def test_loss_and_every_gradient_equal_the_distill_task():
    cfg, task, ours = distill_task_and_ours()
    assert isinstance(ours, TrainingTask) and isinstance(ours.teacher, DistillationTeacher)
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    theirs = task.train()({"image": images})  # the task normalizes on the device; color jitter is off
    result = ours.train()(normalize(images.float() / 255, cfg.data.mean, cfg.data.std), torch.zeros(4).long())
    assert cfg.loss.relation.weight == 1 and result["loss"].item() > 0
    assert torch.equal(result["loss"], theirs["loss"])  # the same operations in the same order: to the bit
    assert result["output"].shape == (3, 4, 4, 65, 12)  # Q/K/V x batch x 4 relation heads x 65 tokens x 12
    theirs["loss"].backward()
    result["loss"].backward()
    grads = {name: p.grad for name, p in task.trainable_module.named_parameters() if p.grad is not None}
    ours_grads = {name: p.grad for name, p in ours.trainable_module.named_parameters() if p.grad is not None}
    assert "vit.blocks.1.attn.qkv.weight" in grads and "vit.cls_token" in grads
    assert sorted(ours_grads) == sorted(grads)  # both students under "vit.": the same names
    assert all(torch.equal(ours_grads[name], grads[name]) for name in grads)
    trained = sorted(n for n, p in ours.trainable_module.named_parameters() if p.requires_grad)
    assert trained == sorted(grads)  # what gets no gradient is frozen, as the distill task freezes it
    assert not any(p.requires_grad or p.grad is not None for p in ours.teacher.parameters())


def test_a_timm_style_loop_trains_the_student_only():
    _, _, task = distill_task_and_ours()
    optimizer = timm.optim.create_optimizer_v2(task.get_trainable_module(), "adamw", lr=1e-3, weight_decay=0.05)
    teacher_before = copy.deepcopy(task.teacher.state_dict())
    student = task.get_eval_model()
    student_before = copy.deepcopy(student.state_dict())
    images, labels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.zeros(8).long()
    task.train()
    losses = []
    for _ in range(3):
        result = task(images, labels)
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        losses.append(result["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(torch.equal(v, teacher_before[k]) for k, v in task.teacher.state_dict().items())
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])}
    assert "blocks.1.attn.qkv.weight" in changed and "blocks.1.mlp.fc1.weight" not in changed
    # timm's checkpoint state is the plain student ViT's
    assert set(task.get_checkpoint_state()["state_dict"]) == set(student_before)


def test_under_ddp_the_student_trains_without_unused_parameters(tmp_path):
    """Wrapped in DDP (one gloo process), two steps run without find_unused_parameters (the parts no relation
    reaches are frozen) and give the unwrapped task's gradients; checkpoints still hold the plain ViT."""
    import torch.distributed as dist

    _, _, task = distill_task_and_ours()
    plain = copy.deepcopy(task)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        task.prepare_distributed()
        for _ in range(2):  # DDP finds a parameter without a gradient at the second step
            task.zero_grad()
            task(images)["loss"].backward()
    finally:
        dist.destroy_process_group()
    plain(images)["loss"].backward()
    grads = dict(plain.get_eval_model().named_parameters())
    for name, p in task.get_eval_model().named_parameters():
        assert (p.grad is None) == (grads[name].grad is None), name
        assert p.grad is None or torch.equal(p.grad, grads[name].grad), name
    assert set(task.get_checkpoint_state()["state_dict"]) == set(plain.get_eval_model().state_dict())


def test_the_teacher_sees_its_own_normalization():
    """A DistillationTeacher of a model whose pretrained config has other mean/std than the student's: the
    student's inputs are converted to the teacher's, as normalizing the pixels with its mean/std does."""
    _, task, _ = distill_task_and_ours()
    teacher_vit, student = copy.deepcopy(task.teacher.vit), copy.deepcopy(task.student)
    cifar = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.247, 0.2435, 0.2616)}
    teacher_vit.pretrained_cfg = dict(cifar)
    reference = RelationDistillation(copy.deepcopy(teacher_vit), copy.deepcopy(student), target_block=2)
    ours = tinymim.RelationDistillationTask(student, DistillationTeacher(teacher_vit), target_block=2, verbose=False)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    imagenet = normalize(pixels, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # the student's (no pretrained cfg)
    with torch.no_grad():
        expected = reference.loss(reference.teacher.qkv(normalize(pixels, cifar["mean"], cifar["std"])),
                                  reference.student(imagenet))["loss"]
        wrong = reference(imagenet)["loss"]  # the teacher fed the student's normalization
        got = ours(imagenet)["loss"]
    # the conversion (x * std + mean - mean') / std' rounds differently from normalizing the pixels
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=0)
    assert abs(wrong.item() - expected.item()) > 100 * abs(got.item() - expected.item())


def docs_example() -> str:
    section = DOCS.read_text().split("## Pre-training inside a timm training loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_docs_example_runs_as_written(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)  # it saves student.pt where it runs
    scope: dict = {}
    with caplog.at_level(logging.INFO, logger="tinymim"):
        exec(compile(docs_example(), "docs/export.md", "exec"), scope)
    assert "teacher block 6 in" in caplog.text  # the pairing it was built with
    history = scope["history"]
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(history)))
    assert "relation loss" in capsys.readouterr().out
    student = torch.load(tmp_path / "student.pt", weights_only=True)  # the plain ViT, all of its blocks
    assert "blocks.3.attn.qkv.weight" in student and not any(k.startswith("vit.") for k in student)
