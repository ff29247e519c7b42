"""TinyMIM in anyone's training loop: a frozen teacher, a student, and the relation loss between them.

    distill = RelationDistillation(teacher_vit, student_vit, target_block=18)
    losses = distill(images)            # {"loss_qk": ..., "loss_vv": ..., "loss": weighted sum}
    losses["loss"].backward()           # gradients reach the student only

The teacher, any timm ViT or EVA (DINOv2, CLIP, EVA-02 ...), runs up to its target block, frozen (eval
mode, no gradients), on the images resized so its patch grid equals the student's, its register
tokens dropped; its relation block's Q/K/V, as its attention uses them (method/attention.py), are
split into `relation_heads` (default: the block's own). The student's last block is told to split
its Q/K/V into the same number of heads (its weights do not change; docs/method.md section 2), and the
relation maps (softmax of Q-K and V-V scaled products, per head) of the two are compared by KL.
timm.task-style: the trainable part is `get_trainable_module()`; everything else stays frozen.
The distill task (tasks/distill.py) is wired from the same pieces: this FrozenTeacher, the student's
path through embed / run_blocks / block_parts, and the same RelationLoss.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer

from tinymim.method.attention import check_readable
from tinymim.method.relations import RelationLoss, split_heads
from tinymim.method.targets import block_parts
from tinymim.models.vit import embed, prefix_layout, run_blocks, set_block_heads, tokens_before_block, truncate


def grid_matched_size(student_grid: int, teacher_patch: int) -> int:
    """The teacher's input size whose patch grid equals the student's: grid x teacher patch (e.g. a
    patch-16 student at 224 has a 14 x 14 grid, which a patch-14 DINOv2 sees at 196 px)."""
    return student_grid * teacher_patch


def teacher_tokens(vit: nn.Module, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens entering block k, the rotary embedding block k takes) of a timm ViT (no RoPE) or EVA."""
    if isinstance(vit, VisionTransformer):
        return tokens_before_block(vit, x, k), None
    x, rope = vit._pos_embed(vit.patch_embed(x))  # EVA family: the tokens and their rotary embedding
    x = vit.norm_pre(x)
    per_block = getattr(vit, "rope_mixed", False) and rope is not None  # a table per block
    for i, blk in enumerate(vit.blocks[: k - 1]):
        x = blk(x, rope=rope[i] if per_block else rope)
    return x, (rope[k - 1] if per_block else rope)


class FrozenTeacher(nn.Module):
    """A teacher ViT run only up to `block` (1-indexed, default: the last), never trained: eval mode
    whatever mode is asked, no gradients; with `drop_path` its drop path (if it has any) still follows
    the mode (the paper's teacher drop-path ablation). The one teacher of the public API and the
    distill task. Any timm ViT or EVA (method/attention.py reads its Q/K/V with its own q/k norm
    and rotary embedding).

    Images are resized on their device to `img_size` when they differ (a patch-14 teacher of a
    patch-16 student sees the same grid at 7/8 the size); register tokens are dropped from the
    outputs (`registers="drop"`: the student has none; the class token is kept) or kept ("keep").

    forward(x) -> the relation block's features at `sites` (method/targets.py: qkv, block, ffn ...);
    qkv(x) -> its (q, k, v) split into `heads` (default: the block's own), each B x heads x N x d."""

    def __init__(self, vit: nn.Module, block: int | None = None, relation_heads: int | None = None,
                 sites=("qkv",), drop_path: bool = False, img_size: int | None = None,
                 registers: Literal["drop", "keep"] = "drop"):
        super().__init__()
        depth = len(vit.blocks)
        self.block = block or depth
        if not 1 <= self.block <= depth:
            raise ValueError(f"target block {self.block} is out of range: the teacher has blocks 1..{depth}")
        if registers not in ("drop", "keep"):
            raise ValueError(f"registers must be drop or keep, got {registers!r}")
        self.sites, self.drop_path = set(sites), drop_path
        if "qkv" in self.sites:  # relation targets: Q/K/V must be readable (feature targets need not)
            check_readable(vit.blocks[self.block - 1], f"teacher block {self.block}")
        self.vit = truncate(vit, self.block).requires_grad_(False)
        self.heads = relation_heads or self.vit.blocks[self.block - 1].attn.num_heads
        self.img_size = img_size or self.vit.patch_embed.img_size[0]
        cls, regs = prefix_layout(self.vit)
        # tokens kept: [class token, registers if kept, patches]
        self.dropped = (cls, cls + regs) if registers == "drop" and regs else None
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        super().train(False)  # always eval: no dropout ...
        if self.drop_path:  # ... and no drop path unless asked for
            for m in self.modules():
                if isinstance(m, DropPath):
                    m.train(mode)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor, sites: set[str] | None = None) -> dict[str, torch.Tensor]:
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:  # the grid-matched size, on the device
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False,
                              antialias=True)
        tokens, rope = teacher_tokens(self.vit, x, self.block)
        parts = block_parts(self.vit.blocks[self.block - 1], tokens, sites or self.sites, rope)
        if self.dropped is not None:
            a, b = self.dropped
            parts = {k: torch.cat([v[:, :a], v[:, b:]], dim=1) for k, v in parts.items()}
        return parts

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return split_heads(self(x, {"qkv"})["qkv"], self.heads)


class RelationStudent(nn.Module):
    """A student ViT whose last block splits Q/K/V into `heads` (the teacher's relation heads).
    forward(x) -> that block's (q, k, v), without its class token when `skip_class_token` (a teacher
    that has none); `vit` stays a plain timm VisionTransformer. The distill task's student takes the
    same path (embed, run_blocks, block_parts of the last block)."""

    def __init__(self, vit: nn.Module, heads: int, skip_class_token: bool = False):
        super().__init__()
        self.vit, self.heads, self.skip_class_token = vit, heads, skip_class_token
        set_block_heads(vit.blocks[-1], heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = run_blocks(self.vit, embed(self.vit, x), self.vit.blocks[:-1])
        qkv = block_parts(self.vit.blocks[-1], tokens, {"qkv"})["qkv"]
        return split_heads(qkv[:, 1:] if self.skip_class_token else qkv, self.heads)


class RelationDistillation(nn.Module):
    """Teacher and student ViTs in; forward(images) -> {"loss_<relation>": ..., "loss": weighted sum}."""

    def __init__(self, teacher: nn.Module, student: nn.Module, target_block: int | None = None,
                 relation_heads: int | None = None, relations=("qk", "vv"), weights=None, softmax: bool = True,
                 registers: Literal["drop", "keep"] = "drop"):
        super().__init__()
        grid = student.patch_embed.grid_size[0]
        size = grid_matched_size(grid, teacher.patch_embed.patch_size[0])
        if teacher.patch_embed.img_size[0] != size:  # timm resamples its position embedding (and RoPE grid)
            teacher.set_input_size(img_size=(size, size))
        self.teacher = FrozenTeacher(teacher, target_block, relation_heads, registers=registers)
        self.student = RelationStudent(student, self.teacher.heads, skip_class_token=prefix_layout(teacher)[0] == 0)
        self.loss = RelationLoss(relations, weights, softmax)

    def get_trainable_module(self) -> nn.Module:
        return self.student.vit

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.loss(self.teacher.qkv(x), self.student(x))
