"""Vision Transformers for tinymim: timm's VisionTransformer, plus the three things TinyMIM needs.

Longer than 300 lines because the config, the sizes it resolves to and the builder are one idea that
calls itself both ways (vit_sizes builds on the meta device, create_vit reads the sizes).

1. Any timm ViT by name (`vit_small_patch16_224`, ...) or custom sizes for small experiments.
2. Per-block head counts: qkv weights do not depend on the head count, so a block can be told to
   split its Q/K/V into a different number of heads (the student's relation block takes the
   teacher's head count; `last_heads` in the public release).
3. Running a model only up to block k (a teacher's later blocks are never needed).

And the release's student setup as options: MAE's initialization (`init: mae`) and MAE's fixed 2-D
sin-cos position embedding, frozen (`pos_embed: sincos`); TinyMIM*-T's distillation token and extra
head path (`dist_token`, `extra_head_dim`: tinymim.models.star.DistilledViT).
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Literal

import timm
import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models import vision_transformer as _vit_module
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

from tinymim.core.config import ConfigError
from tinymim.core.hub import hub_or_cache, offline_message
from tinymim.method.mae import fix_sincos_pos_embed, sincos_table  # noqa: F401 - MAE's table, used by create_vit
from tinymim.models.star import build_distilled_vit

CUSTOM = "vit_custom"
HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")
# timm families whose blocks a teacher may come from (method/attention.py reads their Q/K/V); a
# student is always a VisionTransformer
TEACHER_FAMILIES = ("VisionTransformer", "Eva")
VIT_MODULES = ("vision_transformer", "eva", "deit")  # timm modules whose models are of these families


@dataclass
class ModelConfig:
    """A ViT: a timm name (sizes may be overridden) or `vit_custom` with every size given."""

    # a timm ViT name (vit_small_patch16_224, ...; a teacher may be EVA, eva02_*, or a hub name,
    # hf-hub:ORG/REPO) or vit_custom with every size given
    name: str = "vit_small_patch16_224"
    img_size: int | None = None  # input image size in pixels; null: the data's
    patch_size: int | None = None  # patch size in pixels; null: the timm model's
    embed_dim: int | None = None  # token width; null: the timm model's
    depth: int | None = None  # number of transformer blocks; null: the timm model's
    num_heads: int | None = None  # attention heads per block; null: the timm model's
    # register tokens after the class token (DINOv2 with registers: 4); null: the timm model's (vit_custom: 0)
    reg_tokens: int | None = None
    # head count per block, 1-indexed block -> heads; weights are unaffected
    block_heads: dict = field(default_factory=dict)
    drop_path_rate: float = 0.0  # stochastic depth rate (see drop_path_schedule)
    # "linear": timm's ramp 0..rate over depth; "constant": rate in every block (TinyMIM pre-training)
    drop_path_schedule: Literal["linear", "constant"] = "linear"
    # load timm's pretrained weights for `name` (needs the network unless cached)
    pretrained: bool = False
    # initialization: "timm" (timm's default: trunc-normal 0.02, class token ~1e-6) or "mae" (MAE's
    # encoder, the release's TinyMIM student: xavier-uniform linears, patch conv as a linear layer,
    # class token normal 0.02)
    init: Literal["timm", "mae"] = "timm"
    # position embedding: "learned" (timm) or "sincos" (MAE's fixed 2-D sin-cos table, never trained)
    pos_embed: Literal["learned", "sincos"] = "learned"
    # a DeiT distillation token ([cls, dist, patches]) and a second head, head_dist, trained on a teacher's
    # predictions: the model becomes tinymim.models.star.DistilledViT (TinyMIM*-T)
    dist_token: bool = False
    # width of TinyMIM*-T's extra head path conv1x1 (LayerNorm, Linear, GELU on every token after the
    # last block; the release: 1280); null: none. Needs dist_token
    extra_head_dim: int | None = None

    def validate(self) -> None:
        if self.name == CUSTOM:
            missing = [k for k in ("patch_size", "embed_dim", "depth", "num_heads")
                       if getattr(self, k) is None]
            if missing:
                raise ValueError(f"model {CUSTOM} needs {', '.join(missing)}")
        self.block_heads = {int(k): int(v) for k, v in self.block_heads.items()}
        if self.pretrained and self.name == CUSTOM:
            raise ValueError(f"pretrained=true needs a timm model name: {CUSTOM} has no pretrained weights "
                             "(give init=PATH for your own, or name a timm ViT)")
        if self.name != CUSTOM and not self.name.startswith(HUB_PREFIXES):
            if not timm.is_model(self.name.split(".")[0]):
                raise ValueError(f"unknown timm model {self.name!r}; see timm.list_models('vit_*') (or "
                                 f"'eva02_*' for a teacher), or use {CUSTOM}")
            module = timm.models.model_entrypoint(self.name.split(".")[0]).__module__.rsplit(".", 1)[-1]
            if module not in VIT_MODULES:
                raise ValueError(f"name {self.name!r} is not a ViT; use a timm vit_* name (eva02_* for a teacher) "
                                 f"or {CUSTOM}")
        for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} must be positive, got {value}")
        if self.reg_tokens is not None and self.reg_tokens < 0:
            raise ValueError(f"reg_tokens must be 0 or more, got {self.reg_tokens}")
        if self.embed_dim is not None and self.num_heads is not None and self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.extra_head_dim is not None and self.extra_head_dim < 1:
            raise ValueError(f"extra_head_dim must be positive (the release: 1280) or null, got {self.extra_head_dim}")
        if self.extra_head_dim is not None and not self.dist_token:
            raise ValueError(f"extra_head_dim={self.extra_head_dim} is TinyMIM*-T's extra head path, which comes "
                             "with its distillation token: set dist_token=true (or extra_head_dim=null)")
        if self.dist_token and self.pretrained:
            raise ValueError("dist_token=true builds the model in tinymim, without timm's pretrained weights: "
                             "set pretrained=false and load them with init=NAME (the class token is copied)")


def patch_size_of(cfg: ModelConfig) -> int | None:
    """The patch size a config builds: given, or read from a timm name (vit_small_patch16_224 -> 16)."""
    if cfg.patch_size is not None:
        return cfg.patch_size
    m = re.search(r"patch(\d+)", cfg.name)
    return int(m.group(1)) if m else None


def check_input_size(cfg: ModelConfig, img_size: int, where: str) -> None:
    """A model must take the data's images: same size (when the model names one), whole patches."""
    if cfg.img_size is not None and cfg.img_size != img_size:
        raise ValueError(f"{where}.img_size {cfg.img_size} differs from data.img_size {img_size}: the model "
                         f"sees the data's images; set both to the same size (or leave {where}.img_size unset)")
    patch = patch_size_of(cfg)
    if patch is not None and img_size % patch:
        raise ValueError(f"data.img_size {img_size} is not a multiple of {where}'s patch size {patch}: choose "
                         f"an image size in steps of {patch}")


