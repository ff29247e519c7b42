"""Q, K, V of a timm ViT-family block exactly as its own attention uses them, for relation maps.

A relation map softmax(A B^T / sqrt(d)) (relations.py) is the model's attention only if Q and K are
the ones its attention multiplies. For block input x (B x N x D):

    h       = norm1(x)                       (pre-norm blocks; post-norm blocks attend to x itself)
    Q, K, V = h W_qkv + b, split into the block's H heads
    Q, K    = q_norm(Q), k_norm(K)           (qk-norm ViTs; identity otherwise)
    Q, K    = RoPE(Q), RoPE(K) on the patch tokens, prefix tokens untouched (EVA-02, DINOv3)
    K, V    = each K/V head repeated for its group of Q heads (grouped-query attention)

Every step uses the block's own modules and timm's rotary function, nothing re-implemented but the
bias concatenation of EVA's fused projection. `block_qkv_features` lays the result out as the
B x N x 3D tensor a plain qkv projection returns, so relation heads can be chosen afterwards
(split_heads) and tokens selected along N. A block whose attention has no q/k/v projections tinymim
can read is refused in one line (UnreadableBlock).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import apply_rot_embed_cat

from tinymim.core.config import ConfigError

# blocks that normalize their input before attention (timm's Block, EVA's EvaBlock and kin) read
# norm1(x); these apply their norms after attention and attend to x itself
POST_NORM_BLOCKS = ("ResPostBlock", "EvaBlockPostNorm")


class UnreadableBlock(ConfigError):
    """A block whose attention tinymim cannot read Q, K and V from (a config error: the teacher or
    target chosen does not fit; one line on the command line)."""


def check_readable(block: nn.Module, where: str = "block") -> None:
    """Raise UnreadableBlock (one line, naming the fix) unless block_qkv can read `block`."""
    attn = getattr(block, "attn", None)
    fused = getattr(attn, "qkv", None) is not None
    split = all(getattr(attn, n, None) is not None for n in ("q_proj", "k_proj", "v_proj"))
    if attn is None or not (fused or split) or not hasattr(attn, "num_heads"):
        raise UnreadableBlock(
            f"{where} ({type(block).__name__}) has no attention with q/k/v projections tinymim can read "
            "(attn.qkv, or attn.q_proj/k_proj/v_proj, and attn.num_heads): relation maps need them; use a timm "
            "ViT or EVA teacher, or a feature/class-token target (loss.feature.site=block)")
    if type(block).__name__ not in POST_NORM_BLOCKS and getattr(block, "norm1", None) is None:
        raise UnreadableBlock(f"{where} ({type(block).__name__}) has no norm1 before its attention, and is not a "
                              f"post-norm block tinymim knows ({', '.join(POST_NORM_BLOCKS)}); relation maps "
                              "cannot be read from it: use a timm ViT or EVA teacher")


def attention_input(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the block's attention sees: norm1(x), or x for post-norm blocks."""
    return x if type(block).__name__ in POST_NORM_BLOCKS else block.norm1(x)


def _is_plain(attn: nn.Module, rope) -> bool:
    """A fused projection with its own bias, no q/k norm, no RoPE: Q, K, V are just qkv(h)."""
    return (rope is None and getattr(attn, "qkv", None) is not None and getattr(attn, "q_bias", None) is None
            and isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity)
            and isinstance(getattr(attn, "k_norm", nn.Identity()), nn.Identity))


def block_qkv(block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None):
    """(Q, K, V), each B x H x N x d, as the block's attention computes them for input tokens x
    (H = the block's heads; `rope`: the rotary embedding the model passes this block, if any)."""
    attn = block.attn
    h = attention_input(block, x)
    b, n, _ = h.shape
    heads = attn.num_heads
    if getattr(attn, "qkv", None) is not None:
        qkv = attn.qkv(h)
        if getattr(attn, "q_bias", None) is not None:  # EVA: q and v biases beside the projection, k none
            qkv = qkv + torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, v = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        kv_heads = getattr(attn, "num_kv_heads", heads)
        q = attn.q_proj(h).reshape(b, n, heads, -1).transpose(1, 2)
        k = attn.k_proj(h).reshape(b, n, kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(h).reshape(b, n, kv_heads, -1).transpose(1, 2)
    q, k = getattr(attn, "q_norm", nn.Identity())(q), getattr(attn, "k_norm", nn.Identity())(k)
    if rope is not None:
        p, half = getattr(attn, "num_prefix_tokens", 1), getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], dim=2).type_as(v)
    groups = heads // k.shape[1]
    if groups > 1:  # grouped-query attention: K/V head j serves Q heads j*groups .. (j+1)*groups-1
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return q, k, v


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """B x H x N x d -> B x N x H*d (heads side by side, as a projection lays them out)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def block_qkv_features(block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
    """Q, K, V of block_qkv as one B x N x 3D tensor, laid out as qkv(norm1(x)) is: split_heads then
    splits it into any head count. For a plain block this is qkv(norm1(x)) itself, computed as such."""
    if _is_plain(block.attn, rope):
        return block.attn.qkv(attention_input(block, x))
    return torch.cat([merge_heads(t) for t in block_qkv(block, x, rope)], dim=-1)
