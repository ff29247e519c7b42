"""Relation loss against a plainly written reference, and its gradient against finite differences."""
import math

import pytest
import torch
from conftest import tiny_distill_config, tiny_vit

from tinymim.method.attention import block_qkv
from tinymim.method.relations import RelationLoss, relation_kl, relation_logits, split_heads
from tinymim.method.targets import block_parts
from tinymim.models.vit import create_vit, set_block_heads
from tinymim.tasks.distill import build_distill_task
from tinymim.tasks.distill_config import TeacherConfig


def reference_block_input(model, x, k):
    """Tokens entering block k (1-indexed), via timm's own forward_intermediates."""
    if k == 1:
        from tinymim.models.vit import embed
        return embed(model, x)
    feats, prefix = model.forward_intermediates(x, indices=[k - 2], norm=False, output_fmt="NLC",
                                               intermediates_only=True, return_prefix_tokens=True)[0]
    return torch.cat([prefix, feats], dim=1)


def reference_relation_loss(t_model, t_block, s_model, heads, x_t, x_s, pairs=("qk", "vv")):
    """The public release's recipe written out: softmax, then log; KL summed over keys,
    averaged over batch, heads and queries. Q/K/V by hand from the block's weights."""

    def qkv(model, block_idx, x):
        blk = model.blocks[block_idx - 1]
        h = reference_block_input(model, x, block_idx)
        h = torch.nn.functional.layer_norm(h, h.shape[-1:], blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        out = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
        b, n, three_d = out.shape
        d = three_d // 3
        parts = out.split(d, dim=-1)
        return {name: p.reshape(b, n, heads, d // heads).transpose(1, 2) for name, p in zip("qkv", parts)}

    t, s = qkv(t_model, t_block, x_t), qkv(s_model, len(s_model.blocks), x_s)
    total = 0.0
    for a, b in pairs:
        d_t, d_s = t[a].shape[-1], s[a].shape[-1]
        pt = torch.softmax(t[a] @ t[b].transpose(-1, -2) / math.sqrt(d_t), -1)
        ps = torch.softmax(s[a] @ s[b].transpose(-1, -2) / math.sqrt(d_s), -1)
        kl = (pt * (torch.log(pt) - torch.log(ps))).sum(-1)
        total = total + kl.sum() / (kl.shape[0] * kl.shape[1] * kl.shape[2])
    return total


@pytest.mark.parametrize("t_dim,t_depth,t_heads,s_dim,s_depth,s_heads,block", [
    (64, 3, 4, 48, 2, 3, 3),   # wider, deeper teacher, last block
    (96, 4, 6, 48, 3, 2, 2),   # intermediate teacher block, more teacher heads
    (32, 2, 2, 64, 4, 8, 1),   # narrower teacher than student, first block
])
def test_relation_loss_matches_reference(t_dim, t_depth, t_heads, s_dim, s_depth, s_heads, block):
    torch.manual_seed(0)
    cfg = tiny_distill_config()
    cfg.student = tiny_vit(dim=s_dim, depth=s_depth, heads=s_heads)
    cfg.teacher = TeacherConfig(model=tiny_vit(dim=t_dim, depth=t_depth, heads=t_heads), target_block=block)
    task = build_distill_task(cfg)
    # give the random models peaked maps so the loss is far from zero
    with torch.no_grad():
        for p in list(task.student.parameters()) + list(task.teacher.parameters()):
            p.mul_(2.5)
    x_t, x_s = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    ours = task.trainable_module(x_s, task.teacher(x_t))
    ref = reference_relation_loss(task.teacher.vit, block, task.student, t_heads, x_t, x_s)
    assert ours["loss"].item() > 0.05
    assert torch.allclose(ours["loss"], ref, atol=1e-5, rtol=1e-5), (ours["loss"].item(), ref.item())
    assert torch.allclose(ours["loss_qk"] + ours["loss_vv"], ours["loss"])


def test_student_relation_block_takes_teacher_heads():
    cfg = tiny_distill_config()
    task = build_distill_task(cfg)
    assert task.student.blocks[-1].attn.num_heads == 4  # teacher's heads, student has 3 elsewhere
    assert task.student.blocks[0].attn.num_heads == 3
    teacher = task.teacher(torch.randn(2, 3, 32, 32))
    assert set(teacher) == {"qkv"} and teacher["qkv"].shape == (2, 65, 3 * 64)
    qkv = block_parts(task.student.blocks[-1], torch.randn(2, 65, 48), {"qkv"})["qkv"]
    q, k, v = split_heads(qkv, task.student.blocks[-1].attn.num_heads)
    assert q.shape == (2, 4, 65, 12)


def test_relation_gradient_matches_finite_differences():
    torch.manual_seed(0)
    shape = (2, 2, 5, 4)
    t_qkv = tuple(torch.randn(shape, dtype=torch.float64) for _ in range(3))
    s_qkv = tuple(torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    loss = RelationLoss(("qk", "vv", "kk"), weights=(1.0, 0.5, 2.0))
    assert torch.autograd.gradcheck(lambda q, k, v: loss(t_qkv, (q, k, v))["loss"], s_qkv)


def test_kl_is_zero_for_identical_maps_and_stable_in_half_precision():
    logits = torch.randn(2, 3, 7, 7) * 50  # extreme logits: log(softmax) would give -inf in fp16
    assert relation_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    half = relation_kl(logits.half(), (logits + torch.randn_like(logits)).half())
    assert torch.isfinite(half)


def test_block_qkv_follows_head_count():
    vit = create_vit(tiny_vit(dim=48, depth=2, heads=3))
    x = torch.randn(2, 65, 48)
    q3 = block_qkv(vit.blocks[0], x)[0]
    set_block_heads(vit.blocks[0], 6)
    q6 = block_qkv(vit.blocks[0], x)[0]
    assert q3.shape == (2, 3, 65, 16) and q6.shape == (2, 6, 65, 8)
    # same numbers, only regrouped into heads
    assert torch.equal(q3.transpose(1, 2).reshape(2, 65, 48), q6.transpose(1, 2).reshape(2, 65, 48))
    with pytest.raises(ValueError, match="cannot be split into 5 heads"):
        set_block_heads(vit.blocks[0], 5)


def test_without_softmax_is_mse_of_raw_maps():
    t = tuple(torch.randn(1, 2, 4, 3) for _ in range(3))
    s = tuple(torch.randn(1, 2, 4, 3) for _ in range(3))
    out = RelationLoss(("qk",), softmax=False)(t, s)
    expected = ((relation_logits(t, "qk") - relation_logits(s, "qk")) ** 2).mean()
    assert torch.allclose(out["loss"], expected)


def test_teacher_drop_path_is_off_by_default_and_only_active_in_training():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    task = build_distill_task(tiny_distill_config())
    task.train()
    assert torch.equal(task.teacher(x)["qkv"], task.teacher(x)["qkv"])  # deterministic: paper default
    cfg = tiny_distill_config()
    cfg.teacher.drop_path_rate = 0.5
    task = build_distill_task(cfg)
    task.train()
    assert not torch.equal(task.teacher(x)["qkv"], task.teacher(x)["qkv"])  # stochastic while training
    assert not any(p.requires_grad for p in task.teacher.parameters())
    task.eval()
    assert torch.equal(task.teacher(x)["qkv"], task.teacher(x)["qkv"])  # and off in eval


def test_kl_backward_matches_autograd_of_the_plain_formula():
    """The hand-written backward (saving only the logits) equals autograd through log_softmax, for the
    student and, when it asks for one, the teacher; in bf16 the gradient comes back in bf16."""
    torch.manual_seed(0)
    t = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    ref = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1).mean()
    gt_ref, gs_ref = torch.autograd.grad(ref, (t, s))
    out = relation_kl(t, s)
    gt, gs = torch.autograd.grad(out, (t, s))
    assert torch.allclose(out, ref) and torch.allclose(gs, gs_ref) and torch.allclose(gt, gt_ref)
    assert torch.autograd.gradcheck(relation_kl, (t, s))
    sb = s.detach().bfloat16().requires_grad_()
    relation_kl(t.detach().bfloat16(), sb).backward()
    assert sb.grad.dtype == torch.bfloat16
    assert torch.allclose(sb.grad.double(), gs_ref, atol=2e-3)
