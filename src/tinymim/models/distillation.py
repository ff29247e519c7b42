"""TinyMIM in anyone's training loop: a frozen teacher, a student, and the relation loss between them.

    distill = RelationDistillation(teacher_vit, student_vit, target_block=18)
    losses = distill(images)            # {"loss_qk": ..., "loss_vv": ..., "loss": weighted sum}
    losses["loss"].backward()           # gradients reach the student only

The teacher runs up to its target block, frozen (eval mode, no gradients); its relation block's Q/K/V
are split into `relation_heads` (default: the block's own). The student's last block is told to split
its Q/K/V into the same number of heads (its weights do not change; TINYMIM.md section 2), and the
relation maps (softmax of Q-K and V-V scaled products, per head) of the two are compared by KL.
timm.task-style: the trainable part is `get_trainable_module()`; everything else stays frozen.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from tinymim.method.relations import RelationLoss, block_qkv, split_heads
from tinymim.models.vit import embed, set_block_heads, tokens_before_block, truncate


class FrozenTeacher(nn.Module):
    """A teacher ViT run only up to `block` (1-indexed, default: the last), never trained.
    forward(x) -> the relation block's (q, k, v), each B x heads x N x head_dim."""

    def __init__(self, vit: nn.Module, block: int | None = None, relation_heads: int | None = None):
        super().__init__()
        depth = len(vit.blocks)
        self.block = block or depth
        if not 1 <= self.block <= depth:
            raise ValueError(f"target block {self.block} is out of range: the teacher has blocks 1..{depth}")
        self.vit = truncate(vit, self.block).requires_grad_(False).eval()
        self.heads = relation_heads or self.vit.blocks[self.block - 1].attn.num_heads

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)  # always in eval mode: no dropout, no drop path

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        block = self.vit.blocks[self.block - 1]
        tokens = tokens_before_block(self.vit, x, self.block)
        return split_heads(block.attn.qkv(block.norm1(tokens)), self.heads)


class RelationStudent(nn.Module):
    """A student ViT whose last block splits Q/K/V into `heads` (the teacher's relation heads).
    forward(x) -> that block's (q, k, v); `vit` stays a plain timm VisionTransformer."""

    def __init__(self, vit: nn.Module, heads: int):
        super().__init__()
        self.vit, self.heads = vit, heads
        set_block_heads(vit.blocks[-1], heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = embed(self.vit, x)
        for blk in self.vit.blocks[:-1]:
            tokens = blk(tokens)
        return block_qkv(self.vit.blocks[-1], tokens)  # split into `heads`: set_block_heads above


class RelationDistillation(nn.Module):
    """Teacher and student ViTs in; forward(images) -> {"loss_<relation>": ..., "loss": weighted sum}."""

    def __init__(self, teacher: nn.Module, student: nn.Module, target_block: int | None = None,
                 relation_heads: int | None = None, relations=("qk", "vv"), weights=None, softmax: bool = True):
        super().__init__()
        self.teacher = FrozenTeacher(teacher, target_block, relation_heads)
        self.student = RelationStudent(student, self.teacher.heads)
        self.loss = RelationLoss(relations, weights, softmax)

    def get_trainable_module(self) -> nn.Module:
        return self.student.vit

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.loss(self.teacher(x), self.student(x))