def size_args(cfg: ModelConfig) -> dict:
    """The sizes a ModelConfig sets (img_size, patch_size, embed_dim, depth, num_heads, reg_tokens), as kwargs."""
    return {k: getattr(cfg, k) for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "reg_tokens")
            if getattr(cfg, k) is not None}


def timm_architecture(cfg: ModelConfig) -> str:
    """A registered timm name that, with size_args(cfg), builds cfg's model (custom sizes ride on any ViT)."""
    return "vit_base_patch16_224" if cfg.name == CUSTOM else cfg.name.split(".")[0]


class _Sizes(Exception):
    def __init__(self, kwargs: dict):
        super().__init__("sizes")
        self.kwargs = kwargs


def _capture_sizes(variant, pretrained=False, **kwargs):
    raise _Sizes(kwargs)


def vit_sizes(cfg: ModelConfig, families: tuple[str, ...] = ("VisionTransformer",)) -> dict:
    """depth, embed_dim, num_heads, patch_size, reg_tokens and class_token of the model `cfg`
    describes, without building it: cfg's own sizes, else the arguments timm's registered entrypoint
    passes to its VisionTransformer (captured on their way in), else VisionTransformer's defaults. A
    ViT timm builds elsewhere (EVA, a hub name) is built once on the meta device, which allocates
    nothing (a hub name reads its config from the hub or its local cache)."""
    keys = ("depth", "embed_dim", "num_heads", "patch_size", "reg_tokens", "class_token")
    given = {k: getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None}
    defaults = inspect.signature(VisionTransformer).parameters
    if cfg.name == CUSTOM:
        return {k: given.get(k, defaults[k].default) for k in keys}
    name = cfg.name.split(".")[0]
    entry = timm.models.model_entrypoint(name) if timm.is_model(name) else None
    if entry is not None and entry.__module__ == _vit_module.__name__:
        real, _vit_module._create_vision_transformer = _vit_module._create_vision_transformer, _capture_sizes
        try:
            entry(pretrained=False)
        except _Sizes as captured:
            return {k: given.get(k, captured.kwargs.get(k, defaults[k].default)) for k in keys}
        finally:
            _vit_module._create_vision_transformer = real
    with torch.device("meta"):
        model = create_vit(ModelConfig(name=cfg.name, **size_args(cfg)), families=families)
    cls, regs = prefix_layout(model)
    return {"depth": len(model.blocks), "embed_dim": model.embed_dim, "num_heads": model.blocks[0].attn.num_heads,
            "patch_size": model.patch_embed.patch_size[0], "reg_tokens": regs, "class_token": bool(cls)}


