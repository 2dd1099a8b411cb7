"""The TensorRT runner's pure shape / offset / profile logic (no GPU, no TensorRT)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from molmo_runtime.errors import InputError
from molmo_runtime.graph_io import GraphDims, decoder_spec, present_key_name, vision_encoder_spec
from molmo_runtime.trt_buffers import (
    ALIGNMENT,
    Copy2D,
    capacity_shapes,
    changed_span,
    chunks,
    decode_bucket,
    kv_cache_layout,
    numpy_dtype,
    padded_decode_mask,
    present_to_cache_copy,
    select_profile,
)

DIMS = GraphDims(patches_per_crop=576, patch_dim=588, vision_feature_dim=2048,
                 tokens_per_crop=144, d_model=3584, num_layers=28, num_kv_heads=4, head_dim=128,
                 vocab_rows=152064, max_crops=12, max_seq_len=4096)

PREFILL = {"inputs_embeds": ((1, 1, 8), (1, 64, 8), (1, 64, 8)),
           "attention_mask": ((1, 1), (1, 64), (1, 128))}
DECODE = {"inputs_embeds": ((1, 1, 8), (1, 1, 8), (1, 1, 8)),
          "attention_mask": ((1, 1), (1, 64), (1, 128))}


def test_numpy_dtype_of_engine_tensors() -> None:
    assert numpy_dtype("HALF") == np.float16
    assert numpy_dtype("FLOAT") == np.float32
    assert numpy_dtype("INT64") == np.int64
    with pytest.raises(InputError, match="no numpy equivalent"):
        numpy_dtype("BF16")


def test_select_profile_prefers_the_tightest() -> None:
    profiles = [PREFILL, DECODE]
    # One new token fits both profiles: the decode profile (seq max 1) is chosen.
    assert select_profile(profiles, {"inputs_embeds": (1, 1, 8), "attention_mask": (1, 40)}) == 1
    assert select_profile(profiles, {"inputs_embeds": (1, 7, 8), "attention_mask": (1, 7)}) == 0
    with pytest.raises(InputError, match="outside the engine's optimization profiles") as e:
        select_profile(profiles, {"inputs_embeds": (1, 65, 8), "attention_mask": (1, 65)},
                       "decoder")
    assert "profile 0" in str(e.value) and "rebuild" in str(e.value)
    with pytest.raises(InputError):  # wrong rank
        select_profile(profiles, {"inputs_embeds": (1, 8)})


def test_capacity_shapes_cover_every_profile() -> None:
    spec = decoder_spec(DIMS)
    prefill = {t.name: (tuple(1 if isinstance(d, str) else d for d in t.dims),) * 3
               for t in spec.inputs}
    prefill["inputs_embeds"] = ((1, 1, 3584), (2, 2048, 3584), (2, 2048, 3584))
    prefill["attention_mask"] = ((1, 1), (2, 2048), (2, 4096))
    caps = capacity_shapes(spec, [prefill])
    assert caps["inputs_embeds"] == (2, 2048, 3584)
    assert caps["attention_mask"] == (2, 4096)
    assert caps[present_key_name(0)] == (2, 4, 2048, 128)  # output: dims from the inputs
    assert caps["logits"] == (2, 1, 152064)
    assert capacity_shapes(spec, [prefill], {"batch": 1})[present_key_name(3)] == (1, 4, 2048, 128)
    vision = vision_encoder_spec(DIMS)
    caps = capacity_shapes(vision, [{"images": ((1, 576, 588), (13, 576, 588), (13, 576, 588))}])
    assert caps["image_features"] == (13, 576, 2048)


def test_chunks() -> None:
    assert chunks(5, 4) == [(0, 4), (4, 5)]
    assert chunks(13, 13) == [(0, 13)]
    assert chunks(26, 13) == [(0, 13), (13, 26)]
    assert chunks(0, 3) == []
    with pytest.raises(ValueError):
        chunks(3, 0)


def test_kv_cache_layout_is_aligned_and_disjoint() -> None:
    lay = kv_cache_layout(DIMS, batch=1, itemsize=2)
    assert lay.shape == (1, 4, 4096, 128)
    assert lay.tensor_bytes == 4 * 4096 * 128 * 2  # 4 MiB per layer per K or V
    offsets = sorted(lay.key_offsets + lay.value_offsets)
    assert len(set(offsets)) == 56
    assert all(o % ALIGNMENT == 0 for o in offsets)
    assert all(b - a >= lay.tensor_bytes for a, b in zip(offsets, offsets[1:]))
    assert offsets[-1] + lay.tensor_bytes <= lay.total_bytes
    # 2 * 28 * 4 * 128 * 2 bytes per token = 56 KiB per token at fp16; 4096 tokens = 224 MiB.
    assert lay.total_bytes == 2 * 28 * 4 * 128 * 2 * 4096


def _apply(copy: Copy2D, dst: np.ndarray, src: np.ndarray) -> None:
    """What cudaMemcpy2D does, on byte arrays."""
    d, s = dst.reshape(-1).view(np.uint8), src.reshape(-1).view(np.uint8)
    for r in range(copy.height):
        do, so = copy.dst_offset + r * copy.dst_pitch, copy.src_offset + r * copy.src_pitch
        d[do:do + copy.width] = s[so:so + copy.width]


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), kv=st.integers(1, 4), hd=st.sampled_from([2, 8]),
       max_seq=st.integers(1, 24), data=st.data())
def test_present_copy_appends_at_past(batch: int, kv: int, hd: int, max_seq: int,
                                      data: st.DataObject) -> None:
    dims = GraphDims(1, 1, 1, 1, 1, num_layers=1, num_kv_heads=kv, head_dim=hd, vocab_rows=1,
                     max_crops=1, max_seq_len=max_seq)
    past = data.draw(st.integers(0, max_seq - 1))
    seq = data.draw(st.integers(1, max_seq - past))
    rng = np.random.default_rng(past * 31 + seq)
    cache = rng.standard_normal((batch, kv, max_seq, hd)).astype(np.float16)
    present = rng.standard_normal((batch, kv, seq, hd)).astype(np.float16)
    want = cache.copy()
    want[:, :, past:past + seq] = present
    _apply(present_to_cache_copy(dims, batch, past, seq, 2), cache, present)
    np.testing.assert_array_equal(cache, want)


def test_present_copy_refuses_overflow() -> None:
    with pytest.raises(InputError, match="max_seq_len"):
        present_to_cache_copy(DIMS, 1, past=4095, seq=2, itemsize=2)


def test_changed_span() -> None:
    a = np.ones((1, 5), np.int64)
    assert changed_span(None, a) == (0, 5)
    assert changed_span(a, a) is None
    grown = np.ones((1, 6), np.int64)
    assert changed_span(a, grown) == (5, 6)  # batch 1 decode: only the new column
    b2_old, b2_new = np.ones((2, 5), np.int64), np.ones((2, 6), np.int64)
    b2_old[1, 0] = b2_new[1, 0] = 0
    lo, hi = changed_span(b2_old, b2_new)  # type: ignore[misc]
    assert hi == 12 and lo <= 6  # rows moved: everything from row 0's end is re-sent
    new = b2_new.reshape(-1).copy()
    dev = np.zeros(12, np.int64)
    dev[:10] = b2_old.reshape(-1)
    dev[lo:hi] = new[lo:hi]
    np.testing.assert_array_equal(dev, new)


def test_decode_bucket() -> None:
    assert decode_bucket(1, 128, 4096) == 128
    assert decode_bucket(128, 128, 4096) == 128
    assert decode_bucket(129, 128, 4096) == 256
    assert decode_bucket(4000, 128, 4096) == 4096
    assert decode_bucket(50, 128, 100) == 100  # capped at max_seq_len
    with pytest.raises(InputError):
        decode_bucket(4097, 128, 4096)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    s = q @ k.T + np.where(mask > 0, 0.0, np.finfo(np.float32).min)
    p = np.exp(s - s.max())
    return (p / p.sum()) @ v


def test_padded_decode_mask_keeps_the_attention_result() -> None:
    """What a graph-captured step computes equals the unpadded step (stale cache rows masked)."""
    rng = np.random.default_rng(0)
    past, bucket, hd = 9, 16, 4
    cache_k = rng.standard_normal((bucket, hd)) * 10  # stale, finite values beyond `past`
    cache_v = rng.standard_normal((bucket, hd)) * 10
    q, k_new, v_new = rng.standard_normal((3, hd))
    mask = np.ones((1, past + 1), np.int64)
    mask[0, :2] = 0  # left padding
    want = _attention(q, np.vstack([cache_k[:past], k_new]), np.vstack([cache_v[:past], v_new]),
                      mask[0])
    padded = padded_decode_mask(mask, bucket)
    assert padded.shape == (1, bucket)
    assert padded[0, :past].tolist() == mask[0, :past].tolist()
    assert padded[0, past:bucket - 1].sum() == 0 and padded[0, -1] == 1
    got = _attention(q, np.vstack([cache_k[:bucket - 1], k_new]),
                     np.vstack([cache_v[:bucket - 1], v_new]), padded[0])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
