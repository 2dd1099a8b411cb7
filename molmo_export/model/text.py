"""The text decoder (spec §4): Qwen2-style pre-norm blocks (7B-D, 72B) and the variants.

    MolmoTextModel      embed_tokens -> layers -> final RMSNorm (`norm`)
    MolmoForCausalLM    + untied LM head over embedding_size rows
    DecoderLayer        pre-norm: x + attn(norm(x)); x + mlp(norm(x))         (7B-D, 72B, MolmoE)
    PostNormDecoderLayer  7B-O ("norm_after", OLMo-2 style): x + norm(attn(x)); x + norm(mlp(x))
    QK-norm             7B-O, MolmoE: RMSNorm over the full q and k widths before RoPE
    MoEFeedForward      MolmoE: top-k mixture of SwiGLU experts (text_moe.py)

Signatures are the decoder graph's (runtime/molmo_runtime/graph_io.py): inputs_embeds,
position_ids, attention_mask over past+new, past K/V in, K/V of the new tokens out.
"""

from __future__ import annotations

import torch
from torch import nn

from molmo_export.config import MolmoConfig, MolmoTextConfig
from molmo_export.model.layers import (
    RMSNorm,
    SwiGLU,
    apply_rope,
    attend_grouped,
    attend_grouped_with_probs,
    causal_padding_mask,
    merge_heads,
    rope_cos_sin,
    split_heads,
)

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value), each [B, n_kv, S, head_dim]


class TextAttention(nn.Module):
    """Causal GQA self-attention with RoPE; the official fused att_proj is split into wq/wk/wv."""

    def __init__(self, cfg: MolmoTextConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv = cfg.num_heads, cfg.num_kv_heads
        d = cfg.hidden_size
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.wq = nn.Linear(d, q_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(d, kv_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(d, kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_dim, d, bias=False)
        # QK-norm (7B-O, MolmoE): over the whole q / k vectors, not per head (golden README §7.5).
        self.q_norm = RMSNorm(q_dim, cfg.layer_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(kv_dim, cfg.layer_norm_eps) if cfg.qk_norm else None
        # Opt-in, for training only (molmo_export.train_demo's attention supervision): with
        # keep_probs set, each forward leaves its attention probabilities [B, H, T, P+T] in
        # self.probs. Off (the default), the forward and every exported graph are unchanged.
        self.keep_probs = False
        self.probs: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                allowed: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        q, k, v = self.wq(x), self.wk(x), self.wv(x)  # [B, T, H*hd], [B, T, n_kv*hd] x2
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(split_heads(q, self.n_heads), cos, sin)  # [B, H, T, hd]
        k = apply_rope(split_heads(k, self.n_kv), cos, sin)  # [B, n_kv, T, hd]
        v = split_heads(v, self.n_kv)
        if past is not None:
            # Only the valid prefix of the cache (its length is total - seq, see graph_io.py):
            # the runtime may pass a longer preallocated buffer.
            past_len = allowed.shape[-1] - x.shape[1]
            k_all = torch.cat((past[0][:, :, :past_len], k), dim=2)  # [B, n_kv, P+T, hd]
            v_all = torch.cat((past[1][:, :, :past_len], v), dim=2)
        else:
            k_all, v_all = k, v
        if self.keep_probs:
            out, self.probs = attend_grouped_with_probs(q, k_all, v_all, allowed)
        else:
            out = attend_grouped(q, k_all, v_all, allowed)  # [B, H, T, hd]
        return self.wo(merge_heads(out)), (k, v)


class DecoderLayer(nn.Module):
    """Pre-norm block (Qwen2; MolmoE with an MoE feed-forward)."""

    def __init__(self, cfg: MolmoTextConfig, mlp: nn.Module) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.attn = TextAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                allowed: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        a, kv = self.attn(self.attn_norm(x), cos, sin, allowed, past)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), kv


class PostNormDecoderLayer(DecoderLayer):
    """7B-O: the norms move to the sub-layer outputs; block inputs are not normalised."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                allowed: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        a, kv = self.attn(x, cos, sin, allowed, past)
        x = x + self.attn_norm(a)
        return x + self.mlp_norm(self.mlp(x)), kv


def _feed_forward(cfg: MolmoTextConfig) -> nn.Module:
    if cfg.is_moe:
        from molmo_export.model.text_moe import MoEFeedForward

        return MoEFeedForward(cfg)
    return SwiGLU(cfg.hidden_size, cfg.mlp_hidden_size, cfg.hidden_size)


class MolmoTextModel(nn.Module):
    def __init__(self, cfg: MolmoConfig) -> None:
        super().__init__()
        t = cfg.text
        self.cfg = t
        # Official wte.embedding [embedding_size, D] and wte.new_embedding [128, D], concatenated.
        self.embed_tokens = nn.Embedding(t.total_vocab_rows, t.hidden_size)
        layer_cls = PostNormDecoderLayer if t.norm_after else DecoderLayer
        self.layers = nn.ModuleList(layer_cls(t, _feed_forward(t)) for _ in range(t.num_layers))
        self.norm = RMSNorm(t.hidden_size, t.layer_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] int64 -> [B, T, D]; padding ids (-1) read row 0, as the official code."""
        return self.embed_tokens(input_ids.clamp(min=0))

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, past_key_values: list[KV] | None = None
                ) -> tuple[torch.Tensor, list[KV]]:
        """inputs_embeds [B, T, D], position_ids [B, T], attention_mask [B, P+T] (1 = valid),
        past_key_values: per layer (k, v) [B, n_kv, >=P, hd] or None ->
        (hidden after the final norm [B, T, D], per layer (k, v) of the T new tokens)."""
        seq_len = inputs_embeds.shape[1]
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        allowed = causal_padding_mask(attention_mask, seq_len)  # [B, 1, T, P+T]
        x = inputs_embeds
        new_kv: list[KV] = []
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values is not None else None
            x, kv = layer(x, cos, sin, allowed, past)
            new_kv.append(kv)
        return self.norm(x), new_kv


class MolmoForCausalLM(nn.Module):
    def __init__(self, cfg: MolmoConfig) -> None:
        super().__init__()
        self.model = MolmoTextModel(cfg)
        # Untied head over embedding_size rows: the 128 extra ids can never be produced.
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.embedding_size, bias=False)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, past_key_values: list[KV] | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, list[KV]]:
        """-> (logits [B, T, V] or [B, 1, V] with last_only, new K/V as MolmoTextModel)."""
        hidden, new_kv = self.model(inputs_embeds, position_ids, attention_mask, past_key_values)
        if last_only:
            hidden = hidden[:, -1:]
        return self.lm_head(hidden), new_kv

    def logits_at(self, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of hidden [B, T, D] at one position per row (index [B])."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.lm_head(hidden[rows, index])
