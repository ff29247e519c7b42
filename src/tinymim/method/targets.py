"""The other distillation targets TinyMIM compares relations with: features and the class token.

Feature distillation (as in FD, Wei et al. 2022, TinyMIM's baseline): a linear projection of the
student feature s (student width -> teacher width) regresses the teacher feature t whitened by a
layer norm without parameters:

    L_feat = mean_{b,n,c} smooth_l1_beta( (W s + b)_{bnc},  LN(t)_{bnc} ),    beta = 2.0

Where the feature is taken in a block (`site`), for block input x:

    attn          = ls1(Attention(norm1(x)))        attention output before the residual add
    attn_residual = x + attn                         ... after it
    ffn           = ls2(MLP(norm2(attn_residual)))   FFN output before the residual add
    ffn_residual  = attn_residual + ffn              ... after it: the block output, same as `block`
    qkv           = norm1(x) W_qkv                   Q, K, V features: one projection and one loss each
                                                     (as the attention uses them: method/attention.py)

Class-token distillation: the student's class token after its last block against the teacher's class
token after its target block, by the same projected smooth-L1, or by KL over the channel axis:

    L_cls = KL( softmax(LN(t)) || softmax(W s + b) )  summed over channels, mean over the batch

`teacher_norm=False` skips the whitening (then a student equal to the teacher, with an identity
projection, has zero loss: how the tests check the wiring).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinymim.method.attention import POST_NORM_BLOCKS, UnreadableBlock, block_qkv_features

FEATURE_SITES = ("block", "ffn", "ffn_residual", "attn", "attn_residual", "qkv")


def block_parts(block: nn.Module, x: torch.Tensor, sites: set[str], rope: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
    """The features of a timm ViT block at `sites` (FEATURE_SITES) for block input x (B x N x D).

    Computes only as far as the sites need; the block output equals `block(x)`. "qkv" is Q, K, V as
    the block's attention uses them (attention.py: its q/k norm and the rotary embedding `rope`
    applied). Blocks other than timm's pre-norm Block (EVA's, with `rope`) give "qkv" and "block" only.
    """
    parts: dict[str, torch.Tensor] = {}
    if "qkv" in sites:
        parts["qkv"] = block_qkv_features(block, x, rope)
    inner = sites - {"qkv", "block"}
    if not hasattr(block, "ls1") or type(block).__name__ in POST_NORM_BLOCKS:
        if inner:
            raise UnreadableBlock(f"feature site(s) {sorted(inner)} need timm's pre-norm ViT Block; this block is a "
                                  f"{type(block).__name__}: use loss.feature.site=block or qkv")
        if "block" in sites:
            parts["block"] = block(x) if rope is None else block(x, rope=rope)
        return parts
    if sites - {"qkv"}:
        h = block.norm1(x)
        attn = block.ls1(block.attn(h))
        mid = x + block.drop_path1(attn)
        parts.update(attn=attn, attn_residual=mid)
        if sites & {"ffn", "ffn_residual", "block"}:
            ffn = block.ls2(block.mlp(block.norm2(mid)))
            parts.update(ffn=ffn, block=mid + block.drop_path2(ffn))
            parts["ffn_residual"] = parts["block"]
    return {name: parts[name] for name in sites}


def whiten(t: torch.Tensor) -> torch.Tensor:
    """Layer norm over the channel axis without affine parameters (fp32 at least)."""
    t = t.to(torch.promote_types(t.dtype, torch.float32))
    return F.layer_norm(t, t.shape[-1:])


class FeatureLoss(nn.Module):
    """Smooth-L1 (beta) between W s + b and LN(t); `parts` > 1 splits the channel axis into that many
    features (Q, K, V), each with its own projection, and averages their losses."""

    def __init__(self, student_dim: int, teacher_dim: int, beta: float = 2.0, teacher_norm: bool = True,
                 parts: int = 1):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in range(parts))
        self.beta, self.teacher_norm = beta, teacher_norm

    def forward(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        n = len(self.proj)
        losses = []
        for proj, t, s in zip(self.proj, teacher.chunk(n, -1), student.chunk(n, -1)):
            t = whiten(t) if self.teacher_norm else t.float()
            losses.append(F.smooth_l1_loss(proj(s).float(), t, beta=self.beta))
        return sum(losses) / n


class ClassTokenLoss(nn.Module):
    """Class-token distillation: projected smooth-L1 (`criterion="smooth_l1"`) or channel-softmax KL."""

    def __init__(self, student_dim: int, teacher_dim: int, criterion: str = "smooth_l1", beta: float = 2.0,
                 teacher_norm: bool = True):
        super().__init__()
        if criterion not in ("smooth_l1", "kl"):
            raise ValueError(f"class-token criterion must be smooth_l1 or kl, got {criterion!r}")
        self.proj = nn.Linear(student_dim, teacher_dim)
        self.criterion, self.beta, self.teacher_norm = criterion, beta, teacher_norm

    def forward(self, teacher_cls: torch.Tensor, student_cls: torch.Tensor) -> torch.Tensor:
        t = whiten(teacher_cls) if self.teacher_norm else teacher_cls.float()
        s = self.proj(student_cls).float()
        if self.criterion == "smooth_l1":
            return F.smooth_l1_loss(s, t, beta=self.beta)
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
