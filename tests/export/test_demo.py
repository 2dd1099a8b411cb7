"""Built-in presets materialised as official-layout checkpoint folders: the random-weight
demo-random (structure, determinism, cache) and the trained demo (shipped weights)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from safetensors import safe_open
from tokenizers import Tokenizer

from molmo_export import MolmoForConditionalGeneration, get_preset
from molmo_export.config import PRESETS, MolmoTextConfig, config_from_checkpoint
from molmo_export.demo import MARKER, materialize_preset, write_checkpoint
from molmo_runtime.errors import InputError
from molmo_runtime.fileio import sha256_file
from tests.conftest import golden_path


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialize_preset("demo-random", tmp_path_factory.mktemp("m") / "demo-random")


def keys(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def test_files_and_config_round_trip(demo_dir: Path) -> None:
    names = {p.name for p in demo_dir.iterdir()}
    assert {"config.json", "full_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
            MARKER} <= names
    assert not [n for n in names if n.endswith(".partial")]
    assert json.loads((demo_dir / "config.json").read_text())["model_type"] == "molmo"
    # incl. the tokens, read from the tokenizer
    assert config_from_checkpoint(demo_dir) == PRESETS["demo-random"]


def test_weights_use_the_official_names(demo_dir: Path) -> None:
    """demo-random has the golden 7B-D tiny model's structure (2 LLM layers, 3 ViT blocks, qkv
    bias): the very same official key set."""
    assert keys(demo_dir / "model.safetensors") == keys(golden_path("model", "model.safetensors"))


def test_tokenizer_ids(demo_dir: Path) -> None:
    tok = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    t = PRESETS["demo-random"].tokens
    ids = tok.encode("<im_start><im_end><im_patch><im_col><|image|><|endoftext|>").ids
    assert ids == [t.im_start, t.im_end, t.im_patch, t.im_col, t.image, t.eos]
    text = " User: Describe thïs image. Assistant:"
    enc = tok.encode(text).ids
    assert enc == list(text.encode("utf-8"))  # byte-level: one id per byte
    assert tok.decode(enc) == text
    assert tok.decode([t.eos, *enc], skip_special_tokens=True) == text
    specials = json.loads((demo_dir / "special_tokens_map.json").read_text())
    assert specials["eos_token"] == "<|endoftext|>"


def test_deterministic(demo_dir: Path, tmp_path: Path) -> None:
    again = materialize_preset("demo-random", tmp_path / "again")
    for f in ("model.safetensors", "tokenizer.json", "config.json", "full_config.json"):
        assert sha256_file(again / f) == sha256_file(demo_dir / f), f


def test_outputs_are_not_degenerate(demo_dir: Path) -> None:
    model = MolmoForConditionalGeneration.from_pretrained(demo_dir)
    tok = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    ids = torch.tensor([[256, *tok.encode(" User: Describe this image. Assistant:").ids]])
    out = model.generate(ids, max_new_tokens=20)[0, ids.shape[1]:]
    assert len(set(out.tolist())) >= 5
    logits = model(ids).logits
    assert logits.std() > 0.3 and torch.isfinite(logits).all()
    # An image changes the answer's logits.
    t = model.config.tokens
    img_ids = torch.tensor([[256, t.im_start, *[t.im_patch] * 144, t.im_end, *ids[0, 1:]]])
    kw = dict(images=torch.randn(1, 1, 576, 588), image_masks=torch.ones(1, 1, 576),
              image_input_idx=torch.arange(2, 146).reshape(1, 1, 144))
    with_image = model(img_ids, **kw).logits[0, -1]
    without = model(img_ids).logits[0, -1]
    assert (with_image - without).abs().max() > 0.1


def test_cache_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOLMO_EXPORT_CACHE", str(tmp_path / "cache"))
    first = materialize_preset("demo-random")
    assert first.parent == tmp_path / "cache" and first.name.startswith("demo-random-v")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert materialize_preset("demo-random") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    model = MolmoForConditionalGeneration.from_pretrained("demo-random")  # a preset name works
    assert model.config == PRESETS["demo-random"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]


def test_refuses_foreign_directory_and_unknown_preset(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("user data")
    with pytest.raises(InputError, match="exists and is not a demo-random checkpoint"):
        materialize_preset("demo-random", tmp_path / "busy")
    assert (tmp_path / "busy" / "mine.txt").read_text() == "user data"
    with pytest.raises(InputError, match="has no built-in weights"):
        materialize_preset("molmo-7b-d-0924", tmp_path / "x")


@pytest.mark.parametrize("text", [
    MolmoTextConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
                    intermediate_size=192, vocab_size=512, embedding_size=512, qkv_bias=False,
                    qk_norm=True, norm_after=True, rope_theta=5e5),
    MolmoTextConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
                    intermediate_size=64, vocab_size=512, embedding_size=512, qkv_bias=False,
                    qk_norm=True, layer_norm_eps=1e-5, rope_theta=1e4,
                    max_position_embeddings=32768, moe_num_experts=8, moe_top_k=2),
], ids=["7b-o-like", "moe-like"])
def test_written_configs_round_trip_for_every_variant(text: MolmoTextConfig,
                                                      tmp_path: Path) -> None:
    demo = get_preset("demo-random")
    cfg = demo.replace(text=text, pooling=dataclasses.replace(
        demo.pooling, projector_hidden_size=text.intermediate_size // 2))
    write_checkpoint(cfg, tmp_path)
    read = config_from_checkpoint(tmp_path)
    assert (read.vision, read.pooling, read.text, read.tokens) == (cfg.vision, cfg.pooling,
                                                                   cfg.text, cfg.tokens)
    model = MolmoForConditionalGeneration.from_pretrained(tmp_path)
    assert model.load_report.ok and not model.load_report.unused


def test_trained_demo_is_the_shipped_file(tmp_path: Path) -> None:
    """The default preset: its model.safetensors is the shipped trained file (official names,
    nothing missing or unused), its processor carries the 112 px crop geometry end to end."""
    from molmo_export.demo import official_shapes, trained_weights
    from molmo_runtime.processing import MolmoProcessor

    path = materialize_preset("demo", tmp_path / "demo")
    assert sha256_file(path / "model.safetensors") == sha256_file(trained_weights("demo"))
    assert config_from_checkpoint(path) == PRESETS["demo"]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == \
            official_shapes(PRESETS["demo"])
    model = MolmoForConditionalGeneration.from_pretrained(path)
    assert model.load_report.ok and not model.load_report.unused
    image = MolmoProcessor.from_pretrained(path).image_processor
    assert image.base_image_input_size == (112, 112) and image.image_token_length_w == 4
    assert image.overlap_margins == (2, 2)


@pytest.mark.slow
def test_bench_preset_is_sharded_and_loads(tmp_path: Path) -> None:
    path = materialize_preset("bench-0.5b", tmp_path / "bench")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((path / s).is_file() for s in shards)
    model: Any = MolmoForConditionalGeneration.from_pretrained(path)
    assert model.load_report.ok and sorted(model.load_report.files) == shards
    assert sum(p.numel() for p in model.parameters()) == 732_197_760
    ids = torch.tensor([[256, *b" User: Describe this image. Assistant:"]])
    out = model.generate(ids, max_new_tokens=8)[0, ids.shape[1]:]
    assert len(set(out.tolist())) >= 3
