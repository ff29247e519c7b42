"""TinyMIM relation distillation as a `timm.task.TrainingTask`, so a timm training loop can pre-train with it:

    task = RelationDistillationTask(student, teacher, target_block=6)
    optimizer = timm.optim.create_optimizer_v2(task.get_trainable_module(), "adamw", lr=1e-3)
    result = task(images, labels)       # {"loss", "output", "loss_qk", "loss_vv"}; labels are not used
    result["loss"].backward()

The loss and gradients are `tinymim distill`'s on the same batch and weights (in fp32, to the bit:
tests/test_timm_task.py).
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.task import DistillationTeacher, TrainingTask
from timm.utils import unwrap_model
from torch.nn.parallel import DistributedDataParallel as DDP

from tinymim.method.relations import split_heads
from tinymim.models.distillation import RelationDistillation

log = logging.getLogger("tinymim")


class RelationDistillationTask(TrainingTask):
    """Pre-train a timm ViT student by the relations of a frozen teacher block (TinyMIM).

    The teacher is timm's `DistillationTeacher` (from a model name it creates the model with its weights;
    it holds the teacher's normalization and converts the student's inputs to it), but its own forward gives
    only logits or pooled features, so the model inside it is replaced by tinymim's `FrozenTeacher`: the
    teacher run up to `target_block`, its Q/K/V read as its attention uses them. The student is tinymim's
    `RelationStudent` (its last block split into the teacher's relation heads) and the loss `RelationLoss`,
    as `RelationDistillation` wires them (models/distillation.py). The relation loss has no parameters.

    Args:
        student_model: the timm ViT to pre-train; its last block's Q/K/V are matched.
        teacher_model: a timm ViT or EVA, or a `DistillationTeacher` wrapping one.
        target_block: the teacher block (1-indexed) whose relations the student learns; default the last.
        relation_heads: heads both Q/K/V are split into; default the teacher block's own.
        relations, relation_weights, softmax, registers: as `RelationDistillation`'s.
        device, dtype, verbose: as `TrainingTask`'s.

    Inputs are normalized for the student (its pretrained config's mean/std, else ImageNet's, as timm's
    `resolve_data_config`). The student's parts after its last block's Q/K/V get no gradient and are frozen,
    as `tinymim distill` freezes them (no DDP unused parameters). `get_eval_model()` is the student ViT, so
    timm's checkpoints hold a plain ViT; there are no logits to validate, so `output` is the student's
    Q/K/V (3 x B x heads x N x head size).
    """

    def __init__(self, student_model: nn.Module, teacher_model: nn.Module | DistillationTeacher,
                 target_block: int | None = None, relation_heads: int | None = None, relations=("qk", "vv"),
                 relation_weights=None, softmax: bool = True, registers: Literal["drop", "keep"] = "drop",
                 device: torch.device | None = None, dtype: torch.dtype | None = None, verbose: bool = True):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        teacher = (teacher_model if isinstance(teacher_model, DistillationTeacher)
                   else DistillationTeacher(teacher_model, device=self.device, dtype=self.dtype))
        pair = RelationDistillation(teacher.model, student_model, target_block, relation_heads, relations,
                                    relation_weights, softmax, registers)
        teacher.model = pair.teacher  # timm's wrapper keeps the normalization it read from the full model
        self.teacher, self.trainable_module, self.relation_loss = teacher, pair.student, pair.loss
        self.relation_heads = pair.teacher.heads
        last = student_model.blocks[-1]
        for part in (last.attn.proj, getattr(last.attn, "norm", None), last.ls1, last.norm2, last.mlp, last.ls2,
                     student_model.norm, student_model.fc_norm, student_model.head):
            if part is not None:
                part.requires_grad_(False)
        cfg = getattr(unwrap_model(student_model), "pretrained_cfg", None) or {}
        for name, default in (("mean", IMAGENET_DEFAULT_MEAN), ("std", IMAGENET_DEFAULT_STD)):
            value = torch.tensor(cfg.get(name, default), device=self.device, dtype=self.dtype).view(1, -1, 1, 1)
            self.register_buffer(f"student_{name}", value, persistent=False)
        if verbose:
            log.info("RelationDistillationTask: teacher block %d in %d relation heads, relations %s",
                     pair.teacher.block, self.relation_heads, ", ".join(pair.loss.relations))

    def train(self, mode: bool = True) -> "RelationDistillationTask":
        super().train(mode)
        self.teacher.eval()
        return self

    def prepare_distributed(self, device_ids=None, **ddp_kwargs) -> "RelationDistillationTask":
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module | None:
        module = super().get_eval_model(module, ema)
        return None if module is None else unwrap_model(module).vit

    def forward(self, input: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher_input = self.teacher.normalize_input(input, self.student_mean, self.student_std)
            teacher_qkv = split_heads(self.teacher(teacher_input)["qkv"], self.relation_heads)
        student_qkv = self.trainable_module(input)
        return {**self.relation_loss(teacher_qkv, student_qkv), "output": torch.stack(student_qkv).detach()}
