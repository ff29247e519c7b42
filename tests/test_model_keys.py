"""Every model.* key builds the model it names in every task that builds a ViT (fine-tuning, linear
probe, segmentation), or is refused in one line where it cannot apply. A from-scratch baseline asked
for with MAE's init and the sin-cos table must be the one trained."""
import math

import pytest
import torch

from tinymim.core.config import ConfigError, load_config
from tinymim.method.mae import sincos_table
from tinymim.tasks.finetune import build_classifier
from tinymim.tasks.finetune_config import FinetuneConfig
from tinymim.tasks.linprobe import LinearProbeConfig, build_linprobe_task
from tinymim.tasks.segment import SegmentConfig, build_backbone

WIDTH, DEPTH, HEADS = 48, 3, 3
SIZES = ["model.name=vit_custom", "model.img_size=32", "model.patch_size=4", f"model.embed_dim={WIDTH}",
         f"model.depth={DEPTH}", f"model.num_heads={HEADS}"]


def finetune_vit(*keys):
    cfg = load_config(FinetuneConfig, None, [*SIZES, "data.img_size=32", "num_classes=10", *keys])
    return build_classifier(cfg, cfg.num_classes)


def linprobe_vit(*keys):
    cfg = load_config(LinearProbeConfig, None, [*SIZES, "data.img_size=32", "num_classes=10", *keys])
    return build_linprobe_task(cfg).probe.backbone


def segment_vit(*keys):
    cfg = load_config(SegmentConfig, None, [*SIZES, "data.crop_size=32", "data.num_classes=5",
                                            "model.drop_path_rate=0", *keys])
    return build_backbone(cfg)


BUILDERS = {"finetune": finetune_vit, "linprobe": linprobe_vit, "segment": segment_vit}


@pytest.mark.parametrize("task", BUILDERS)
def test_init_mae_gives_xavier_linears_and_timm_gives_trunc_normal(task):
    torch.manual_seed(0)
    timm_qkv = BUILDERS[task]("model.init=timm").blocks[0].attn.qkv.weight
    torch.manual_seed(0)
    mae_qkv = BUILDERS[task]("model.init=mae").blocks[0].attn.qkv.weight
    # xavier-uniform on a (3D x D) matrix: std sqrt(2 / (D + 3D)); timm: trunc-normal std 0.02
    assert mae_qkv.std().item() == pytest.approx(math.sqrt(2 / (4 * WIDTH)), rel=0.05)
    assert timm_qkv.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("task", BUILDERS)
def test_pos_embed_sincos_is_mae_s_fixed_table(task):
    learned = BUILDERS[task]("model.pos_embed=learned")
    fixed = BUILDERS[task]("model.pos_embed=sincos")
    table = sincos_table(fixed.patch_embed.grid_size, WIDTH, 1)
    assert torch.allclose(fixed.pos_embed.detach(), table.to(fixed.pos_embed.dtype), atol=1e-6)
    assert not fixed.pos_embed.requires_grad
    assert not torch.allclose(learned.pos_embed.detach(), table, atol=1e-3)
    assert learned.pos_embed.requires_grad == (task != "linprobe")  # a probe's backbone is frozen whole


@pytest.mark.parametrize("task", ["finetune", "segment"])
def test_drop_path_schedule_and_block_heads(task):
    ramp = BUILDERS[task]("model.drop_path_rate=0.2", "model.drop_path_schedule=linear")
    flat = BUILDERS[task]("model.drop_path_rate=0.2", "model.drop_path_schedule=constant", "model.block_heads={3: 6}")
    assert [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in ramp.blocks] == pytest.approx([0.0, 0.1, 0.2])
    assert [float(b.drop_path1.drop_prob) for b in flat.blocks] == pytest.approx([0.2] * DEPTH)
    assert [b.attn.num_heads for b in flat.blocks] == [HEADS, HEADS, 6]
    assert [b.attn.num_heads for b in ramp.blocks] == [HEADS] * DEPTH


def test_block_heads_reach_the_probed_backbone():
    assert [b.attn.num_heads for b in linprobe_vit("model.block_heads={1: 6}").blocks] == [6, HEADS, HEADS]


def test_keys_that_cannot_apply_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="linear probe") as e:
        linprobe_vit("model.drop_path_rate=0.1")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="pretrained=true needs a timm model name"):
        finetune_vit("model.pretrained=true")
    from tinymim.tasks.mae import MAEConfig
    with pytest.raises(ConfigError, match="sin-cos") as e:
        load_config(MAEConfig, None, [*SIZES, "data.img_size=32", "model.pos_embed=learned"])
    assert "\n" not in str(e.value)


def test_the_same_setup_baseline_is_mae_initialized_throughout():
    """model.init=mae without init weights: every linear layer of the encoder xavier-uniform, biases
    zero, the patch convolution xavier over its flattened weight, class token std 0.02 (MAE's encoder,
    the student a distill run starts from: the 'same setup, no pre-training' baseline)."""
    torch.manual_seed(0)
    vit = finetune_vit("model.init=mae", "model.pos_embed=sincos", "model.depth=2", "model.embed_dim=96")
    for name, module in vit.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.startswith("head"):
            fan_out, fan_in = module.weight.shape
            assert module.weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.05), name
            assert not module.bias.any(), name
    conv = vit.patch_embed.proj.weight
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (conv[0].numel() + conv.shape[0])), rel=0.05)
    assert vit.cls_token.std().item() == pytest.approx(0.02, rel=0.5)  # 96 draws