def create_vit(cfg: ModelConfig, num_classes: int = 0, families: tuple[str, ...] = ("VisionTransformer",),
               **extra) -> VisionTransformer:
    """Build a timm VisionTransformer from a ModelConfig (no classifier head by default); with
    cfg.dist_token a tinymim.models.star.DistilledViT (a VisionTransformer too). `families` are the
    timm classes accepted (a teacher's: TEACHER_FAMILIES, which adds EVA)."""
    kwargs = dict(num_classes=num_classes, **size_args(cfg), **extra)
    if cfg.drop_path_schedule == "linear":
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    try:
        if cfg.dist_token:
            model = build_distilled_vit(None if cfg.name == CUSTOM else cfg.name, cfg.extra_head_dim, **kwargs)
        elif cfg.name == CUSTOM:
            model = VisionTransformer(**kwargs)
        else:
            with hub_or_cache():  # a hub name or pretrained weights: refused at once offline, unless cached
                model = timm.create_model(cfg.name, pretrained=cfg.pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"unknown timm model {cfg.name!r}: see timm.list_models('vit_*')") from e
        raise
    except OSError as e:  # offline hub download (huggingface_hub's errors are OSErrors)
        raise ConfigError(offline_message(cfg.name, e)) from e
    if type(model).__name__ not in families and not isinstance(model, VisionTransformer):
        raise ConfigError(f"{cfg.name!r} builds a timm {type(model).__name__}; tinymim takes "
                          f"{' or '.join(families)} here: choose a timm vit_* model"
                          + ("" if "Eva" in families else " (EVA models can be teachers, not students)"))
    if cfg.init == "mae" and not cfg.pretrained:
        mae_init_(model)
    if cfg.pos_embed == "sincos":
        fix_sincos_pos_embed(model)
    if cfg.drop_path_schedule == "constant":
        set_drop_path(model, cfg.drop_path_rate)
    for block_idx, heads in cfg.block_heads.items():
        if not 1 <= block_idx <= len(model.blocks):
            raise ValueError(f"block_heads names block {block_idx}, but the model has {len(model.blocks)} blocks")
        set_block_heads(model.blocks[block_idx - 1], heads)
    return model


