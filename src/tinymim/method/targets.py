"""Distillation targets as a table: each target one small class that says which block features it
reads, which student parts it trains and its loss; `TARGETS` lists them by their config section
(loss.<name>), and the distill task builds, freezes and sums by it (tasks/distill.py).

A target reads its block features ("sites") at the teacher's target block and at the student's last
block (the student's own features only: `student_sites`). Where a feature is taken in a block, for
block input x:

    attn          = ls1(Attention(norm1(x)))        attention output before the residual add
    attn_residual = x + attn                         ... after it
    ffn           = ls2(MLP(norm2(attn_residual)))   FFN output before the residual add
    ffn_residual  = attn_residual + ffn              ... after it: the block output, same as `block`
    qkv           = norm1(x) W_qkv                   Q, K, V features: one projection and one loss each
                                                     (as the attention uses them: method/attention.py)

The targets:
- relation (TinyMIM): KL between the teacher's and the student's relation maps at "qkv" (relations.py).
- feature (FD, Wei et al. 2022, TinyMIM's baseline): a linear projection of the student feature s
  (student width -> teacher width) regresses the teacher feature t whitened by a layer norm without
  parameters:

      L_feat = mean_{b,n,c} smooth_l1_beta( (W s + b)_{bnc},  LN(t)_{bnc} ),    beta = 2.0

- class_token: the student's class token after its last block against the teacher's class token
  after its target block, by the same projected smooth-L1, or by KL over the channel axis:

      L_cls = KL( softmax(LN(t)) || softmax(W s + b) )  summed over channels, mean over the batch

- mae: MAE reconstruction of the patches the student did not see (mask_ratio > 0) from its final-norm
  output through a light decoder; it reads no teacher feature, so it is auxiliary, never the only target.

`teacher_norm=False` skips the whitening (then a student equal to the teacher, with an identity
projection, has zero loss: how the tests check the wiring).

Adding a target: its class here and its row in `TARGETS`, its config section in tasks/distill_config.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinymim.method.attention import POST_NORM_BLOCKS, UnreadableBlock, block_qkv_features
from tinymim.method.mae import MAEDecoder, reconstruction_loss
from tinymim.method.relations import RelationLoss, split_heads

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


# The student's parts after its last block's norm1 + Q/K/V, which every target trains. A part no
# target keeps gets no gradient: the distill task freezes it (so DDP needs no find_unused_parameters)
# and exports name it as never trained.
ATTENTION_OUTPUT, MLP, FINAL_NORM = "attention projection", "MLP", "final norm"
STUDENT_PARTS = (ATTENTION_OUTPUT, MLP, FINAL_NORM)
# the parts of the student's last block that each of its features is computed through
SITE_PARTS = {
    "qkv": frozenset(),
    "attn": frozenset({ATTENTION_OUTPUT}),
    "attn_residual": frozenset({ATTENTION_OUTPUT}),
    "ffn": frozenset({ATTENTION_OUTPUT, MLP}),
    "ffn_residual": frozenset({ATTENTION_OUTPUT, MLP}),
    "block": frozenset({ATTENTION_OUTPUT, MLP}),
}


def student_part_modules(vit: nn.Module) -> dict[str, list[nn.Module | None]]:
    """The modules of each of STUDENT_PARTS in a timm ViT student."""
    last = vit.blocks[-1]
    return {ATTENTION_OUTPUT: [last.attn.proj, getattr(last.attn, "norm", None), last.ls1],
            MLP: [last.norm2, last.mlp, last.ls2],
            FINAL_NORM: [vit.norm]}


@dataclass(frozen=True)
class Pairing:
    """The sizes a target is built for."""

    student_dim: int
    teacher_dim: int
    student_heads: int  # heads of the student's last block
    teacher_heads: int  # heads the teacher's target block is split into (teacher.relation_heads)
    grid_size: tuple[int, int]  # the student's patch grid
    patch_size: int  # the student's patch size (pixels)


@dataclass
class TargetInputs:
    """What the targets read at one step."""

    teacher: dict[str, torch.Tensor]  # the teacher's target block at its sites, at the tokens the student sees
    student: dict[str, torch.Tensor]  # the student's last block at its sites, at the tokens the teacher has
    student_tokens: dict[str, torch.Tensor]  # the same with all the student's tokens (its class token always)
    images: torch.Tensor  # the student's input
    mask: torch.Tensor | None  # 1 = a patch the student did not see (mask_ratio > 0)
    restore: torch.Tensor | None  # the index that puts the masked tokens back in order
    final_norm: nn.Module  # the student's final norm


class Target(nn.Module):
    """One distillation target, built from its config section (`cfg`, loss.<name>, with a `weight`:
    0 = off) and the pairing's sizes. What the distill task calls:

    - sites(cfg): the block features (FEATURE_SITES) it reads at the teacher's target block and the
      student's last; student_sites(cfg): those it reads from the student (default: the same);
    - keeps(cfg): the STUDENT_PARTS it trains (every other one is frozen unless another target keeps it);
      default: the parts its student sites are computed through (SITE_PARTS);
    - loss(inputs): {"loss": its loss, and named parts of it to log}.

    Its parameters are saved under `state_name` (default: its config section's name) in the student.
    """

    state_name: ClassVar[str | None] = None

    @classmethod
    def sites(cls, cfg: Any) -> frozenset[str]:
        raise NotImplementedError

    @classmethod
    def student_sites(cls, cfg: Any) -> frozenset[str]:
        return cls.sites(cfg)

    @classmethod
    def keeps(cls, cfg: Any) -> frozenset[str]:
        return frozenset().union(*(SITE_PARTS[site] for site in cls.student_sites(cfg)))

    def loss(self, inputs: TargetInputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class RelationTarget(RelationLoss, Target):
    """TinyMIM's relations between Q/K/V, both blocks split into the teacher's relation heads."""

    def __init__(self, cfg: Any, pairing: Pairing):
        super().__init__(cfg.relations, cfg.weights, cfg.softmax)
        self.teacher_heads, self.student_heads = pairing.teacher_heads, pairing.student_heads

    @classmethod
    def sites(cls, cfg: Any) -> frozenset[str]:
        return frozenset({"qkv"})

    def loss(self, inputs: TargetInputs) -> dict[str, torch.Tensor]:
        return self(split_heads(inputs.teacher["qkv"], self.teacher_heads),
                    split_heads(inputs.student["qkv"], self.student_heads))


class FeatureTarget(FeatureLoss, Target):
    """Feature distillation at the block site `cfg.site` (three projections and losses at "qkv")."""

    def __init__(self, cfg: Any, pairing: Pairing):
        super().__init__(pairing.student_dim, pairing.teacher_dim, cfg.beta, cfg.teacher_norm,
                         parts=3 if cfg.site == "qkv" else 1)
        self.site = cfg.site

    @classmethod
    def sites(cls, cfg: Any) -> frozenset[str]:
        return frozenset({cfg.site})

    def loss(self, inputs: TargetInputs) -> dict[str, torch.Tensor]:
        return {"loss": self(inputs.teacher[self.site], inputs.student[self.site])}


class ClassTokenTarget(ClassTokenLoss, Target):
    """The student's class token after its last block against the teacher's after its target block."""

    def __init__(self, cfg: Any, pairing: Pairing):
        super().__init__(pairing.student_dim, pairing.teacher_dim, cfg.criterion, cfg.beta, cfg.teacher_norm)

    @classmethod
    def sites(cls, cfg: Any) -> frozenset[str]:
        return frozenset({"block"})

    def loss(self, inputs: TargetInputs) -> dict[str, torch.Tensor]:
        return {"loss": self(inputs.teacher["block"][:, 0], inputs.student_tokens["block"][:, 0])}


class MAETarget(MAEDecoder, Target):
    """MAE reconstruction of the hidden patches from the student's final-norm output (auxiliary)."""

    state_name = "decoder"  # where runs saved before the target table hold its decoder

    def __init__(self, cfg: Any, pairing: Pairing):
        super().__init__(pairing.student_dim, pairing.grid_size, pairing.patch_size, cfg.decoder)
        self.patch_size, self.norm_pix_loss = pairing.patch_size, cfg.norm_pix_loss

    @classmethod
    def sites(cls, cfg: Any) -> frozenset[str]:
        return frozenset()  # no teacher feature

    @classmethod
    def student_sites(cls, cfg: Any) -> frozenset[str]:
        return frozenset({"block"})

    @classmethod
    def keeps(cls, cfg: Any) -> frozenset[str]:
        return SITE_PARTS["block"] | {FINAL_NORM}

    def loss(self, inputs: TargetInputs) -> dict[str, torch.Tensor]:
        pred = self(inputs.final_norm(inputs.student_tokens["block"]), inputs.restore)
        return {"loss": reconstruction_loss(pred, inputs.images, inputs.mask, self.patch_size, self.norm_pix_loss)}


# loss.<name> -> its target, in the order the distill task sums their losses
TARGETS: dict[str, type[Target]] = {
    "relation": RelationTarget,
    "feature": FeatureTarget,
    "class_token": ClassTokenTarget,
    "mae": MAETarget,
}


def enabled_targets(loss: Any) -> list[tuple[str, Any, type[Target]]]:
    """(name, config section, target class) of each target in TARGETS whose weight in `loss` (a
    DistillLossConfig) is > 0."""
    return [(name, getattr(loss, name), target) for name, target in TARGETS.items() if getattr(loss, name).weight > 0]
