"""Presets built on the meta device have the parameter counts of the real models."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from molmo_export import MolmoForConditionalGeneration, get_preset
from molmo_export.config import PRESETS, MolmoConfig


def spec_count(cfg: MolmoConfig) -> int:
    """Parameters of the official model, from the tensor shapes of spec §9.2 (fused layouts)."""
    v, t = cfg.vision, cfg.text
    h, m = v.hidden_size, v.intermediate_size
    block = 4 * (h * h + h) + 2 * 2 * h + (h * m + m) + (m * h + h)
    vit = v.patch_dim * h + h + v.num_positions * h + 2 * h + v.num_layers * block
    f, ph, half = v.feature_dim, cfg.pooling.hidden_size, t.intermediate_size // 2
    connector = 2 * f + 3 * (f * ph + ph) + (ph * ph + ph) + 2 * ph * half + half * t.hidden_size
    d, hd = t.hidden_size, t.head_dim
    qkv_rows = (t.num_heads + 2 * t.num_kv_heads) * hd
    attn = d * qkv_rows + (qkv_rows if t.qkv_bias else 0) + t.num_heads * hd * d + 2 * d
    if t.qk_norm:
        attn += t.num_heads * hd + t.num_kv_heads * hd
    if t.is_moe:
        ffn = d * t.moe_num_experts + t.moe_num_experts * 3 * d * t.mlp_hidden_size
    else:
        ffn = d * t.intermediate_size + t.mlp_hidden_size * d
    llm = (t.total_vocab_rows * d + d + t.embedding_size * d + t.num_layers * (attn + ffn))
    return vit + connector + llm


def meta_count(name: str) -> int:
    with torch.device("meta"):
        model = MolmoForConditionalGeneration(get_preset(name))
    assert all(p.is_meta for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


def test_7b_d_has_the_published_parameter_count() -> None:
    # total_parameters of the hub's model.safetensors.index.json (spec §1)
    assert meta_count("molmo-7b-d-0924") == 8_021_025_280


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count_matches_the_official_shapes(name: str) -> None:
    assert meta_count(name) == spec_count(get_preset(name))


@pytest.mark.parametrize(("name", "low", "high"), [
    ("molmo-7b-o-0924", 7.6e9, 7.8e9),  # spec §1: ~7.7 B
    ("molmoe-1b-0924", 7.1e9, 7.3e9),  # ~7.2 B total
    ("molmo-72b-0924", 72.5e9, 73.5e9),  # ~73 B
])
def test_other_presets_are_the_published_sizes(name: str, low: float, high: float) -> None:
    assert low <= meta_count(name) <= high


def test_moe_active_parameters_are_about_1_5b() -> None:
    t = get_preset("molmoe-1b-0924").text
    inactive = t.num_layers * (t.moe_num_experts - t.moe_top_k) * 3 * t.hidden_size * \
        t.mlp_hidden_size
    active = meta_count("molmoe-1b-0924") - inactive
    assert 1.3e9 < active < 1.6e9  # spec §1: ~1.5 B active (vision tower included)
