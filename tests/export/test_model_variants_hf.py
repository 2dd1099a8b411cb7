"""The 7B-O and MolmoE decoder math against transformers' Olmo2 / OLMoE implementations.

Independent of the golden data (which also covers both): the same random weights are copied
into transformers' Olmo2Model / OlmoeModel and into our MolmoTextModel, and the final hidden
states must agree. Olmo2 is OLMo's post-norm + full-width QK-norm decoder (7B-O); OLMoE is the
pre-norm QK-norm top-k MoE decoder without top-k renormalisation (MolmoE). transformers is a
test-only dependency: skipped where it is not installed.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from molmo_export import get_preset
from molmo_export.config import MolmoTextConfig
from molmo_export.model import MolmoTextModel
from molmo_runtime.tolerances import TABLE

# Same float32 math, different kernels: row "self/hf_decoders" of molmo_runtime.tolerances.
ATOL = TABLE["self/hf_decoders"].atol

D, HEADS, KV, HD, I_HALF = 64, 4, 2, 16, 48


def ours_for(text: MolmoTextConfig) -> Any:
    return MolmoTextModel(get_preset("demo-random").replace(text=text)).eval().requires_grad_(False)


def randomize(module: Any, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.15 * noise)


def inputs(seed: int = 0) -> tuple[Any, Any, Any]:
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(2, 11, D, generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0  # right padding on row 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return embeds, positions, mask


def compare(ours: Any, theirs: Any) -> None:
    embeds, positions, mask = inputs()
    with torch.no_grad():
        got, _ = ours(embeds, positions, mask)
        want = theirs(inputs_embeds=embeds, attention_mask=mask,
                      position_ids=positions).last_hidden_state
    valid = mask.bool()
    assert got.abs().max() > 0.5  # not a degenerate comparison
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=0)


def copy_attention(ours: Any, sd: dict[str, Any], attn_norm: str, mlp_norm: str) -> None:
    """The final norm and every layer's attention (QK-norm included) and the two norms, from a
    transformers state dict; the MLP is left to the caller. attn_norm / mlp_norm name the
    transformers norms that play our attn_norm / mlp_norm roles."""
    ours.norm.weight.copy_(sd["norm.weight"])
    for i, layer in enumerate(ours.layers):
        p = f"layers.{i}."
        for x in "qkvo":
            getattr(layer.attn, f"w{x}").weight.copy_(sd[p + f"self_attn.{x}_proj.weight"])
        layer.attn.q_norm.weight.copy_(sd[p + "self_attn.q_norm.weight"])
        layer.attn.k_norm.weight.copy_(sd[p + "self_attn.k_norm.weight"])
        layer.attn_norm.weight.copy_(sd[p + attn_norm + ".weight"])
        layer.mlp_norm.weight.copy_(sd[p + mlp_norm + ".weight"])


def test_post_norm_qk_norm_decoder_matches_olmo2() -> None:
    text = MolmoTextConfig(hidden_size=D, num_layers=2, num_heads=HEADS, num_kv_heads=KV,
                           head_dim=HD, intermediate_size=2 * I_HALF, vocab_size=512,
                           embedding_size=512, qkv_bias=False, qk_norm=True, norm_after=True,
                           layer_norm_eps=1e-6, rope_theta=5e5)
    cfg = transformers.Olmo2Config(
        vocab_size=512, hidden_size=D, intermediate_size=I_HALF, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV, rms_norm_eps=1e-6, rope_theta=5e5,
        attention_bias=False, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    cfg._attn_implementation = "eager"
    theirs = transformers.Olmo2Model(cfg).eval()
    randomize(theirs, 1)
    ours = ours_for(text)
    sd = theirs.state_dict()
    with torch.no_grad():
        copy_attention(ours, sd, "post_attention_layernorm", "post_feedforward_layernorm")
        for i, layer in enumerate(ours.layers):
            p = f"layers.{i}."
            for x in ("gate", "up", "down"):
                getattr(layer.mlp, x).weight.copy_(sd[p + f"mlp.{x}_proj.weight"])
    compare(ours, theirs)


def test_moe_decoder_matches_olmoe() -> None:
    experts, top_k, hidden = 8, 2, 32
    text = MolmoTextConfig(hidden_size=D, num_layers=2, num_heads=HEADS, num_kv_heads=KV,
                           head_dim=HD, intermediate_size=2 * hidden, vocab_size=512,
                           embedding_size=512, qkv_bias=False, qk_norm=True,
                           layer_norm_eps=1e-5, rope_theta=1e4, moe_num_experts=experts,
                           moe_top_k=top_k)
    cfg = transformers.OlmoeConfig(
        vocab_size=512, hidden_size=D, intermediate_size=hidden, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV, rms_norm_eps=1e-5, rope_theta=1e4,
        num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=False,
        pad_token_id=None, bos_token_id=None, eos_token_id=None)
    cfg._attn_implementation = "eager"
    theirs = transformers.OlmoeModel(cfg).eval()
    randomize(theirs, 2)
    ours = ours_for(text)
    sd = theirs.state_dict()
    with torch.no_grad():
        copy_attention(ours, sd, "input_layernorm", "post_attention_layernorm")
        for i, layer in enumerate(ours.layers):
            p = f"layers.{i}."
            layer.mlp.router.weight.copy_(sd[p + "mlp.gate.weight"])
            gate_up = sd[p + "mlp.experts.gate_up_proj"]  # [E, 2I, D]: gate rows, then up rows
            layer.mlp.gate_proj.copy_(gate_up[:, :hidden])
            layer.mlp.up_proj.copy_(gate_up[:, hidden:])
            layer.mlp.down_proj.copy_(sd[p + "mlp.experts.down_proj"])  # [E, D, I]
    compare(ours, theirs)
