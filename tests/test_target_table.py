"""Adding a distillation target: a dummy one, patch-token cosine against the teacher's block output,
registered in this file only, trains a step through the distill task.

A real addition touches 2 files, and nothing else in the package:
1. src/tinymim/method/targets.py: the target class (the block features it reads, the student parts it
   keeps trainable, its loss) and its row in TARGETS;
2. src/tinymim/tasks/distill_config.py: its config section (a dataclass with a `weight`) and that
   section's field on DistillLossConfig.
Building it, freezing what no target keeps, the weighted sum and its logged name, the teacher's
features, the parts exports call untrained and the no-target check all follow from the table. Here
the test stands in for both files: the class is registered in TARGETS with monkeypatch, and its
section added by a subclass of DistillLossConfig (and of DistillConfig, whose `loss` it types).
"""
import json
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tiny_distill_config

import tinymim.tasks as tasks
from tinymim.core.config import ConfigError, checked_copy
from tinymim.method import targets
from tinymim.method.targets import Pairing, Target, TargetInputs
from tinymim.models.features import target_sites, untrained_parts
from tinymim.tasks.distill import build_distill_task
from tinymim.tasks.distill_config import DistillConfig, DistillLossConfig
from tinymim.train.distributed import seed_everything


class PatchCosineTarget(Target):
    """1 - cosine similarity between the projected student patch tokens and the teacher's, at the block output."""

    def __init__(self, cfg, pairing: Pairing):
        super().__init__()
        self.proj = nn.Linear(pairing.student_dim, pairing.teacher_dim)

    @classmethod
    def sites(cls, cfg) -> frozenset[str]:
        return frozenset({"block"})

    def loss(self, inputs: TargetInputs) -> dict[str, torch.Tensor]:
        s, t = self.proj(inputs.student["block"][:, 1:]), inputs.teacher["block"][:, 1:]
        return {"loss": 1 - F.cosine_similarity(s, t, dim=-1).mean()}


@dataclass
class PatchCosineLossConfig:
    weight: float = 0.0  # 0 = off


@dataclass
class LossWithPatchCosine(DistillLossConfig):
    patch_cosine: PatchCosineLossConfig = field(default_factory=PatchCosineLossConfig)


@dataclass
class ConfigWithPatchCosine(DistillConfig):
    loss: LossWithPatchCosine = field(default_factory=LossWithPatchCosine)


@pytest.fixture
def patch_cosine(monkeypatch):
    monkeypatch.setitem(targets.TARGETS, "patch_cosine", PatchCosineTarget)


def cosine_config(**train) -> ConfigWithPatchCosine:
    base = tiny_distill_config(**train)
    cfg = ConfigWithPatchCosine(student=base.student, teacher=base.teacher, data=base.data, train=base.train)
    cfg.loss.patch_cosine.weight = 0.5
    return cfg


def test_a_target_added_by_a_class_and_a_config_section_trains(patch_cosine, tmp_path):
    cfg = cosine_config(max_steps=1, batch_size=8, warmup_epochs=0)
    assert target_sites(cfg.loss) == {"qkv", "block"}  # the teacher computes its block output
    assert untrained_parts(cfg.loss, 2) == ["the final norm"]  # the cosine trains the whole last block

    torch.manual_seed(0)
    task = build_distill_task(cfg)
    student = task.trainable_module
    assert isinstance(student.patch_cosine, PatchCosineTarget)
    last = task.student.blocks[-1]
    assert last.mlp.fc1.weight.requires_grad and not task.student.norm.weight.requires_grad
    x = torch.randn(2, 3, 32, 32)
    teacher = task.teacher(x)
    losses = student(x, teacher)
    # the cosine written out: teacher block 3 against the student's last block, patch tokens only
    with torch.no_grad():
        s = task.student.blocks(task.student.norm_pre(task.student._pos_embed(task.student.patch_embed(x))))
        t = task.teacher.vit.forward_features(x)  # truncated to the target block, no final norm
        expected = 1 - F.cosine_similarity(student.patch_cosine.proj(s[:, 1:]), t[:, 1:], dim=-1).mean()
    torch.testing.assert_close(losses["loss_patch_cosine"], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(losses["loss"], losses["loss_relation"] + 0.5 * expected, atol=1e-6, rtol=0)
    losses["loss"].backward()
    assert student.patch_cosine.proj.weight.grad.abs().sum() > 0 and last.mlp.fc1.weight.grad.abs().sum() > 0

    # one step of the engine (which builds the task after seeding with train.seed, as here): the
    # target's projection trains, the final norm no target keeps does not, and its loss is logged
    seed_everything(cfg.train.seed)
    initial = {k: v.clone() for k, v in build_distill_task(cfg).trainable_module.state_dict().items()}
    tasks.run("distill", cfg, tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "loss_patch_cosine" in row] == [1]
    trained = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert set(trained) == set(initial)  # its parameters under its config section's name
    assert torch.equal(trained["vit.norm.weight"], initial["vit.norm.weight"])
    assert not torch.equal(trained["patch_cosine.proj.weight"], initial["patch_cosine.proj.weight"])


def test_the_no_target_check_counts_an_added_target(patch_cosine):
    cfg = cosine_config()
    cfg.loss.relation.weight = 0.0
    checked_copy(cfg)  # the cosine alone reads the teacher: a distillation target
    cfg.loss.patch_cosine.weight = 0.0
    with pytest.raises(ConfigError, match=r"no distillation target: give .*loss\.patch_cosine a weight > 0"):
        checked_copy(cfg)
