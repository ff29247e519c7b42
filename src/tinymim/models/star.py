"""TinyMIM*-T's classifier: a ViT with a DeiT distillation token and TinyMIM*-T's extra head path.

The official release ships only TinyMIM*-T's segmentation backbone (release_notes.md section 4): the
token layout [cls, dist, patches] with a position embedding of N + 2 rows (timm's DeiT layout), and
`conv1x1` = LayerNorm(D) (eps 1e-5), Linear(D, 1280), GELU, applied to every token after the last
block. Its fine-tuned checkpoint also holds `fc_norm`, `head` and `head_dist` and no final `norm`,
but the classification code is not in the release. How those heads read the tokens here is our
reading of that checkpoint, following the release's fine-tuning code base (MAE's global pooling) and
DeiT: `head` on fc_norm(mean of the patch tokens), `head_dist` on the distillation token.
"""
from __future__ import annotations

import timm
import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.deit import VisionTransformerDistilled

from tinymim.core.config import ConfigError

__all__ = ["DistilledViT", "build_distilled_vit"]


class DistilledViT(VisionTransformerDistilled):
    """timm's DeiT-distilled ViT, plus MAE's global pooling and TinyMIM*-T's optional extra head path.

    - Tokens [cls, dist, patches]; `pos_embed` (1, N + 2, D); both prefix tokens are dropped by
      timm's `forward_intermediates` and pooling.
    - `extra_dim` E (TinyMIM*-T: 1280): `conv1x1` = Sequential(LayerNorm(D), Linear(D, E), GELU) on
      every token after the last block, in place of the final `norm` (the released checkpoint has no
      norm.* keys); then `fc_norm` = LayerNorm(E, eps 1e-6) and both heads are Linear(E, classes).
    - `global_pool="avg"` (default; our reading of the release): `head` on fc_norm(mean of the patch
      tokens), `head_dist` on the distillation token. `"token"`: timm's DeiT heads (class token,
      distillation token), unchanged.
    - Training mode returns (class_logits, dist_logits) for the DeiT loss; eval mode their average
      (timm's `set_distilled_training(False)` averages in training too).
    """

    def __init__(self, *args, extra_dim: int | None = None, global_pool: str = "avg", fc_norm: bool | None = None,
                 **kwargs):
        if global_pool not in ("avg", "token"):
            raise ValueError(f"DistilledViT pools 'avg' (mean of the patch tokens) or 'token', got {global_pool!r}")
        # timm's class insists on token pooling; fc_norm=True gives MAE's layout (no final norm, fc_norm)
        super().__init__(*args, global_pool="token", fc_norm=global_pool == "avg" if fc_norm is None else fc_norm,
                         **kwargs)
        self.global_pool = global_pool
        self.distilled_training = True  # training mode returns both heads' logits
        if extra_dim:
            dim, classes = self.embed_dim, self.num_classes
            self.norm = nn.Identity()
            self.conv1x1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, extra_dim), nn.GELU())
            self.num_features = self.head_hidden_size = extra_dim
            if not isinstance(self.fc_norm, nn.Identity):  # eps as MAE's fc_norm (the release's eps is not known)
                self.fc_norm = nn.LayerNorm(extra_dim, eps=1e-6)
            self.head = nn.Linear(extra_dim, classes) if classes > 0 else nn.Identity()
            self.head_dist = nn.Linear(extra_dim, classes) if classes > 0 else nn.Identity()
            for m in (self.conv1x1[1], self.head, self.head_dist):  # timm's init of its linear layers
                if isinstance(m, nn.Linear):
                    trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None and global_pool != self.global_pool:
            raise ValueError("DistilledViT's pooling is set when it is built")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Tokens after the last block and the final norm, or through conv1x1 when there is one."""
        x = super().forward_features(x, *args, **kwargs)
        conv1x1 = getattr(self, "conv1x1", None)  # an attribute only when it exists (segmentation checks)
        return conv1x1(x) if conv1x1 is not None else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if self.global_pool == "token":
            return super().forward_head(x, pre_logits)  # timm's DeiT: class token and distillation token
        cls = self.head_drop(self.fc_norm(self.pool(x)))  # mean of the patch tokens (both prefix tokens dropped)
        dist = self.head_drop(x[:, 1])
        if pre_logits:
            return (cls + dist) / 2
        cls, dist = self.head(cls), self.head_dist(dist)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return cls, dist
        return (cls + dist) / 2


def build_distilled_vit(name: str | None, extra_dim: int | None = None, **kwargs) -> DistilledViT:
    """A DistilledViT of custom sizes (`name` None: timm's ViT defaults where `kwargs` is silent), or
    shaped as the timm ViT `name` (patch size, width, depth, heads, MLP ratio, qkv bias read from it,
    `kwargs` override). A timm name with parts this layout does not build (register tokens, layer
    scale, other norms ...) is refused rather than built differently."""
    kwargs.setdefault("global_pool", "avg")
    if name is None:
        return DistilledViT(extra_dim=extra_dim, **kwargs)
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False, **kwargs)
        block = ref.blocks[0]
        shape = dict(img_size=ref.patch_embed.img_size, patch_size=ref.patch_embed.patch_size,
                     embed_dim=ref.embed_dim, depth=len(ref.blocks), num_heads=block.attn.num_heads,
                     mlp_ratio=block.mlp.fc1.out_features / ref.embed_dim, qkv_bias=block.attn.qkv.bias is not None)
        plain = DistilledViT(**{**shape, **kwargs})
    skip = ("dist_token", "pos_embed", "head_dist.")
    ours = {k: v.shape for k, v in plain.state_dict().items() if not k.startswith(skip)}
    theirs = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith(skip)}
    if ours != theirs:
        differ = sorted(set(ours) ^ set(theirs)) or [k for k in ours if ours[k] != theirs[k]]
        raise ConfigError(f"model.dist_token builds a plain ViT with a distillation token; {name} has other parts "
                         f"({', '.join(differ[:4])}): use a plain vit_* name or vit_custom")
    return DistilledViT(extra_dim=extra_dim, **{**shape, **kwargs})
