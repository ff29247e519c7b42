"""A release-equivalent TinyMIM training step, the baseline of benchmarks/speed/gpu_throughput.py.

Written from the method's description (docs/method.md sections 2-3), the way the public release runs it:
- ViTs whose every block computes attention explicitly: softmax(Q K^T / sqrt(d)) V as separate
  matmul, softmax and matmul kernels (the release predates fused attention);
- the teacher runs to its target block k under no_grad in fp32 weights; the student runs every block,
  its last block split into the teacher's head count, and only that block's norm1 + qkv feed the loss;
- the loss as written in the release: the student's softmax, then its log, KL against the teacher's
  softmax, summed over the last axis and averaged over batch, heads and queries, for Q-K and V-V;
- fp16 autocast with a GradScaler, AdamW (PyTorch's default implementation), no torch.compile;
- the two views arrive ready on the device (the release builds them in loader workers), so the
  baseline step does no view work at all; tinymim's step builds its views from uint8 on the device.

The step does the same useful arithmetic as tinymim's (same blocks, same maps); only how it is done
differs. It is a measuring stick, not a training path.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table, class token row zero: 1 x (grid*grid + 1) x dim."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1).double() * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    h, w = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = torch.cat([one_axis(dim // 2, h), one_axis(dim // 2, w)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float().unsqueeze(0)


class ExplicitAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def split(self, x):
        b, n, c = x.shape
        return self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)

    def forward(self, x):
        q, k, v = self.split(x)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(x.shape))


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, drop_path: float = 0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), ExplicitAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """MAE's encoder layout: conv patch embedding, class token, fixed sin-cos position embedding."""

    def __init__(self, dim: int, depth: int, heads: int, last_heads: int | None = None, drop_path: float = 0.0,
                 img: int = 224, patch: int = 16):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, img // patch))
        self.blocks = nn.ModuleList(
            Block(dim, (last_heads or heads) if i == depth - 1 else heads, 0.0 if i == depth - 1 else drop_path)
            for i in range(depth))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def relation_qkv(self, x, block: int):
        """Q, K, V of block `block` (1-indexed) for images x: blocks before it run in full."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks[: block - 1]:
            x = blk(x)
        target = self.blocks[block - 1]
        return target.attn.split(target.norm1(x))


def release_relation_loss(teacher_qkv, student_qkv):
    """KL of the Q-K and V-V relations as the release writes it: log of the student's softmax."""
    total = 0.0
    for a, b in ((0, 1), (2, 2)):
        t = teacher_qkv[a] @ teacher_qkv[b].transpose(-2, -1) / math.sqrt(teacher_qkv[a].shape[-1])
        s = student_qkv[a] @ student_qkv[b].transpose(-2, -1) / math.sqrt(student_qkv[a].shape[-1])
        t_prob, s_prob = t.softmax(dim=-1), s.softmax(dim=-1)
        total = total + F.kl_div(torch.log(s_prob), t_prob, reduction="none").sum(-1).mean()
    return total


class ReleaseStep:
    """MAE ViT-B (block 12, 12 heads) -> ViT-S (6 heads, 12 in its last block), fp16 autocast."""

    def __init__(self, device: torch.device, teacher=(768, 12, 12), student=(384, 12, 6), block: int = 12,
                 img: int = 224, patch: int = 16):
        t_dim, t_depth, t_heads = teacher
        s_dim, s_depth, s_heads = student
        self.block, self.device = block, device
        self.teacher = ViT(t_dim, t_depth, t_heads, img=img, patch=patch).to(device).eval().requires_grad_(False)
        self.student = ViT(s_dim, s_depth, s_heads, last_heads=t_heads, drop_path=0.1, img=img, patch=patch).to(device)
        last = self.student.blocks[-1]  # unused by the loss: no gradient, no optimizer state
        for m in (last.attn.proj, last.norm2, last.mlp):
            m.requires_grad_(False)
        self.optimizer = torch.optim.AdamW([p for p in self.student.parameters() if p.requires_grad], lr=1e-4,
                                           betas=(0.9, 0.95), weight_decay=0.05)
        self.scaler = torch.amp.GradScaler(device.type)

    def __call__(self, teacher_view: torch.Tensor, student_view: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.float16):
            with torch.no_grad():
                t = self.teacher.relation_qkv(teacher_view, self.block)
            s = self.student.relation_qkv(student_view, len(self.student.blocks))
            loss = release_relation_loss(t, s)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss
