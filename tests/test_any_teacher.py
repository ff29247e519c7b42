"""Any timm ViT as the teacher: relation maps of blocks with registers, q/k norm, rotary embedding and
patch 14 equal the attention the model computes itself; the grid rule; teachers by hub name.

The reference is the model's own forward: timm's AttentionExtract hooks the attention probabilities
(the input of `attn_drop`, with timm's fused attention switched off), in float64.
"""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import ROOT, subprocess_env, tiny_distill_config, tiny_vit
from timm.models._hub import save_for_hf
from timm.models.vision_transformer import VisionTransformer
from timm.utils import AttentionExtract

import tinymim.tasks as tasks
from tinymim.core.config import ConfigError
from tinymim.method.attention import UnreadableBlock, block_qkv_features
from tinymim.method.relations import relation_logits, split_heads
from tinymim.models.distillation import FrozenTeacher, RelationDistillation, teacher_tokens
from tinymim.models.vit import ModelConfig, create_vit, num_tokens
from tinymim.tasks.distill import build_distill_task
from tinymim.tasks.distill_config import resolve

SIZES = dict(embed_dim=32, depth=3, num_heads=2, num_classes=0)


def _teachers():
    """Tiny random-weight teachers of each kind the issue names (and DINOv3: RoPE plus registers)."""
    return {
        "dinov2_registers_patch14": lambda: timm.create_model("vit_small_patch14_reg4_dinov2", img_size=56, **SIZES),
        "qk_norm": lambda: VisionTransformer(img_size=32, patch_size=8, qk_norm=True, **SIZES),
        "eva02_rope_patch14": lambda: timm.create_model("eva02_tiny_patch14_224", img_size=56, **SIZES),
        "dinov3_rope_registers": lambda: timm.create_model("vit_small_patch16_dinov3", img_size=64, **SIZES),
    }


def _randomized(model):
    """Norm weights, biases and q/k norms away from their init (ones, zeros), so each step matters."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model.double().eval()


def _own_attention(model, block: int, x):
    """The attention probabilities block `block` (1-indexed) computes in the model's own forward."""
    for blk in model.blocks:
        blk.attn.fused_attn = False
    out = AttentionExtract(model, names=[f"blocks.{block - 1}.attn.attn_drop"], method="hook")(x)
    return next(iter(out.values()))


@pytest.mark.parametrize("kind", list(_teachers()))
def test_qk_map_is_the_models_own_attention(kind):
    torch.manual_seed(0)
    model = _randomized(_teachers()[kind]())
    x = torch.randn(2, 3, *model.patch_embed.img_size, dtype=torch.float64)
    reference = _own_attention(model, 2, x)
    teacher = FrozenTeacher(copy.deepcopy(model), block=2, registers="keep")
    maps = relation_logits(teacher.qkv(x), "qk").softmax(-1)
    assert maps.shape == reference.shape == (2, 2, num_tokens(model), num_tokens(model))
    assert (maps - reference).abs().max() < 1e-6

    # the plain reading, qkv(norm1(x)) without the block's own q/k norm and RoPE, is not the model's attention
    if kind != "dinov2_registers_patch14":
        attn = model.blocks[1].attn
        h = model.blocks[1].norm1(teacher_tokens(model, x, 2)[0])
        raw = attn.qkv(h) if attn.qkv is not None else torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], -1)
        naive = relation_logits(split_heads(raw, 2), "qk").softmax(-1)
        assert (naive - reference).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["dinov2_registers_patch14", "dinov3_rope_registers"])
def test_registers_dropped_renormalize_the_models_attention(kind):
    """Dropping registers = the model's own attention with register rows and columns removed, each row
    renormalized over the tokens kept (class token and patches)."""
    model = _randomized(_teachers()[kind]())
    x = torch.randn(2, 3, *model.patch_embed.img_size, dtype=torch.float64)
    reference = _own_attention(model, 3, x)
    keep = [0, *range(5, num_tokens(model))]  # class token, then patches: registers are tokens 1..4
    expected = reference[:, :, keep][:, :, :, keep]
    expected = expected / expected.sum(-1, keepdim=True)
    teacher = FrozenTeacher(copy.deepcopy(model), block=3)  # registers="drop", the default
    maps = relation_logits(teacher.qkv(x), "qk").softmax(-1)
    assert maps.shape == expected.shape and (maps - expected).abs().max() < 1e-6


def test_plain_block_reading_is_the_projection_itself():
    vit = create_vit(tiny_vit()).double()
    x = torch.randn(2, 65, 48, dtype=torch.float64)
    blk = vit.blocks[0]
    assert torch.equal(block_qkv_features(blk, x), blk.attn.qkv(blk.norm1(x)))


def test_grid_rule_gives_equal_token_counts():
    """A patch-14 teacher with registers of a patch-4 student at 32 px: fed 8 x 14 = 112 px on the device,
    registers dropped: 1 + 64 tokens on both sides; the API resizes a teacher built at another size."""
    cfg = tiny_distill_config()
    cfg.teacher.model = ModelConfig(name="vit_custom", patch_size=14, embed_dim=48, depth=2, num_heads=3, reg_tokens=4)
    assert resolve(cfg).teacher.model.img_size == 112
    task = build_distill_task(cfg)
    out = task.teacher(torch.randn(2, 3, 32, 32))
    assert task.teacher.img_size == 112 and out["qkv"].shape == (2, num_tokens(task.student), 3 * 48)
    losses = task.trainable_forward(torch.randn(2, 3, 32, 32), out)
    assert torch.isfinite(losses["loss"])

    teacher = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=518, **SIZES)
    student = create_vit(tiny_vit(dim=32, heads=2))  # patch 4 at 32 px: an 8 x 8 grid
    api = RelationDistillation(teacher, student)
    assert api.teacher.vit.patch_embed.img_size == (112, 112) and api.teacher.vit.pos_embed.shape[1] == 64
    assert torch.isfinite(api(torch.randn(2, 3, 32, 32))["loss"])


def test_registers_kept_need_a_student_with_as_many():
    cfg = tiny_distill_config()
    cfg.teacher.model = ModelConfig(name="vit_custom", patch_size=14, embed_dim=48, depth=2, num_heads=3, reg_tokens=4)
    cfg.teacher.registers = "keep"
    with pytest.raises(ConfigError, match="teacher has 4 register tokens and the student 0; give the student as "
                                          r"many \(student.reg_tokens=4\)"):
        resolve(cfg)
    cfg.student.reg_tokens = 4
    task = build_distill_task(cfg)
    assert task.teacher(torch.randn(1, 3, 32, 32))["qkv"].shape[1] == num_tokens(task.student) == 69
    cfg.teacher.registers = "drop"
    with pytest.raises(ConfigError, match="student has 4 register tokens and the teacher's are dropped"):
        resolve(cfg)


def test_a_teacher_without_a_class_token_pairs_with_the_students_patches(tmp_path):
    """SigLIP's ViT has no class token: its maps are over the patches only, the student's class token is
    left out of its own maps (Q-K rows and columns) and targets; the class-token target is refused."""
    cfg = tiny_distill_config(max_steps=2, batch_size=8)
    cfg.teacher.model = ModelConfig(name="vit_base_patch16_siglip_224", embed_dim=48, depth=2, num_heads=3,
                                    patch_size=4)
    task = build_distill_task(cfg)
    x = torch.randn(2, 3, 32, 32)
    t_qkv, s_qkv = task.relation_qkv(x)
    assert t_qkv[0].shape[2] == s_qkv[0].shape[2] == 64  # 8 x 8 patches, no class token on either side
    student_tokens = embed_tokens_before_last(task.student, x)
    full = block_qkv_features(task.student.blocks[-1], student_tokens)
    assert torch.equal(s_qkv[0], split_heads(full[:, 1:], task.student.blocks[-1].attn.num_heads)[0])
    losses = task.trainable_forward(x, task.teacher(x))
    assert torch.isfinite(losses["loss"])
    cfg.mask_ratio = 0.5  # targets gathered at the student's visible patches, without a class-token offset
    assert torch.isfinite(build_distill_task(cfg).trainable_forward(x, task.teacher(x))["loss"])
    cfg.mask_ratio = 0.0
    tasks.run("distill", cfg, tmp_path / "run")
    assert (tmp_path / "run" / "student.safetensors").is_file()
    cfg.loss.class_token.weight = 1.0
    with pytest.raises(ConfigError, match="has no class token .*the class-token target needs one"):
        resolve(cfg)


def embed_tokens_before_last(vit, x):
    from tinymim.models.vit import tokens_before_block
    return tokens_before_block(vit, x, len(vit.blocks))


def test_a_block_without_qkv_is_refused_in_one_line():
    class NoQKV(torch.nn.Module):
        num_heads = 3

        def forward(self, x):
            return x

    vit = create_vit(tiny_vit())
    vit.blocks[1].attn = NoQKV()
    with pytest.raises(UnreadableBlock, match=r"^teacher block 2 \(Block\) has no attention with q/k/v projections "
                                              r".*use a timm ViT or EVA teacher, or a feature/class-token target"):
        FrozenTeacher(vit, block=2)
    # a feature target at the block output needs no Q/K/V: the same teacher serves it
    vit = create_vit(tiny_vit())
    vit.blocks[1].attn = NoQKV()
    out = FrozenTeacher(vit, block=2, sites=("block",))(torch.randn(1, 3, 32, 32))
    assert set(out) == {"block"} and out["block"].shape == (1, 65, 48)


def test_eva02_teacher_distills(tmp_path):
    """An EVA-02 teacher (RoPE, SwiGLU, separate q/v biases) through the distill task: a few steps run and
    the class-token baseline reads its block output with the rotary embedding."""
    cfg = tiny_distill_config(max_steps=3, batch_size=8)
    cfg.teacher.model = ModelConfig(name="eva02_tiny_patch14_224", embed_dim=48, depth=2, num_heads=3)
    cfg.loss.class_token.weight = 1.0
    resolved = resolve(cfg)
    assert resolved.teacher.model.img_size == 112  # the student's 8 x 8 grid, patch 14
    assert resolved.teacher.mean == resolved.data.mean  # random weights, not timm's: the data's normalization
    tasks.run("distill", cfg, tmp_path / "run")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_class_token" in m for m in metrics)


def test_teacher_normalization_follows_timm_weights():
    cfg = tiny_distill_config()
    cfg.teacher.checkpoint = "vit_base_patch16_clip_224.openai"
    cfg.teacher.model = ModelConfig(name="vit_base_patch16_clip_224.openai", img_size=None)
    cfg.data.img_size, cfg.student.patch_size = 32, 4
    t = resolve(cfg).teacher
    assert t.mean == pytest.approx([0.48145466, 0.4578275, 0.40821073]) and t.model.img_size == 128
    cfg.teacher.mean, cfg.teacher.std = [0.5] * 3, [0.5] * 3  # given: kept
    assert resolve(cfg).teacher.mean == [0.5] * 3


def _hub_cache(root: Path) -> Path:
    """A Hugging Face cache holding `timm/tiny_reg_vit`: a random-weight patch-14 ViT with 4 registers."""
    args = dict(img_size=56, embed_dim=48, depth=2, num_heads=3)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, **args)
    repo = root / "models--timm--tiny_reg_vit"
    save_for_hf(model, repo / "snapshots" / ("0" * 40), model_args=args, safe_serialization=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return root


def _distill(tmp_path, checkpoint, env_extra):
    """`tinymim distill` of a tiny student, the teacher named only by teacher.checkpoint, offline."""
    env = {**subprocess_env(), "HF_HUB_OFFLINE": "1", **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "tinymim", "distill", "--output", str(tmp_path / "run"), "student.name=vit_custom",
         "student.patch_size=4", "student.embed_dim=48", "student.depth=2", "student.num_heads=3",
         "data.name=synthetic", "data.img_size=32", "data.num_workers=0", "train.max_steps=2", "train.batch_size=4",
         "train.precision=fp32", f"teacher.checkpoint={checkpoint}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_teacher_by_hub_name_from_a_local_cache(tmp_path):
    cache = _hub_cache(tmp_path / "hf")
    r = _distill(tmp_path, "hf-hub:timm/tiny_reg_vit", {"HF_HUB_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-2000:]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "hf-hub:timm/tiny_reg_vit" in config and "img_size: 112" in config  # 8 x 8 grid, patch 14


@pytest.mark.slow
def test_teacher_by_hub_name_offline_is_one_line(tmp_path):
    r = _distill(tmp_path, "hf-hub:timm/not_cached_anywhere", {"HF_HUB_CACHE": str(tmp_path / "empty")})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    line = [ln for ln in r.stderr.splitlines() if "hf-hub:timm/not_cached_anywhere" in ln]
    assert len(line) == 1 and "offline" in line[0] and "teacher.checkpoint=model.safetensors" in line[0]


@pytest.mark.parametrize("recipe, size, mean", [
    ("distill_vit_small_from_dinov2_base", 196, (0.485, 0.456, 0.406)),
    ("distill_vit_tiny_from_dinov2_base", 196, (0.485, 0.456, 0.406)),
    ("distill_vit_small_from_clip_base", 224, (0.48145466, 0.4578275, 0.40821073)),
    ("distill_vit_small_from_eva02_base", 196, (0.48145466, 0.4578275, 0.40821073))])
def test_modern_teacher_recipes_resolve_their_input(recipe, size, mean):
    """Resolved offline (timm's own configs): the grid-matched size and the normalization the weights expect;
    the student's relation block takes the teacher's 12 heads."""
    from tinymim.core.config import load_config
    from tinymim.tasks.distill_config import DistillConfig

    cfg = resolve(load_config(DistillConfig, f"imagenet/{recipe}"))
    assert cfg.teacher.model.img_size == size and cfg.teacher.mean == pytest.approx(list(mean))
    assert cfg.data.mean != cfg.teacher.mean or size == 196  # CLIP's differ from the data's ImageNet ones
    assert cfg.student.block_heads == {12: 12} and cfg.teacher.registers == "drop"


def test_mae_with_registers_trains_them_and_its_run_teaches_with_them(tmp_path):
    """MAE of an encoder with 4 registers: gradients reach them, and they are kept apart from the decoder
    (which predicts the patches only); the run, as a teacher, supplies its registers and
    patch 14, and is fed 8 x 14 = 112 px for a patch-4 student at 32 px."""
    from tinymim.core.config import load_config
    from tinymim.tasks.mae import MAEConfig

    cfg = load_config(MAEConfig, None, [
        "model.name=vit_custom", "model.patch_size=14", "model.embed_dim=48", "model.depth=2", "model.num_heads=3",
        "model.reg_tokens=4", "decoder.embed_dim=32", "decoder.depth=1", "decoder.num_heads=2", "data.img_size=56",
        "data.num_workers=0", "data.synthetic_size=64", "train.batch_size=16", "train.max_steps=3",
        "train.precision=fp32", "train.progress=false", "train.blr=1e-2", "train.warmup_epochs=0"])
    mae = tasks.build_task("mae", cfg).mae
    mae(torch.randn(4, 3, 56, 56)).backward()
    assert mae.encoder.reg_token.grad.abs().sum() > 0  # the registers take part in the encoder ...
    seen = []
    mae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    mae(torch.randn(4, 3, 56, 56))
    assert seen == [(4, 1 + 4, 48)]  # ... and never reach the decoder: class token + 4 of 16 patches visible
    tasks.run("mae", cfg, tmp_path / "teacher")
    from safetensors.torch import load_file
    assert load_file(tmp_path / "teacher" / "encoder.safetensors")["reg_token"].shape == (1, 4, 48)

    from tinymim.tasks.distill_config import load
    student = ["student.name=vit_custom", "student.patch_size=4", "student.embed_dim=48", "student.depth=2",
               "student.num_heads=3", "data.img_size=32"]
    resolved = resolve(load(None, [f"teacher.checkpoint={tmp_path / 'teacher'}", *student]))
    assert (resolved.teacher.model.reg_tokens, resolved.teacher.model.patch_size) == (4, 14)
    assert resolved.teacher.model.img_size == 112
    distill = build_distill_task(resolved)
    assert distill.teacher(torch.randn(2, 3, 32, 32))["qkv"].shape[1] == 65


def test_masked_targets_of_a_teacher_without_a_class_token_are_its_visible_patches(monkeypatch):
    """With mask_ratio > 0 the targets are taken at the student's visible patches: with no class token on
    the teacher's side there is no prefix offset (checked with a mask that keeps the first half in order)."""
    import tinymim.tasks.distill as distill_module
    from tinymim.method.targets import block_parts
    from tinymim.models.vit import embed, run_blocks

    def first_half(x, ratio):
        b, n, _ = x.shape
        visible = torch.arange(n // 2).expand(b, -1)
        mask = torch.cat([torch.zeros(b, n // 2), torch.ones(b, n - n // 2)], dim=1)
        return x[:, : n // 2], visible, torch.arange(n).expand(b, -1), mask

    monkeypatch.setattr(distill_module, "random_masking", first_half)
    cfg = tiny_distill_config()
    cfg.teacher.model = ModelConfig(name="vit_base_patch16_siglip_224", embed_dim=48, depth=2, num_heads=3,
                                    patch_size=4)
    cfg.mask_ratio = 0.5
    task = build_distill_task(cfg)
    x = torch.randn(2, 3, 32, 32)
    targets = task.teacher(x)
    got = task.trainable_forward(x, targets)["loss"]
    vit, last = task.student, task.student.blocks[-1]
    tokens = run_blocks(vit, embed(vit, x)[:, :33], vit.blocks[:-1])  # class token + the first 32 patches
    student_qkv = block_parts(last, tokens, {"qkv"})["qkv"][:, 1:]
    expected = task.trainable_module.relation(split_heads(targets["qkv"][:, :32], task.teacher.heads),
                                              split_heads(student_qkv, last.attn.num_heads))["loss"]
    assert torch.allclose(got, expected, atol=1e-6)


def test_a_teacher_without_qkv_serves_a_block_output_target():
    """What the one-line refusal suggests works: a block-output feature target needs no Q/K/V, so the
    distill task builds and trains with a teacher whose blocks tinymim cannot read relations from."""
    cfg = tiny_distill_config()
    cfg.teacher.model = ModelConfig(name="vit_base_patch16_xp_224", embed_dim=64, depth=3, num_heads=4, patch_size=4)
    cfg.loss.relation.weight, cfg.loss.feature.weight, cfg.loss.feature.site = 0.0, 1.0, "block"
    task = build_distill_task(cfg)
    x = torch.randn(2, 3, 32, 32)
    assert torch.isfinite(task.trainable_forward(x, task.teacher(x))["loss_feature"])
    cfg.loss.relation.weight = 1.0
    with pytest.raises(ConfigError, match=r"teacher block 3 \(ParallelScalingBlock\) has no attention"):
        build_distill_task(cfg)
