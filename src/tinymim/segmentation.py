"""Semantic segmentation on a ViT backbone: the release's UperNet setup (TINYMIM.md section 4), without
mmcv/mmseg.

- `ViTPyramid`: features of four blocks (default 4, 6, 8, 12 of 12, 1-indexed) through timm's
  `forward_intermediates`, made into strides 4 / 8 / 16 / 32 for patch 16: 4x up (deconv-BN-GELU-deconv),
  2x up (deconv), identity, 2x down (max-pool).
- `UperHead`: pyramid pooling (scales 1, 2, 3, 6) on the coarsest level, lateral 1x1 convs, top-down
  FPN, 3x3 convs, all levels upsampled to the finest and fused (UperNet, Xiao et al. 2018, as mmseg's).
- `FCNHead`: the auxiliary head on the third level (loss weight 0.4 in the recipes).
- `slide_inference`: mmseg's sliding window (windows clipped to the image, logits averaged where they
  overlap); `confusion_matrix` and `segmentation_metrics`: mIoU, mAcc, aAcc and per-class IoU with the
  ignore label honoured (a class absent from both labels and predictions is left out of the means).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ViTPyramid(nn.Module):
    """A timm VisionTransformer -> four feature maps at strides patch/4, patch/2, patch, 2 x patch."""

    def __init__(self, vit: nn.Module, blocks=(4, 6, 8, 12)):
        super().__init__()
        depth = len(vit.blocks)
        if len(blocks) != 4 or not all(1 <= b <= depth for b in blocks) or sorted(set(blocks)) != list(blocks):
            # timm's forward_intermediates returns each block once, in order
            raise ValueError(f"four different backbone blocks in 1..{depth}, in increasing order, are needed, "
                             f"got {list(blocks)}")
        self.vit, self.indices = vit, [b - 1 for b in blocks]
        dim = vit.embed_dim
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                 nn.ConvTranspose2d(dim, dim, 2, 2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.down2 = nn.MaxPool2d(2)
        self.channels = dim

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.vit.forward_intermediates(x, indices=self.indices, output_fmt="NCHW", intermediates_only=True)
        return [self.up4(feats[0]), self.up2(feats[1]), feats[2], self.down2(feats[3])]


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
def slide_inference(model: nn.Module, img: torch.Tensor, num_classes: int, window: int, stride: int) -> torch.Tensor:
    """Logits (B x C x H x W) averaged over windows of `window` pixels every `stride` pixels, the last
    window of a row or column moved back to end at the border (mmseg's `slide_inference`). An image
    smaller than the window is inferred whole."""
    b, _, h, w = img.shape
    if h <= window and w <= window:
        return model(img)
    rows = max(h - window + stride - 1, 0) // stride + 1
    cols = max(w - window + stride - 1, 0) // stride + 1
    logits = img.new_zeros((b, num_classes, h, w))
    count = img.new_zeros((1, 1, h, w))
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + window, h), min(c * stride + window, w)
            y1, x1 = max(y2 - window, 0), max(x2 - window, 0)
            logits[:, :, y1:y2, x1:x2] += model(img[:, :, y1:y2, x1:x2])
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
