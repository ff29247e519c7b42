"""MAE's model pieces (He et al. 2022), for any task that needs them: per-sample random masking of patch
tokens, patchify, the reconstruction loss on the masked patches (optionally against per-patch
normalized pixels), the light transformer decoder, and the masked autoencoder around a timm ViT
encoder. Position embeddings are fixed 2-D sin-cos in encoder and decoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.checkpoint import checkpoint


def sincos_table(grid: tuple[int, int], dim: int, num_prefix: int = 1) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding: 1 x (prefix + H*W) x dim, zeros for the prefix tokens.

    Patch (h, w), 0-indexed in row-major order, gets [sin(w W), cos(w W), sin(h W), cos(h W)] with
    W_i = 10000^(-i / (dim/4)), i = 0 .. dim/4 - 1 (the first half encodes the column, as MAE's).
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    hh, ww = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64),
                            indexing="ij")

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([one_axis(ww), one_axis(hh)], dim=1)
    return torch.cat([torch.zeros(num_prefix, dim, dtype=torch.float64), table]).float().unsqueeze(0)


def fix_sincos_pos_embed(model: VisionTransformer) -> None:
    """Set the position embedding to MAE's sin-cos table and freeze it (no gradient, no weight decay)."""
    if model.pos_embed is None or getattr(model, "no_embed_class", False):
        raise ValueError("pos_embed=sincos needs a ViT with a position embedding over prefix + patch tokens")
    prefix = model.pos_embed.shape[1] - model.patch_embed.num_patches
    with torch.no_grad():
        model.pos_embed.copy_(sincos_table(model.patch_embed.grid_size, model.embed_dim, prefix))
    model.pos_embed.requires_grad_(False)


@dataclass
class DecoderConfig:
    embed_dim: int = 512  # decoder token width
    depth: int = 8  # decoder blocks
    num_heads: int = 16  # decoder attention heads


def random_masking(x: torch.Tensor, mask_ratio: float):
    """MAE's per-sample random masking of patch tokens x (B x N x D).

    Returns the visible tokens (B x keep x D), their indices (B x keep), the permutation that
    restores patch order from [visible, masked] (B x N), and the mask in patch order (1 = masked).
    """
    b, n, d = x.shape
    keep = int(n * (1 - mask_ratio))
    shuffle = torch.rand(b, n, device=x.device).argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    visible = shuffle[:, :keep]
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    return x.gather(1, visible.unsqueeze(-1).expand(-1, -1, d)), visible, restore, mask.gather(1, restore)


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    """B x C x H x W -> B x (H/p * W/p) x (p*p*C), patches in row-major order."""
    b, c, h, w = img.shape
    x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def reconstruction_loss(pred: torch.Tensor, img: torch.Tensor, mask: torch.Tensor, patch: int,
                        norm_pix_loss: bool) -> torch.Tensor:
    """Mean squared error on the masked patches (mask: 1 = masked), optionally on normalized pixels."""
    target = patchify(img, patch)
    if norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred.float() - target.float()) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


class MAEDecoder(nn.Module):
    """MAE's light decoder: encoder tokens of the visible patches (class token first) + mask tokens,
    back in patch order, through a few transformer blocks, to the pixels of every patch."""

    def __init__(self, encoder_dim: int, grid: tuple[int, int], patch: int, cfg: DecoderConfig):
        super().__init__()
        self.decoder_embed = nn.Linear(encoder_dim, cfg.embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_table(grid, cfg.embed_dim), persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, mlp_ratio=4.0, qkv_bias=True)
                                            for _ in range(cfg.depth))
        self.decoder_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.embed_dim, patch ** 2 * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """latent: B x (1 + visible) x D_enc; restore: B x N from random_masking. -> B x N x p*p*3."""
        y = self.decoder_embed(latent)
        b, n, e = y.shape[0], restore.shape[1], y.shape[-1]
        y_patches = torch.cat([y[:, 1:], self.mask_token.expand(b, n - (y.shape[1] - 1), -1)], dim=1)
        y_patches = y_patches.gather(1, restore.unsqueeze(-1).expand(-1, -1, e))
        y = torch.cat([y[:, :1], y_patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            y = blk(y)
        return self.decoder_pred(self.decoder_norm(y))[:, 1:]


class MaskedAutoencoder(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: DecoderConfig, mask_ratio: float, norm_pix_loss: bool):
        super().__init__()
        if not encoder.has_class_token or getattr(encoder, "no_embed_class", False):
            raise ValueError("MAE here expects a ViT with a class token and a position embedding over its prefix "
                             "tokens (timm's no_embed_class=False)")
        self.encoder, self.mask_ratio, self.norm_pix_loss = encoder, mask_ratio, norm_pix_loss
        grid, dim = encoder.patch_embed.grid_size, encoder.embed_dim
        self.patch = encoder.patch_embed.patch_size[0]
        fix_sincos_pos_embed(encoder)  # fixed sin-cos position embedding, as MAE (whatever model.pos_embed says)
        self.decoder = MAEDecoder(dim, grid, self.patch, decoder)
        # unused encoder parts get no gradient
        for m in (encoder.fc_norm, encoder.head):
            m.requires_grad_(False)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        p = enc.num_prefix_tokens  # the class token, then register tokens if the ViT has them
        x, _, restore, mask = random_masking(enc.patch_embed(img) + enc.pos_embed[:, p:], self.mask_ratio)
        prefix = torch.cat([t for t in (enc.cls_token, enc.reg_token) if t is not None], dim=1)
        x = torch.cat([(prefix + enc.pos_embed[:, :p]).expand(x.shape[0], -1, -1), x], dim=1)
        if enc.grad_checkpointing and torch.is_grad_enabled():  # train.activation_checkpointing
            for blk in enc.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = enc.blocks(x)
        latent = enc.norm(x)
        latent = torch.cat([latent[:, :1], latent[:, p:]], dim=1)  # registers never reach the decoder
        pred = self.decoder(latent, restore)
        return reconstruction_loss(pred, img, mask, self.patch, self.norm_pix_loss)


