"""TinyMIM in anyone's training loop: a frozen teacher, a student, and the relation loss between them.

    distill = RelationDistillation(teacher_vit, student_vit, target_block=18)
    losses = distill(images)            # {"loss_qk": ..., "loss_vv": ..., "loss": weighted sum}
    losses["loss"].backward()           # gradients reach the student only

The teacher runs up to its target block, frozen (eval mode, no gradients); its relation block's Q/K/V
are split into `relation_heads` (default: the block's own). The student's last block is told to split
its Q/K/V into the same number of heads (its weights do not change; TINYMIM.md section 2), and the
relation maps (softmax of Q-K and V-V scaled products, per head) of the two are compared by KL.
timm.task-style: the trainable part is `get_trainable_module()`; everything else stays frozen.
The distill task (tasks/distill.py) is wired from the same pieces: this FrozenTeacher, the student's
path through embed / run_blocks / block_parts, and the same RelationLoss.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import DropPath

from tinymim.method.relations import RelationLoss, split_heads
from tinymim.method.targets import block_parts
from tinymim.models.vit import embed, run_blocks, set_block_heads, tokens_before_block, truncate


class FrozenTeacher(nn.Module):
    """A teacher ViT run only up to `block` (1-indexed, default: the last), never trained: eval mode
    whatever mode is asked, no gradients; with `drop_path` its drop path (if it has any) still follows
    the mode (the paper's teacher drop-path ablation). The one teacher of the public API and the
    distill task.

    forward(x) -> the relation block's features at `sites` (method/targets.py: qkv, block, ffn ...);
    qkv(x) -> its (q, k, v) split into `heads` (default: the block's own), each B x heads x N x d."""

    def __init__(self, vit: nn.Module, block: int | None = None, relation_heads: int | None = None,
                 sites=("qkv",), drop_path: bool = False):
        super().__init__()
        depth = len(vit.blocks)
        self.block = block or depth
        if not 1 <= self.block <= depth:
            raise ValueError(f"target block {self.block} is out of range: the teacher has blocks 1..{depth}")
        self.sites, self.drop_path = set(sites), drop_path
        self.vit = truncate(vit, self.block).requires_grad_(False)
        self.heads = relation_heads or self.vit.blocks[self.block - 1].attn.num_heads
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        super().train(False)  # always eval: no dropout ...
        if self.drop_path:  # ... and no drop path unless asked for
            for m in self.modules():
                if isinstance(m, DropPath):
                    m.train(mode)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = tokens_before_block(self.vit, x, self.block)
        return block_parts(self.vit.blocks[self.block - 1], tokens, self.sites | {"qkv"})

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return split_heads(self(x)["qkv"], self.heads)


class RelationStudent(nn.Module):
    """A student ViT whose last block splits Q/K/V into `heads` (the teacher's relation heads).
    forward(x) -> that block's (q, k, v); `vit` stays a plain timm VisionTransformer. The distill
    task's student takes the same path (embed, run_blocks, block_parts of the last block)."""

    def __init__(self, vit: nn.Module, heads: int):
        super().__init__()
        self.vit, self.heads = vit, heads
        set_block_heads(vit.blocks[-1], heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = run_blocks(self.vit, embed(self.vit, x), self.vit.blocks[:-1])
        return split_heads(block_parts(self.vit.blocks[-1], tokens, {"qkv"})["qkv"], self.heads)


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
        return self.loss(self.teacher.qkv(x), self.student(x))
