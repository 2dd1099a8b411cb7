"""Reading configs from checkpoint folders (torch-free): hub config.json, full_config.json,
MolmoE's OLMo-style config.json, and the special token ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from molmo_export.config import (
    PRESETS,
    CheckpointError,
    MolmoConfig,
    MolmoSpecialTokens,
    config_from_checkpoint,
    special_tokens_from_checkpoint,
)
from tests.conftest import golden_path

# Real hub config.json values (spec §1; golden README §7.2 for 7B-O's flags).
HUB_TEXT = {
    "molmo-7b-d-0924": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, intermediate_size=37888, vocab_size=152064,
                            embedding_size=152064, qkv_bias=True, attention_layer_norm=False,
                            norm_after=False, layer_norm_eps=1e-6, rope_theta=1e6),
    "molmo-7b-o-0924": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=None, intermediate_size=22016,
                            vocab_size=100278, embedding_size=100352, qkv_bias=False,
                            attention_layer_norm=True, norm_after=True, layer_norm_eps=1e-6,
                            rope_theta=5e5),
    "molmo-72b-0924": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                           num_key_value_heads=8, intermediate_size=59136, vocab_size=152064,
                           embedding_size=152064, qkv_bias=True, attention_layer_norm=False,
                           norm_after=False, layer_norm_eps=1e-5, rope_theta=1e6),
}


def write_config(d: Path, cfg: dict[str, Any]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_golden_7b_d_tiny() -> None:
    cfg = config_from_checkpoint(golden_path("model"))
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim) == (64, 2, 4, 2,
                                                                                      16)
    assert (t.intermediate_size, t.vocab_size, t.embedding_size) == (192, 1000, 1024)
    assert t.qkv_bias and not t.qk_norm and not t.norm_after and not t.is_moe
    # vision tower from full_config.json, not the 7B default
    assert (v.hidden_size, v.num_layers, v.vit_layers, v.blocks_to_run) == (64, 3, (-2, -3), 2)
    assert v.feature_dim == 128 and cfg.pooling.projector_hidden_size == 96
    # golden README §5.3: specials 1024..1028 (new_embedding rows), BOS/EOS 151643 -> 643
    assert cfg.tokens == MolmoSpecialTokens(bos=643, eos=643, pad=643, im_start=1024,
                                            im_end=1025, im_patch=1026, im_col=1027, image=1028)


def test_golden_7b_o_tiny() -> None:
    cfg = config_from_checkpoint(golden_path("model_7b_o"))
    t = cfg.text
    assert t.num_kv_heads == 4 and t.qk_norm and t.norm_after and not t.qkv_bias
    assert t.rope_theta == 5e5 and t.layer_norm_eps == 1e-6
    # §7.3: specials vocab_size + k = 1000..1004 (base-table rows, as 7B-O)
    assert (cfg.tokens.im_start, cfg.tokens.image, cfg.tokens.eos) == (1000, 1004, 643)


def test_golden_moe_tiny() -> None:
    cfg = config_from_checkpoint(golden_path("model_moe"))
    t = cfg.text
    assert (t.moe_num_experts, t.moe_top_k, t.mlp_hidden_size) == (64, 8, 32)
    assert t.qk_norm and not t.norm_after and t.layer_norm_eps == 1e-5
    assert t.rope_theta == 1e4 and t.max_position_embeddings == 32768
    assert cfg.vision.vit_layers == (-2, -3) and cfg.pooling.projector_hidden_size == 32
    assert (cfg.tokens.im_start, cfg.tokens.im_patch, cfg.tokens.bos) == (1000, 1002, 643)


def test_golden_tokens_match_the_golden_inputs() -> None:
    """Every <im_patch> position of image_input_idx holds tokens.im_patch; BOS opens the ids."""
    import numpy as np

    for model, case in (("model", "chelsea"), ("model_7b_o", "chelsea"),
                        ("model_moe", "tiny_80x50")):
        tokens = config_from_checkpoint(golden_path(model)).tokens
        z = np.load(golden_path(model, f"golden_{case}.npz"))
        ids, idx = z["input_ids"], z["image_input_idx"]
        assert ids[0] == tokens.bos
        assert set(ids[idx[idx >= 0]].tolist()) == {tokens.im_patch}
        assert {tokens.im_start, tokens.im_end, tokens.im_col} <= set(ids.tolist())


@pytest.mark.parametrize("name", list(HUB_TEXT))
def test_dense_hub_config_gives_the_preset(tmp_path: Path, name: str) -> None:
    base = json.loads(golden_path("model", "config.json").read_text())
    d = write_config(tmp_path / name, {**base, **HUB_TEXT[name]})
    cfg = config_from_checkpoint(d)
    assert cfg == PRESETS[name]  # incl. the fixed CLIP tower and the family's special ids


def test_moe_hub_config_gives_the_preset(tmp_path: Path) -> None:
    """The tiny MolmoE config.json with the hub values restored (golden_index lists them)."""
    cfg = json.loads(golden_path("model_moe", "config.json").read_text())
    changes = json.loads(golden_path("model_moe", "golden_index.json").read_text())[
        "config_changes_vs_hub"]
    cfg.update({k: v["hub"] for k, v in changes.items()})
    assert config_from_checkpoint(write_config(tmp_path / "moe", cfg)) == PRESETS["molmoe-1b-0924"]


def test_tokens_from_tokenizer_files() -> None:
    """The real 7B-D tokenizer files (golden/tokenizer): added_tokens.json + special map."""
    tokens = special_tokens_from_checkpoint(golden_path("tokenizer"),
                                            PRESETS["molmo-7b-d-0924"].text)
    assert tokens == PRESETS["molmo-7b-d-0924"].tokens


def test_tokenizer_json_wins_over_added_tokens_json(tmp_path: Path) -> None:
    """MolmoE's added_tokens.json is stale (100278...); the fast tokenizer uses tokenizer.json."""
    (tmp_path / "added_tokens.json").write_text(json.dumps(
        {"<im_start>": 100278, "<im_end>": 100279, "<im_patch>": 100280, "<im_col>": 100281,
         "<|image|>": 100282}))
    added = [{"id": 50279 + k, "content": s} for k, s in enumerate(
        ["<|endoftext|>", "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>"])]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": added,
                                                         "model": {"vocab": {}}}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "<|endoftext|>"}}))
    tokens = special_tokens_from_checkpoint(tmp_path, PRESETS["molmoe-1b-0924"].text)
    assert (tokens.im_start, tokens.image, tokens.eos, tokens.bos) == (50280, 50284, 50279, 50279)


def test_unknown_architecture(tmp_path: Path) -> None:
    d = write_config(tmp_path / "x", {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                                      "hidden_size": 64})
    with pytest.raises(CheckpointError, match="unknown architecture"):
        config_from_checkpoint(d)


def test_missing_field(tmp_path: Path) -> None:
    base = json.loads(golden_path("model", "config.json").read_text())
    del base["num_hidden_layers"]
    with pytest.raises(CheckpointError, match="lacks the field 'num_hidden_layers'"):
        config_from_checkpoint(write_config(tmp_path / "x", base))


def test_missing_folder_and_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        config_from_checkpoint(tmp_path / "nope")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file; pass the checkpoint folder"):
        config_from_checkpoint(tmp_path / "weights.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        config_from_checkpoint(tmp_path / "empty")


def test_dict_round_trip() -> None:
    for cfg in PRESETS.values():
        assert MolmoConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_reading_configs_needs_no_torch() -> None:
    code = ("import sys; from molmo_export.config import config_from_checkpoint; "
            "import molmo_export.checkpoint; "
            f"config_from_checkpoint({str(golden_path('model_moe'))!r}); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
