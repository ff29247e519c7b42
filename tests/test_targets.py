"""Every distillation target: zero loss when the student is the teacher, positive otherwise; values
against plainly written references; masked input and the auxiliary MAE loss."""
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_distill_config, tiny_vit

from tinymim.core.config import ConfigError
from tinymim.method.targets import FEATURE_SITES, block_parts
from tinymim.tasks.distill import build_distill_task
from tinymim.tasks.distill_config import TeacherConfig

TARGETS = [
    ("relation qk+vv softmax", {}),
    ("relation qq,kk,vv softmax", {"relation": {"relations": ["qq", "kk", "vv"]}}),
    ("relation qk+vv no softmax", {"relation": {"softmax": False}}),
    ("class token smooth-L1", {"relation": {"weight": 0}, "class_token": {"weight": 1}}),
    ("class token KL", {"relation": {"weight": 0}, "class_token": {"weight": 1, "criterion": "kl"}}),
    *[(f"feature {site}", {"relation": {"weight": 0}, "feature": {"weight": 1, "site": site}})
      for site in FEATURE_SITES],
]


def configure(cfg, loss: dict):
    for name, values in loss.items():
        for key, value in values.items():
            setattr(getattr(cfg.loss, name), key, value)
    return cfg


def twin_task(loss: dict, same: bool, block: int = 3, teacher_norm: bool = False, mask_ratio: float = 0.0,
              depth: int = 3):
    """A task whose student has the teacher's architecture (and, if `same`, its weights)."""
    cfg = configure(tiny_distill_config(), loss)
    cfg.teacher = TeacherConfig(model=tiny_vit(dim=64, depth=depth, heads=4), target_block=block)
    cfg.student = tiny_vit(dim=64, depth=block, heads=4)
    cfg.loss.class_token.teacher_norm = cfg.loss.feature.teacher_norm = teacher_norm
    cfg.mask_ratio = mask_ratio
    torch.manual_seed(0)
    task = build_distill_task(cfg)
    student = task.trainable_module
    with torch.no_grad():
        if same:
            # the teacher's first `block` blocks (the rest is truncated away) into the student
            missing = task.student.load_state_dict(task.teacher.vit.state_dict(), strict=False)
            assert not missing.unexpected_keys
            assert set(missing.missing_keys) <= {"norm.weight", "norm.bias"}
        for proj in ([*student.feature.proj] if student.feature is not None else []) + (
                [student.class_token.proj] if student.class_token is not None else []):
            proj.weight.copy_(torch.eye(64))
            proj.bias.zero_()
    task.eval()
    return task


@pytest.mark.parametrize("name,loss", TARGETS, ids=[t[0] for t in TARGETS])
def test_target_loss_is_zero_for_the_teacher_itself_and_positive_otherwise(name, loss):
    x = torch.randn(4, 3, 32, 32)
    for block in (3, 2):  # last teacher block, and an intermediate one
        same = twin_task(loss, same=True, block=block)
        out = same.trainable_module(x, same.teacher(x))
        assert out["loss"].abs().item() < 1e-5, (name, block, out)
        other = twin_task(loss, same=False, block=block)
        with torch.no_grad():  # a different student: perturbed weights
            for p in other.student.parameters():
                p.add_(0.1 * torch.randn_like(p))
        out = other.trainable_module(x, other.teacher(x))
        assert out["loss"].item() > 1e-4, (name, block, out)


@pytest.mark.parametrize("site", FEATURE_SITES)
def test_block_parts_match_timm_block(site):
    torch.manual_seed(0)
    from timm.models.vision_transformer import Block

    blk = Block(32, 4, qkv_bias=True).eval()
    x = torch.randn(2, 9, 32)
    h = blk.norm1(x)
    attn = blk.attn(h)
    ref = {"qkv": blk.attn.qkv(h), "attn": attn, "attn_residual": x + attn,
           "ffn": blk.mlp(blk.norm2(x + attn)), "block": blk(x), "ffn_residual": blk(x)}
    assert torch.allclose(block_parts(blk, x, {site})[site], ref[site], atol=1e-6)


