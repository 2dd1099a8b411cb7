"""Optimization profiles computed from a manifest's dims (demo and Molmo-7B-D presets)."""

from __future__ import annotations

import sys

import pytest

from molmo_export.config import get_preset
from molmo_export.trt.profiles import (
    DimRange,
    ProfileSettings,
    all_profiles,
    apply_profiles,
    graph_profiles,
)
from molmo_runtime.errors import InputError
from molmo_runtime.graph_io import (
    CONNECTOR,
    DECODER,
    VISION_ENCODER,
    GraphDims,
    all_graph_specs,
    past_key_name,
    past_value_name,
)
from molmo_runtime.trt_buffers import capacity_shapes, select_profile


def preset_dims(name: str, max_crops: int = 12, max_seq_len: int = 4096) -> GraphDims:
    from molmo_export.export.onnx_export import graph_dims  # the exporter's own mapping

    return graph_dims(get_preset(name), max_crops, max_seq_len)


def test_7b_d_profiles() -> None:
    d = preset_dims("molmo-7b-d-0924")
    specs = all_graph_specs(d)
    profiles = all_profiles(specs, d)
    (vision,) = profiles[VISION_ENCODER]
    assert vision.name == "crops"
    assert vision.shapes == {"images": ((1, 576, 588), (13, 576, 588), (13, 576, 588))}
    (conn,) = profiles[CONNECTOR]
    assert conn.shapes["image_features"] == ((1, 576, 2048), (13, 576, 2048), (13, 576, 2048))
    assert conn.shapes["image_masks"] == ((1, 576), (13, 576), (13, 576))

    prefill, decode = profiles[DECODER]
    assert (prefill.name, decode.name) == ("prefill", "decode")
    # Every decoder input has a range in every profile: 3 + 2 * 28 cache tensors.
    assert set(prefill.shapes) == set(decode.shapes) == {t.name for t in specs[DECODER].inputs}
    assert len(prefill.shapes) == 59
    assert prefill.shapes["inputs_embeds"] == ((1, 1, 3584), (1, 4096, 3584), (1, 4096, 3584))
    assert prefill.shapes["attention_mask"] == ((1, 1), (1, 4096), (1, 4096))
    assert prefill.shapes["position_ids"] == ((1, 1), (1, 4096), (1, 4096))
    assert decode.shapes["inputs_embeds"] == ((1, 1, 3584),) * 3
    assert decode.shapes["attention_mask"] == ((1, 1), (1, 2048), (1, 4096))
    assert decode.shapes["position_ids"] == ((1, 1),) * 3
    for name in (past_key_name(0), past_value_name(27)):  # the whole cache, fixed
        assert prefill.shapes[name] == decode.shapes[name] == ((1, 4, 4096, 128),) * 3


def test_demo_profiles_and_settings() -> None:
    d = preset_dims("demo-random", max_crops=4, max_seq_len=256)
    specs = all_graph_specs(d)
    s = ProfileSettings(max_batch=2, opt_crops=3, max_prompt_len=192, opt_prompt_len=100,
                        opt_decode_total=64)
    (vision,) = graph_profiles(specs[VISION_ENCODER], d, s)
    assert vision.shapes["images"] == ((1, 576, 588), (3, 576, 588), (5, 576, 588))
    prefill, decode = graph_profiles(specs[DECODER], d, s)
    hidden = get_preset("demo-random").text.hidden_size
    assert prefill.shapes["inputs_embeds"] == ((1, 1, hidden), (1, 100, hidden), (2, 192, hidden))
    assert prefill.shapes["attention_mask"] == ((1, 1), (1, 100), (2, 256))
    assert decode.shapes["attention_mask"] == ((1, 1), (1, 64), (2, 256))
    kv = get_preset("demo-random").text
    assert decode.shapes[past_key_name(1)] == (
        (1, kv.num_kv_heads, 256, kv.head_dim), (1, kv.num_kv_heads, 256, kv.head_dim),
        (2, kv.num_kv_heads, 256, kv.head_dim))


def test_runtime_picks_the_profile_the_builder_meant() -> None:
    """The runner's profile choice (trt_buffers.select_profile) on the builder's profiles."""
    d = preset_dims("demo-random", max_crops=4, max_seq_len=256)
    spec = all_graph_specs(d)[DECODER]
    profiles = [p.shapes for p in graph_profiles(spec, d)]
    cache = (1, d.num_kv_heads, 256, d.head_dim)

    def shapes(seq: int, total: int) -> dict[str, tuple[int, ...]]:
        return {"inputs_embeds": (1, seq, d.d_model), "attention_mask": (1, total),
                "position_ids": (1, seq), past_key_name(0): cache}

    assert select_profile(profiles, shapes(37, 37)) == 0  # prefill
    assert select_profile(profiles, shapes(5, 60)) == 0  # a second turn: past > 0
    assert select_profile(profiles, shapes(1, 38)) == 1  # decode
    assert select_profile(profiles, shapes(1, 1)) == 1
    with pytest.raises(InputError):
        select_profile(profiles, shapes(1, 257))
    caps = capacity_shapes(spec, profiles, {"batch": 1})
    assert caps["present.0.key"] == (1, d.num_kv_heads, 256, d.head_dim)


@pytest.mark.parametrize("settings, words", [
    (ProfileSettings(max_prompt_len=5000), "max_prompt_len=5000"),
    (ProfileSettings(opt_crops=14), "opt_crops=14"),
    (ProfileSettings(opt_batch=2, max_batch=1), "invalid profile range"),
    (ProfileSettings(opt_decode_total=0), "invalid profile range"),
])
def test_bad_settings_are_named(settings: ProfileSettings, words: str) -> None:
    d = preset_dims("demo-random")
    with pytest.raises(InputError, match=words):
        all_profiles(all_graph_specs(d), d, settings)


def test_dim_range_validation() -> None:
    assert DimRange.fixed(4) == DimRange(4, 4, 4)
    with pytest.raises(InputError):
        DimRange(2, 1, 3)


def test_apply_profiles_sets_every_input(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.gpu import fake_trt

    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.make_module(fake_trt.FakeCuda()))
    d = preset_dims("demo-random", max_crops=4, max_seq_len=64)
    spec = all_graph_specs(d)[DECODER]
    profiles = graph_profiles(spec, d)
    builder = fake_trt.Builder(fake_trt.Logger())
    config = builder.create_builder_config()
    apply_profiles(builder, config, profiles)  # type: ignore[arg-type]
    assert [p.shapes for p in config.profiles] == [p.shapes for p in profiles]