def mae_init_(model: VisionTransformer) -> None:
    """MAE's encoder initialization, which the release's TinyMIM student uses: xavier-uniform on every
    linear layer (qkv as one fused matrix: std sqrt(1 / 2D)), zero biases, LayerNorm 1 / 0, the
    patch-embed convolution as a linear layer (xavier-uniform on its flattened weight; its bias keeps
    PyTorch's default, as MAE's), class, register and distillation tokens normal std 0.02."""
    conv = model.patch_embed.proj
    conv.reset_parameters()
    nn.init.xavier_uniform_(conv.weight.data.view(conv.weight.shape[0], -1))
    for token in (model.cls_token, getattr(model, "reg_token", None), getattr(model, "dist_token", None)):
        if token is not None:
            nn.init.normal_(token, std=0.02)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def set_drop_path(model: VisionTransformer, rate: float, blocks: range | None = None) -> None:
    """Same drop-path rate in the given blocks (all by default)."""
    for i in blocks if blocks is not None else range(len(model.blocks)):
        b = model.blocks[i]
        b.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        b.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()


def set_block_heads(block: nn.Module, num_heads: int) -> None:
    """Make a timm ViT block split its Q/K/V into `num_heads` heads (weights unchanged)."""
    attn = block.attn
    dim = attn.qkv.out_features // 3
    if dim % num_heads:
        raise ValueError(f"a block of width {dim} cannot be split into {num_heads} heads "
                         f"({dim} is not divisible by {num_heads})")
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
        raise ValueError("blocks with qk_norm have per-head-size weights; their head count cannot change")
    attn.num_heads = num_heads
    attn.head_dim = dim // num_heads
    attn.scale = attn.head_dim ** -0.5


def block_heads(model: VisionTransformer) -> list[int]:
    return [b.attn.num_heads for b in model.blocks]


def prefix_layout(vit: nn.Module) -> tuple[int, int]:
    """(class tokens, register tokens) in front of a timm ViT's (or EVA's) patch tokens, in that order."""
    cls = int(getattr(vit, "cls_token", None) is not None)
    return cls, vit.num_prefix_tokens - cls


def num_tokens(model: VisionTransformer) -> int:
    """Tokens entering the blocks: patches plus class/register tokens."""
    return model.patch_embed.num_patches + model.num_prefix_tokens


def embed(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Image -> tokens entering block 1 (patch embedding, class token, position embedding)."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def run_blocks(model: VisionTransformer, x: torch.Tensor, blocks) -> torch.Tensor:
    """Tokens through `blocks` of `model`; with timm's grad checkpointing on (set_grad_checkpointing)
    and gradients wanted, each block's activations are recomputed in the backward instead of kept."""
    if getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled():
        for blk in blocks:
            x = checkpoint(blk, x, use_reentrant=False)
        return x
    for blk in blocks:
        x = blk(x)
    return x


def tokens_before_block(model: VisionTransformer, x: torch.Tensor, k: int) -> torch.Tensor:
    """Run an image through blocks 1..k-1 (1-indexed) and return the tokens entering block k."""
    if not 1 <= k <= len(model.blocks):
        raise ValueError(f"block {k} does not exist: the model has blocks 1..{len(model.blocks)}")
    x = embed(model, x)
    for blk in model.blocks[: k - 1]:
        x = blk(x)
    return x


def truncate(model: VisionTransformer, k: int) -> VisionTransformer:
    """Drop every block after k and the final norm/head: a teacher never needs them."""
    model.blocks = model.blocks[:k]
    model.norm = nn.Identity()
    model.fc_norm = nn.Identity()
    model.head = nn.Identity()
    return model


class TokenFeatures(nn.Module):
    """Average of the patch tokens entering block k (1-indexed; k = depth + 1 means after the last
    block and its final norm): a frozen-feature view of a ViT for k-NN and probes."""

    def __init__(self, vit: VisionTransformer, block: int | None = None):
        super().__init__()
        self.vit, self.block = vit, block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block is None or self.block > len(self.vit.blocks):
            tokens = self.vit.forward_features(x)
        else:
            tokens = tokens_before_block(self.vit, x, self.block)
        return tokens[:, self.vit.num_prefix_tokens:].mean(1)