def test_feature_loss_matches_reference_with_whitened_teacher():
    """Default feature distillation: smooth-L1 (beta 2) between W s + b and LayerNorm(t) without affine."""
    task = twin_task({"relation": {"weight": 0}, "feature": {"weight": 1, "site": "ffn"}}, same=False,
                     teacher_norm=True)
    x_img = torch.randn(3, 3, 32, 32)
    proj = task.trainable_module.feature.proj[0]
    with torch.no_grad():
        proj.weight.normal_(0, 0.3)
    t_vit, s_vit = task.teacher.vit, task.student

    # plainly: teacher block-3 FFN output before the residual, student block-3 likewise
    def ffn_out(vit, img):
        z = vit.norm_pre(vit._pos_embed(vit.patch_embed(img)))
        for b in vit.blocks[:2]:
            z = b(z)
        b = vit.blocks[2]
        mid = z + b.attn(b.norm1(z))
        return b.mlp(b.norm2(mid))
    with torch.no_grad():
        t, s = ffn_out(t_vit, x_img), ffn_out(s_vit, x_img)
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        ref = F.smooth_l1_loss(proj(s), (t - mu) / torch.sqrt(var + 1e-5), beta=2.0)
        ours = task.trainable_module(x_img, task.teacher(x_img))
    assert torch.allclose(ours["loss_feature"], ref, atol=1e-6)
    assert torch.allclose(ours["loss"], ref, atol=1e-6)


