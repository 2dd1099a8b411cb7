"""Building blocks shared by the vision tower, the connector and the decoder.

Everything here is written for export: plain matmul/softmax attention in float32, GQA by
expand+reshape, RoPE computed from position_ids, no data-dependent Python control flow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Additive mask value of the official code (torch.finfo(float32).min, not -inf: a fully masked
# row then gives a uniform softmax instead of NaN).
MASK_VALUE = torch.finfo(torch.float32).min


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back to the input dtype, then * weight.

    The order (normalise, cast, scale) is the official RMSLayerNorm's (spec §4).
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 1, T, head_dim] (float32) for rotate-half ("llama") RoPE.

    The official code builds a table for positions 0..max_positions-1 as outer(arange, inv_freq)
    and indexes it; multiplying the float positions by inv_freq here is the same float32 product,
    so the values are bit-identical, and positions past the table do not crash.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32,
                            device=position_ids.device) / head_dim
    inv_freq = 1.0 / (theta ** exponent)  # [head_dim/2]
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, T, head_dim/2]
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, head_dim]
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd] rotated in float32, cast back to x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def attend_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   allowed: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention without copying K/V per query head.

    q [B, H, T, hd], k/v [B, n_kv, S, hd], allowed bool [B, 1, T, S] -> [B, H, T, hd]. Query
    head h reads KV head h // (H / n_kv) (repeat_interleave semantics), but the H / n_kv query
    heads of a group are stacked into the rows of one matmul against their shared K/V instead of
    expanding K/V per query head: in a decode step the context-sized K/V is read once, not
    copied 7x (Qwen2-7B's 28 / 4 heads) in every layer for every token. Float32 throughout, as
    the official code (float32_attention=True); the result is cast back to q's dtype.
    """
    b, h, t, hd = q.shape
    probs = _grouped_probs(q, k, allowed)
    return torch.matmul(probs, v.float()).reshape(b, h, t, hd).to(q.dtype)


def _grouped_probs(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Attention probabilities [B, n_kv, g*T, S] (float32), rows ordered (head in group,
    position): see attend_grouped."""
    b, h, t, hd = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    g = h // n_kv
    scale = hd**-0.5
    qg = q.float().reshape(b, n_kv, g * t, hd)  # rows ordered (head in group, position)
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # [B, n_kv, g*T, S]
    scores = scores.reshape(b, n_kv, g, t, s).masked_fill(~allowed[:, :, None], MASK_VALUE)
    return F.softmax(scores, dim=-1).reshape(b, n_kv, g * t, s)


def attend_grouped_with_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """attend_grouped, and its attention probabilities [B, H, T, S] (float32): for training
    only (an auxiliary loss on where the decoder looks), never in an exported graph."""
    b, h, t, hd = q.shape
    probs = _grouped_probs(q, k, allowed)
    out = torch.matmul(probs, v.float()).reshape(b, h, t, hd).to(q.dtype)
    return out, probs.reshape(b, h, t, k.shape[2])


def causal_padding_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """bool [B, 1, T, P+T]: query t (absolute position P+t) sees key j iff j <= P+t and key j is
    valid. attention_mask: [B, P+T], 1/True = valid token, 0 = padding."""
    total = attention_mask.shape[1]
    past = total - seq_len
    device = attention_mask.device
    q_pos = torch.arange(seq_len, device=device)[:, None] + past  # [T, 1]
    k_pos = torch.arange(total, device=device)[None, :]  # [1, P+T]
    causal = k_pos <= q_pos  # [T, P+T]
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, T, H*hd] -> [B, H, T, hd]."""
    b, t, _ = x.shape
    return x.reshape(b, t, n_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, hd] -> [B, T, H*hd]."""
    b, h, t, hd = x.shape
    return x.transpose(1, 2).reshape(b, t, h * hd)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases: the decoder MLP and the image projector."""

    def __init__(self, dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))
