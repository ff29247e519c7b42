"""Token relations of a ViT block and the TinyMIM relation-distillation loss.

For block input tokens F (B x N x D): Q, K, V = norm1(F) W_qkv (with the block's own q/k norm and
rotary embedding where it has them: attention.py), split into M heads of size d = D/M.
A relation between two of them is

    R_AB = softmax(A B^T / sqrt(d))          shape B x M x N x N,   A, B in {Q, K, V}

The loss for one relation is KL(teacher || student) summed over the last axis and averaged over
batch, heads and query tokens:

    L_AB = mean_{b,m,i} sum_j  t_ij (log t_ij - log s_ij)

computed from log_softmax on both sides (the public release takes log(softmax(.)), which
underflows in fp16; the value is the same). The total loss is the weighted sum over relations
(TinyMIM: Q-K and V-V, weights 1). Without softmax the raw maps A B^T / sqrt(d) are compared by
mean squared error (the paper's "w/o softmax" ablation does not state its loss).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

RELATION_NAMES = ("qk", "vv", "qq", "kk", "kq", "qv", "vq", "kv", "vk")


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B x N x 3D output of a qkv projection -> Q, K, V, each B x M x N x D/M."""
    b, n, c = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, num_heads, c // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def relation_logits(qkv: tuple[torch.Tensor, ...], name: str) -> torch.Tensor:
    """A B^T / sqrt(d) for relation `name` ("qk", "vv", ...): B x M x N x N, before softmax."""
    if name not in RELATION_NAMES:
        raise ValueError(f"unknown relation {name!r}; choose from {', '.join(RELATION_NAMES)}")
    parts = dict(zip("qkv", qkv))
    a, b = parts[name[0]], parts[name[1]]
    # scale the B x M x N x d operand, not the N x N map: same numbers, 1/(N/d) of the work
    return (a * a.shape[-1] ** -0.5) @ b.transpose(-2, -1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _RelationKL(torch.autograd.Function):
    """KL(softmax(t) || softmax(s)) per row, averaged; keeps only its two inputs for the backward.

    With p = softmax(t), q = softmax(s) and R rows, the gradients are
        dL/ds = (q - p) / R                     dL/dt = p * (log p - log q - KL_row) / R
    so the backward recomputes the softmaxes from the saved logits (in their own dtype, bf16 under
    autocast) instead of keeping fp32 copies, log-probabilities and products of the B x M x N x N maps.
    """

    @staticmethod
    def forward(ctx, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(teacher_logits, student_logits)
        return _kl_rows(teacher_logits, student_logits).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        t_logits, s_logits = ctx.saved_tensors
        scale = grad / (s_logits.numel() // s_logits.shape[-1])
        t = F.log_softmax(_at_least_fp32(t_logits), dim=-1)
        s = F.log_softmax(_at_least_fp32(s_logits), dim=-1)
        p = t.exp()
        grad_s = ((s.exp() - p) * scale).to(s_logits.dtype) if ctx.needs_input_grad[1] else None
        grad_t = None
        if ctx.needs_input_grad[0]:
            kl = (p * (t - s)).sum(-1, keepdim=True)
            grad_t = (p * (t - s - kl) * scale).to(t_logits.dtype)
        return grad_t, grad_s


def _kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """sum_j p_j (t_j - log_softmax(s)_j) = sum_j p_j t_j - sum_j p_j s_j + logsumexp(s), with
    t = log_softmax(teacher), p = exp(t) (sum_j p_j = 1): the student's log-probabilities are never
    materialized."""
    t = F.log_softmax(_at_least_fp32(teacher_logits), dim=-1)
    s = _at_least_fp32(student_logits)
    p = t.exp()
    return (p * t).sum(-1) - (p * s).sum(-1) + torch.logsumexp(s, dim=-1)


def relation_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) over the last axis, mean over all other axes.

    Computed in at least fp32 from log_softmax on both sides; for the backward only the two logit
    maps are kept (_RelationKL), not the fp32 intermediates autograd would keep.
    """
    return _RelationKL.apply(teacher_logits, student_logits)


def relation_mse(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between raw relation maps (the without-softmax variant)."""
    return F.mse_loss(_at_least_fp32(student_logits), _at_least_fp32(teacher_logits))


class RelationLoss(nn.Module):
    """Sum of weighted relation losses between a teacher block and a student block.

    Both blocks must split Q/K/V into the same number of heads (the student's relation block takes
    the teacher's head count), so the maps have the same shape B x M x N x N.
    """

    def __init__(self, relations=("qk", "vv"), weights=None, softmax: bool = True):
        super().__init__()
        for name in relations:
            if name not in RELATION_NAMES:
                raise ValueError(f"unknown relation {name!r}; choose from {', '.join(RELATION_NAMES)}")
        if not relations:
            raise ValueError("at least one relation is needed")
        self.relations = tuple(relations)
        self.weights = tuple(weights) if weights else (1.0,) * len(self.relations)
        if len(self.weights) != len(self.relations):
            raise ValueError(f"{len(self.weights)} weights for {len(self.relations)} relations")
        self.criterion = relation_kl if softmax else relation_mse

    def forward(self, teacher_qkv, student_qkv) -> dict[str, torch.Tensor]:
        """Returns {"loss_qk": ..., "loss_vv": ..., "loss": weighted sum}."""
        losses = {}
        for name in self.relations:
            t = relation_logits(teacher_qkv, name)
            s = relation_logits(student_qkv, name)
            if t.shape != s.shape:
                raise ValueError(f"relation {name}: teacher map {tuple(t.shape)} vs student map {tuple(s.shape)}")
            losses[f"loss_{name}"] = self.criterion(t, s)
        losses["loss"] = sum(w * losses[f"loss_{n}"] for w, n in zip(self.weights, self.relations))
        return losses