def test_class_token_kl_matches_reference():
    task = twin_task({"relation": {"weight": 0}, "class_token": {"weight": 1, "criterion": "kl"}}, same=False,
                     teacher_norm=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        t = task.teacher.vit.forward_features(x)[:, 0]  # truncated teacher, no final norm
        s = task.student.blocks(task.student.norm_pre(task.student._pos_embed(task.student.patch_embed(x))))[:, 0]
        pt = torch.softmax(F.layer_norm(t, t.shape[-1:]), -1)
        ps = torch.softmax(task.trainable_module.class_token.proj(s), -1)
        ref = (pt * (pt.log() - ps.log())).sum(-1).mean()
        ours = task.trainable_module(x, task.teacher(x))["loss_class_token"]
    assert ref.item() > 0 and torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("name,loss", [TARGETS[0], TARGETS[3], TARGETS[-1]], ids=["relation", "cls", "qkv"])
def test_masked_input_takes_targets_at_the_visible_tokens(name, loss):
    """One-block twins: a token's Q/K/V do not depend on the other tokens, so the student that sees half
    the patches matches the full-image teacher exactly at those patches iff the gather is right."""
    x = torch.randn(4, 3, 32, 32)
    if name == "cls":  # the class token after a block depends on every token: masking must change it
        task = twin_task(loss, same=True, block=1, depth=1, mask_ratio=0.5)
        assert task.trainable_module(x, task.teacher(x))["loss"].item() > 1e-4
        return
    task = twin_task(loss, same=True, block=1, depth=1, mask_ratio=0.5)
    out = task.trainable_module(x, task.teacher(x))
    assert out["loss"].abs().item() < 1e-5
    other = twin_task(loss, same=True, block=1, depth=1, mask_ratio=0.5)
    with torch.no_grad():
        other.student.pos_embed.add_(0.5 * torch.randn_like(other.student.pos_embed))  # a different student
    assert other.trainable_module(x, other.teacher(x))["loss"].item() > 1e-4


def test_auxiliary_mae_loss_trains_its_decoder_and_needs_masking():
    cfg = tiny_distill_config()
    cfg.mask_ratio = 0.75
    cfg.loss.mae.weight = 1.0
    cfg.loss.mae.decoder.embed_dim, cfg.loss.mae.decoder.depth, cfg.loss.mae.decoder.num_heads = 32, 1, 2
    task = build_distill_task(cfg)
    x = torch.randn(2, 3, 32, 32)
    out = task.trainable_module(x, task.teacher(x))
    assert set(out) >= {"loss_qk", "loss_vv", "loss_relation", "loss_mae", "loss"}
    assert torch.allclose(out["loss"], out["loss_relation"] + out["loss_mae"])
    out["loss"].backward()
    decoder = task.trainable_module.decoder
    assert decoder.decoder_pred.weight.grad is not None and decoder.decoder_pred.weight.grad.abs().sum() > 0
    assert task.student.blocks[-1].mlp.fc1.weight.grad.abs().sum() > 0  # the whole student now trains

    cfg = tiny_distill_config()
    cfg.loss.mae.weight = 1.0
    with pytest.raises(ConfigError, match="mask_ratio"):
        build_distill_task(cfg)


def test_unused_student_parts_are_frozen_per_target():
    rel = build_distill_task(tiny_distill_config())
    last = rel.student.blocks[-1]
    assert last.attn.qkv.weight.requires_grad and not last.mlp.fc1.weight.requires_grad
    assert not last.attn.proj.weight.requires_grad
    attn = build_distill_task(configure(tiny_distill_config(), {"relation": {"weight": 0},
                                                                "feature": {"weight": 1, "site": "attn"}}))
    last = attn.student.blocks[-1]
    assert last.attn.proj.weight.requires_grad and not last.mlp.fc1.weight.requires_grad
    # every trainable parameter gets a gradient (DDP without find_unused_parameters)
    for task in (rel, attn):
        x = torch.randn(2, 3, 32, 32)
        task.train()
        task.trainable_module(x, task.teacher(x))["loss"].backward()
        idle = [n for n, p in task.trainable_module.named_parameters() if p.requires_grad and p.grad is None]
        assert not idle, idle


MAE = ("relation + MAE", {"mae": {"weight": 1}})


@pytest.mark.parametrize("name,loss", [*TARGETS, MAE], ids=[t[0] for t in [*TARGETS, MAE]])
def test_exactly_the_parts_a_target_keeps_train(name, loss):
    """What the targets declare (method/targets.py: sites read, parts kept) against the gradients: every
    parameter left trainable gets one (DDP without find_unused_parameters), every frozen one would get
    none, and untrained_parts (what exports report) names the frozen parts."""
    from tinymim.models.features import untrained_parts

    cfg = configure(tiny_distill_config(), loss)
    if "mae" in loss:
        cfg.loss.mae.decoder.embed_dim, cfg.loss.mae.decoder.depth, cfg.loss.mae.decoder.num_heads = 32, 1, 2
        cfg.mask_ratio = 0.5
    task = build_distill_task(cfg)
    task.train()
    params = dict(task.trainable_module.named_parameters())
    # the frozen parts after the last block's Q/K/V (the position embedding is frozen for another reason)
    frozen = {n for n, p in params.items() if not p.requires_grad and n.startswith(("vit.blocks.1.", "vit.norm."))}
    for n in frozen:
        params[n].requires_grad_(True)  # to see whether the loss would reach them
    x = torch.randn(2, 3, 32, 32)
    task.trainable_module(x, task.teacher(x))["loss"].backward()
    idle = [n for n, p in params.items() if p.requires_grad and n not in frozen and p.grad is None]
    assert not idle, idle
    reached = [n for n in frozen if params[n].grad is not None and params[n].grad.abs().sum() > 0]
    assert not reached, reached
    parts = {"attention projection": "vit.blocks.1.attn.proj.weight", "MLP": "vit.blocks.1.mlp.fc1.weight",
             "final norm": "vit.norm.weight"}
    expected = [part for part, param in parts.items() if param in frozen]
    assert [part.split("'s ")[-1].removeprefix("the ") for part in untrained_parts(cfg.loss, 2)] == expected


def test_the_target_table_and_the_loss_config_name_the_same_targets():
    from dataclasses import fields

    from tinymim.method.targets import TARGETS as TABLE
    from tinymim.tasks.distill_config import DistillLossConfig

    assert set(TABLE) == {f.name for f in fields(DistillLossConfig)}


def test_no_target_is_an_error():
    from dataclasses import asdict

    from tinymim.core.config import from_dict
    from tinymim.tasks.distill_config import DistillConfig

    cfg = configure(tiny_distill_config(), {"relation": {"weight": 0}})
    with pytest.raises(ConfigError, match="no distillation target"):
        from_dict(DistillConfig, asdict(cfg))
