"""Semantic segmentation on a ViT backbone: the release's UperNet setup (docs/method.md section 4), without
mmcv/mmseg.

- `ViTPyramid`: features of four blocks (default 4, 6, 8, 12 of 12, 1-indexed) through timm's
  `forward_intermediates`, made into strides 4 / 8 / 16 / 32 for patch 16: 4x up (deconv-BN-GELU-deconv),
  2x up (deconv), identity, 2x down (max-pool).
- `UperHead`: pyramid pooling (scales 1, 2, 3, 6) on the coarsest level, lateral 1x1 convs, top-down
  FPN, 3x3 convs, all levels upsampled to the finest and fused (UperNet, Xiao et al. 2018, as mmseg's).
- `FCNHead`: the auxiliary head on the third level (loss weight 0.4 in the recipes).
- The release's backbone options: `add_relative_position_bias` (BEiT's per-block relative position bias
  table, zero-initialised) on timm's blocks; layer scale is timm's own (`init_values`).
- `release_layer_id`: the release's layer-wise lr decay assignment (embeddings 0, block i i, the rest
  depth + 1), and `mmseg_init_` for the heads (mmcv's ConvModule / decode-head init).
- `slide_inference`: mmseg's sliding window (windows clipped to the image, logits averaged where they
  overlap); `confusion_matrix` and `segmentation_metrics`: mIoU, mAcc, aAcc and per-class IoU with the
  ignore label honoured (a class absent from both labels and predictions is left out of the means).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.beit import gen_relative_position_index


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class RelPosBiasAttention(Attention):
    """timm's Attention plus BEiT's relative position bias (the release's `use_rel_pos_bias`): a learned
    table of (2 Wh - 1)(2 Ww - 1) + 3 entries per head (every 2-D offset between patches, then
    class->patch, patch->class, class->class) added to the attention logits q k^T / sqrt(d) before the
    softmax. Zero-initialised, so a block starts as the plain one. The index is built for one patch
    grid (the training crop's); the bias goes in through timm's additive `attn_mask`, so the fused and
    the plain attention paths both take it. With TinyMIM*-T's distillation token the table has 6 extra
    entries, laid out as the release's backbone (`relative_position_index`)."""

    def init_relative_position(self, grid: tuple[int, int], prefix_tokens: int = 1) -> None:
        index = relative_position_index(grid, prefix_tokens)
        device = self.qkv.weight.device
        self.grid = tuple(grid)
        entries = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3 * prefix_tokens
        self.relative_position_bias_table = nn.Parameter(torch.zeros(entries, self.num_heads, device=device))
        self.register_buffer("relative_position_index", index.to(device), persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        """heads x N x N (N = patches + 1): the table's entry for each token pair."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if x.shape[1] != self.relative_position_index.shape[0]:
            raise ValueError(f"relative position bias is built for a {self.grid[0]}x{self.grid[1]} patch grid plus "
                             f"prefix tokens ({self.relative_position_index.shape[0]} tokens), got {x.shape[1]} "
                             "tokens: infer on crop-sized windows (data.eval_mode=slide)")
        bias = self.relative_position_bias().to(x.dtype)[None]  # autocast casts it with q, k, v where it must
        return super().forward(x, attn_mask=bias if attn_mask is None else attn_mask + bias, is_causal=is_causal)


def relative_position_index(grid: tuple[int, int], prefix_tokens: int = 1) -> torch.Tensor:
    """N x N indices into the bias table (N = patches + prefix tokens). One prefix token (the class
    token): BEiT's layout, patch pairs by 2-D offset, then class->patch, patch->class, class->class.
    Two (class, distillation): the release's TinyMIM*-T layout, 6 extra entries (its code assigns them
    in an order where later lines overwrite earlier ones; this is the result): class->class n-1, class->
    any other n-3, any other->class n-2, dist->dist n-4, dist->patch n-6, patch->dist n-5."""
    index = gen_relative_position_index(tuple(grid))
    if prefix_tokens == 1:
        return index
    n = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 6
    out = torch.zeros(index.shape[0] + 1, index.shape[1] + 1, dtype=index.dtype)
    out[2:, 2:] = index[1:, 1:]
    out[1, 2:], out[2:, 1], out[1, 1] = n - 6, n - 5, n - 4
    out[0, 1:], out[1:, 0], out[0, 0] = n - 3, n - 2, n - 1
    return out


def add_relative_position_bias(vit: nn.Module) -> None:
    """Give every block of a timm ViT a relative position bias table (zero) for its patch grid. Needs a
    class token and no register tokens (BEiT's index has a row and column for the class token; the
    release's TinyMIM*-T adds its distillation token)."""
    prefix = vit.num_prefix_tokens
    if (not getattr(vit, "has_class_token", True) or getattr(vit, "num_reg_tokens", 0)
            or prefix - (1 if hasattr(vit, "dist_token") else 0) != 1):
        raise ValueError(f"relative position bias needs a ViT with a class token and no register tokens "
                         f"(this one has {prefix} prefix tokens)")
    grid = tuple(vit.patch_embed.grid_size)
    for block in vit.blocks:
        if type(block.attn) is not Attention:
            raise ValueError(f"relative position bias is written for timm's Attention, not {type(block.attn).__name__}")
        block.attn.__class__ = RelPosBiasAttention  # same weights and forward, plus the table
        block.attn.init_relative_position(grid, prefix)


def release_layer_id(name: str, depth: int, prefix: str = "pyramid.vit.") -> int:
    """The release's layer for a parameter (mmcv_custom/layer_decay_optimizer_constructor.py,
    get_num_layer_for_vit): class token, position embedding and patch embedding 0, block i (0-indexed)
    i + 1, everything else (pyramid, heads) depth + 1. Its lr is scaled by decay ** (depth + 1 - layer)."""
    if not name.startswith(prefix):
        return depth + 1
    rest = name[len(prefix):]
    if rest in ("cls_token", "mask_token", "pos_embed") or rest.startswith("patch_embed"):
        return 0
    if rest.startswith("blocks."):
        return int(rest.split(".")[1]) + 1
    return depth + 1


def mmseg_init_(module: nn.Module, classifier_std: float = 0.01) -> None:
    """mmseg's decode-head init: every convolution kaiming-normal (fan_out, relu) with zero bias, every
    norm weight 1 and bias 0 (mmcv ConvModule.init_weights), the classifiers normal std 0.01
    (BaseDecodeHead.init_weights)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(getattr(m, "classifier", None), nn.Conv2d):
            nn.init.normal_(m.classifier.weight, std=classifier_std)
            nn.init.zeros_(m.classifier.bias)


class ViTPyramid(nn.Module):
    """A timm VisionTransformer -> four feature maps at strides patch/4, patch/2, patch, 2 x patch.

    The pyramid reads blocks' outputs only: the ViT's final norm, pooling norm and classifiers are
    dropped (a parameter without a gradient stops DistributedDataParallel at its second step).

    A plain ViT (the release's TinyMIM backbone): D channels at every level; 4x up (deconv-BN-GELU-
    deconv), 2x up (deconv), identity, 2x down (max-pool). A ViT with TinyMIM*-T's extra head path
    (`conv1x1`: LayerNorm, Linear D -> E, GELU): 4D channels at every level, as the release's T*
    backbone: deconv D -> 2D, BN, GELU, deconv 2D -> 4D; deconv D -> 4D; a 1x1 conv D -> 4D; and the
    last block's tokens through conv1x1, then a 3x3 stride-2 conv E -> 4D."""

    def __init__(self, vit: nn.Module, blocks=(4, 6, 8, 12)):
        super().__init__()
        depth = len(vit.blocks)
        if len(blocks) != 4 or not all(1 <= b <= depth for b in blocks) or sorted(set(blocks)) != list(blocks):
            # timm's forward_intermediates returns each block once, in order
            raise ValueError(f"four different backbone blocks in 1..{depth}, in increasing order, are needed, "
                             f"got {list(blocks)}")
        vit.norm, vit.fc_norm, vit.head = nn.Identity(), nn.Identity(), nn.Identity()
        if hasattr(vit, "head_dist"):
            vit.head_dist = nn.Identity()
        self.vit, self.indices = vit, [b - 1 for b in blocks]
        dim = vit.embed_dim
        self.star = hasattr(vit, "conv1x1")
        if self.star:
            extra = vit.conv1x1[1].out_features
            self.channels = 4 * dim
            self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, 2 * dim, 2, 2), nn.BatchNorm2d(2 * dim), nn.GELU(),
                                     nn.ConvTranspose2d(2 * dim, 4 * dim, 2, 2))
            self.up2 = nn.ConvTranspose2d(dim, 4 * dim, 2, 2)
            self.same = nn.Conv2d(dim, 4 * dim, 1)
            self.down2 = nn.Conv2d(extra, 4 * dim, 3, stride=2, padding=1)
        else:
            self.channels = dim
            self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                     nn.ConvTranspose2d(dim, dim, 2, 2))
            self.up2 = nn.ConvTranspose2d(dim, dim, 2, 2)
            self.same = nn.Identity()
            self.down2 = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.vit.forward_intermediates(x, indices=self.indices, output_fmt="NCHW", intermediates_only=True)
        last = feats[3]
        if self.star:  # conv1x1 works token by token: on the patch tokens of the map it is the same
            last = self.vit.conv1x1(last.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return [self.up4(feats[0]), self.up2(feats[1]), self.same(feats[2]), self.down2(last)]


class UperHead(nn.Module):
    """UperNet's decode head over a 4-level pyramid of `cin` channels each; logits at the finest level."""

    def __init__(self, cin: int, channels: int, num_classes: int, pool_scales=(1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(cin, channels, 1))
                                 for s in pool_scales)
        self.bottleneck = conv_bn_relu(cin + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(cin, channels, 1) for _ in range(3))
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fuse = conv_bn_relu(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    @staticmethod
    def _resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[3]
        pooled = [self._resize(branch(top), top) for branch in self.ppm]
        laterals = [lat(f) for lat, f in zip(self.lateral, feats[:3])] + [self.bottleneck(torch.cat([top, *pooled], 1))]
        for i in range(3, 0, -1):  # top-down: each level gets the coarser one added
            laterals[i - 1] = laterals[i - 1] + self._resize(laterals[i], laterals[i - 1])
        outs = [conv(lat) for conv, lat in zip(self.fpn, laterals[:3])] + [laterals[3]]
        fused = self.fuse(torch.cat([outs[0], *(self._resize(o, outs[0]) for o in outs[1:])], 1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head: one 3x3 conv-BN-ReLU and a classifier on one pyramid level."""

    def __init__(self, cin: int, channels: int, num_classes: int, level: int = 2, dropout: float = 0.1):
        super().__init__()
        self.level = level
        self.conv = conv_bn_relu(cin, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(feats[self.level])))


class Segmenter(nn.Module):
    """Backbone pyramid + UperNet head (+ the auxiliary FCN head while training). forward(x) returns the
    logits at the input's size, and in training mode also the auxiliary head's."""

    def __init__(self, vit: nn.Module, num_classes: int, blocks=(4, 6, 8, 12), channels: int = 768,
                 aux_channels: int = 256):
        super().__init__()
        self.pyramid = ViTPyramid(vit, blocks)
        self.decode = UperHead(self.pyramid.channels, channels, num_classes)
        self.aux = FCNHead(self.pyramid.channels, aux_channels, num_classes)

    def forward(self, x: torch.Tensor):
        feats = self.pyramid(x)
        logits = F.interpolate(self.decode(feats), size=x.shape[-2:], mode="bilinear", align_corners=False)
        if not self.training:
            return logits
        aux = F.interpolate(self.aux(feats), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits, aux


@torch.no_grad()
def slide_inference(model: nn.Module, img: torch.Tensor, num_classes: int, window: int, stride: int,
                    max_batch: int = 16) -> torch.Tensor:
    """Logits (B x C x H x W) averaged over windows of `window` pixels every `stride` pixels, the last
    window of a row or column moved back to end at the border (mmseg's `slide_inference`). An image
    smaller than the window is inferred whole. The windows go through the model together, up to
    `max_batch` crops a pass (mmseg runs them one by one: the same logits, in fewer, fuller passes)."""
    b, _, h, w = img.shape
    if h <= window and w <= window:
        return model(img)
    rows = max(h - window + stride - 1, 0) // stride + 1
    cols = max(w - window + stride - 1, 0) // stride + 1
    boxes = []  # (y1, y2, x1, x2) of every window: all the same size, so they stack
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + window, h), min(c * stride + window, w)
            boxes.append((max(y2 - window, 0), y2, max(x2 - window, 0), x2))
    logits = img.new_zeros((b, num_classes, h, w))
    count = img.new_zeros((1, 1, h, w))
    per_pass = max(1, max_batch // b)  # windows a pass, each cut from all b images
    for i in range(0, len(boxes), per_pass):
        group = boxes[i:i + per_pass]
        out = model(torch.cat([img[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in group]))
        for j, (y1, y2, x1, x2) in enumerate(group):
            logits[:, :, y1:y2, x1:x2] += out[j * b:(j + 1) * b]
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """C x C int64 counts: rows the true class, columns the predicted one; ignored pixels left out."""
    keep = label != ignore_index
    index = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: torch.Tensor, class_names=None) -> dict:
    """mIoU, mAcc, aAcc (%) and per-class IoU from a confusion matrix. A class with no pixels in the labels
    has no accuracy, and one absent from labels and predictions no IoU: they are left out of the means."""
    cm = confusion.double()
    tp, true, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    union = true + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(true > 0, tp / true.clamp(min=1), torch.full_like(tp, float("nan")))
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(cm))]
    return {"mIoU": 100 * float(iou.nanmean()), "mAcc": 100 * float(acc.nanmean()),
            "aAcc": 100 * float(tp.sum() / cm.sum().clamp(min=1)),
            "per_class_iou": {n: 100 * float(v) for n, v in zip(names, iou)}}
