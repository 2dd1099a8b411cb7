"""The TensorRT runner end to end on a CPU, with TensorRT and CUDA simulated (tests/gpu/fake_trt).

The "engines" are the fp16 ONNX graphs the builder hands to TensorRT, executed by onnxruntime;
device memory is host bytes. So this checks our side of the runner (buffer sizes, bindings,
profile choice, KV-cache appends, mask uploads, CUDA-graph replay, chunking, refusals), not
TensorRT's kernels; tests/gpu/test_trt_engines.py does that where a GPU exists.

Tolerance: row "fp16/graph_output" of molmo_runtime.tolerances (of max |logit|).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from molmo_runtime.tolerances import TABLE

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from molmo_export.trt.builder import build_engines  # noqa: E402
from molmo_runtime.backends.trt import TrtBackend  # noqa: E402
from molmo_runtime.errors import (  # noqa: E402
    ArtifactError,
    EngineMismatchError,
    InputError,
    MissingDependencyError,
)
from molmo_runtime.manifest import load_manifest  # noqa: E402
from molmo_runtime.trt_env import MachineInfo  # noqa: E402
from tests.gpu import fake_trt  # noqa: E402
from tests.gpu.tiny_graphs import decoder_reference, tiny_dims, write_tiny_artifact  # noqa: E402

FP16_REL = TABLE["fp16/graph_output"].rtol
DIMS = tiny_dims(max_seq_len=24, max_crops=3)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[fake_trt.FakeCuda, Path]:
    cuda = fake_trt.install(monkeypatch)
    art = write_tiny_artifact(tmp_path / "art", DIMS)
    build_engines(art, "trt-fp16", max_batch=2, max_prompt_len=16, machine=fake_trt.MACHINE)
    return cuda, art


def backend(art: Path, **kw: object) -> TrtBackend:
    return TrtBackend(load_manifest(art), machine=fake_trt.MACHINE, **kw)  # type: ignore[arg-type]


def ort_run(art: Path, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(str(art / "onnx" / f"{graph}.onnx"),
                                providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, feeds)[0])


def test_vision_and_connector_chunk_crops_and_match_ort(sim: tuple[fake_trt.FakeCuda, Path]
                                                        ) -> None:
    _, art = sim
    b = backend(art)
    rng = np.random.default_rng(0)
    crops = DIMS.max_crops + 2  # more than the profile's max (max_crops + 1): two engine runs
    images = rng.standard_normal((crops, DIMS.patches_per_crop, DIMS.patch_dim)).astype(np.float32)
    feats = b.vision(images)
    assert feats.shape == (crops, DIMS.patches_per_crop, DIMS.vision_feature_dim)
    assert feats.dtype == np.float32
    assert rel_err(feats, ort_run(art, "vision_encoder", {"images": images})) < FP16_REL
    masks = (rng.random((crops, DIMS.patches_per_crop)) > 0.2).astype(np.float32)
    tokens = b.connector(feats, masks)
    want = ort_run(art, "connector", {"image_features": feats, "image_masks": masks})
    assert tokens.shape == (crops, DIMS.tokens_per_crop, DIMS.d_model)
    assert rel_err(tokens, want) < FP16_REL
    with pytest.raises(InputError, match="crops"):
        b.connector(feats, masks[:2])


def _generate(b: TrtBackend, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray,
              prompt: int) -> list[np.ndarray]:
    """Prefill `prompt` positions, then one position per step; logits after each call."""
    b.start(embeds.shape[0])
    out = [b.decode(embeds[:, :prompt], mask[:, :prompt], positions[:, :prompt])]
    for t in range(prompt, embeds.shape[1]):
        out.append(b.decode(embeds[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1]))
    return out


def _inputs(batch: int, length: int, pad: list[int], seed: int = 0
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((batch, length, DIMS.d_model)).astype(np.float32)
    mask = np.ones((batch, length), np.int64)
    positions = np.zeros((batch, length), np.int64)
    for r, p in enumerate(pad):  # left padding, positions count real tokens only
        mask[r, :p] = 0
        positions[r, p:] = np.arange(length - p)
    return embeds, mask, positions


@pytest.mark.parametrize("batch, pad", [(1, [0]), (2, [0, 3])])
def test_decoder_matches_full_recompute(sim: tuple[fake_trt.FakeCuda, Path], batch: int,
                                        pad: list[int]) -> None:
    _, art = sim
    b = backend(art)
    prompt, length = 9, 14
    embeds, mask, positions = _inputs(batch, length, pad)
    logits = _generate(b, embeds, mask, positions, prompt)
    assert b.cache_length == length
    for step, got in enumerate(logits):
        t = prompt + step
        want = decoder_reference(art / "onnx" / "decoder.onnx", DIMS, embeds[:, :t],
                                 mask[:, :t], positions[:, :t])
        assert got.shape == (batch, DIMS.vocab_rows) and got.dtype == np.float32
        assert rel_err(got, want) < FP16_REL, f"step {step}"
    # A new sequence reuses the buffers: same results again.
    again = _generate(b, embeds, mask, positions, prompt)
    np.testing.assert_array_equal(again[-1], logits[-1])


def test_cuda_graph_replay_matches_eager(sim: tuple[fake_trt.FakeCuda, Path]) -> None:
    cuda, art = sim
    embeds, mask, positions = _inputs(1, 20, [2], seed=3)
    eager = _generate(backend(art), embeds, mask, positions, prompt=5)
    graphed_backend = backend(art, cuda_graph=True, graph_bucket=8)
    graphed = _generate(graphed_backend, embeds, mask, positions, prompt=5)
    # Steps at totals 6..20 fall in buckets 8, 16 and 24 (capped at max_seq_len 24): one
    # capture each; every other step is a replay.
    assert len(cuda.graphs) == 3
    assert cuda.launches == len(graphed) - 1 - 3
    for e, g in zip(eager, graphed):
        # Padded positions add exact zeros to the attention: equal up to fp16 summation order.
        assert rel_err(g, e.astype(np.float64)) < 1e-3


def test_decode_step_uploads_only_the_new_token(sim: tuple[fake_trt.FakeCuda, Path]) -> None:
    cuda, art = sim
    b = backend(art)
    embeds, mask, positions = _inputs(1, 12, [0])
    b.start(1)
    b.decode(embeds[:, :8], mask[:, :8], positions[:, :8])
    for t in range(8, 12):
        before = cuda.htod_bytes
        b.decode(embeds[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1])
        # one embedding row (f32), one position and one mask column (int64): no growth with t
        assert cuda.htod_bytes - before == DIMS.d_model * 4 + 8 + 8


def test_bad_calls_are_refused(sim: tuple[fake_trt.FakeCuda, Path]) -> None:
    _, art = sim
    b = backend(art)
    embeds, mask, positions = _inputs(1, 30, [0])
    with pytest.raises(InputError, match="start"):
        b.decode(embeds[:, :3], mask[:, :3], positions[:, :3])
    with pytest.raises(InputError, match="max_batch >= 3"):
        b.start(3)
    b.start(1)
    with pytest.raises(InputError, match="attention_mask"):
        b.decode(embeds[:, :3], mask[:, :4], positions[:, :3])
    with pytest.raises(InputError, match="profiles"):  # prompt longer than max_prompt_len 16
        b.decode(embeds[:, :17], mask[:, :17], positions[:, :17])
    b.decode(embeds[:, :16], mask[:, :16], positions[:, :16])
    for t in range(16, 24):
        b.decode(embeds[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1])
    with pytest.raises(InputError, match="KV cache"):
        b.decode(embeds[:, 24:25], mask[:, :25], positions[:, 24:25])


def test_engines_of_another_machine_are_refused(sim: tuple[fake_trt.FakeCuda, Path]) -> None:
    _, art = sim
    other = MachineInfo(trt_version="10.7.0.23", cuda_runtime_version="12.6",
                        cuda_driver_version="12.8", gpu_name="NVIDIA L4",
                        compute_capability="8.9")
    with pytest.raises(EngineMismatchError) as e:
        TrtBackend(load_manifest(art), machine=other)
    assert "TensorRT version" in str(e.value) and "GPU" in str(e.value)
    assert f"molmo-export --target trt-fp16 --from-onnx --out {art}" in str(e.value)


def test_artifact_without_engines(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_trt.install(monkeypatch)
    art = write_tiny_artifact(tmp_path / "art", DIMS)
    with pytest.raises(ArtifactError, match="no TensorRT engine.*--target trt-fp16 --from-onnx --out"):
        TrtBackend(load_manifest(art), machine=fake_trt.MACHINE)


def test_close_frees_device_memory(sim: tuple[fake_trt.FakeCuda, Path]) -> None:
    cuda, art = sim
    b = backend(art, cuda_graph=True, graph_bucket=8)
    embeds, mask, positions = _inputs(1, 12, [0])
    _generate(b, embeds, mask, positions, prompt=6)
    b.vision(np.zeros((2, DIMS.patches_per_crop, DIMS.patch_dim), np.float32))
    assert cuda.blocks
    b.close()
    assert cuda.blocks == {}


def test_without_tensorrt_the_backend_says_what_is_missing(tmp_path: Path) -> None:
    from molmo_runtime.trt_env import missing_for_tensorrt

    if not missing_for_tensorrt():
        pytest.skip("this machine has TensorRT and a GPU")
    art = write_tiny_artifact(tmp_path / "art", DIMS)
    with pytest.raises(MissingDependencyError) as e:
        TrtBackend(load_manifest(art))
    assert "\n" not in str(e.value) and "TensorRT >= 10.3, < 12.0" in str(e.value)


# -- CUDA graphs replayed out of order, binding once, TensorRT 11 names, chunked prefill -----------

def test_fake_graph_replay_needs_the_captured_state(sim: tuple[fake_trt.FakeCuda, Path]) -> None:
    """The fake's contract that the runner must honour: a replay reads its context's state at
    launch, and that state must be the captured one."""
    cuda, art = sim
    b = backend(art)
    b.start(1)
    embeds, mask, positions = _inputs(1, 4, [0])
    b.decode(embeds[:, :1], mask[:, :1], positions[:, :1])  # binds the decode context
    runner = b._decoder
    profile = len(runner.profiles) - 1
    ctx = runner.contexts[profile]
    runner.bindings[profile].shape("attention_mask", (1, 2))
    step = b._capture(profile)
    cuda.graph_launch(step.graph_exec, 7)  # same state: fine
    runner.bindings[profile].shape("attention_mask", (1, 3))  # another bucket re-binds it
    with pytest.raises(AssertionError, match="state changed since capture"):
        cuda.graph_launch(step.graph_exec, 7)
    assert ctx.shapes["attention_mask"] == (1, 3)


def test_cuda_graph_buckets_replayed_out_of_order(sim: tuple[fake_trt.FakeCuda, Path]) -> None:
    """A long generation captures buckets 8, 16, 24; a short one then replays bucket 8 while
    the decode context is still bound to bucket 24: the runner must re-bind before replaying."""
    cuda, art = sim
    eager, graphed = backend(art), backend(art, cuda_graph=True, graph_bucket=8)
    long_in, short_in = _inputs(1, 22, [0], seed=4), _inputs(1, 10, [1], seed=5)
    for inputs, prompt in ((long_in, 5), (short_in, 3), (long_in, 12), (short_in, 6)):
        want = _generate(eager, *inputs, prompt=prompt)
        got = _generate(graphed, *inputs, prompt=prompt)
        for e, g in zip(want, got):
            assert rel_err(g, e.astype(np.float64)) < 1e-3
    assert len(cuda.graphs) == 3  # captured once per bucket, replayed across generations
    assert cuda.launches > 0


def _delta(cuda: fake_trt.FakeCuda, before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in cuda.trt_calls.items() if v != before.get(k, 0)}


def test_decode_makes_two_tensorrt_calls_per_token(sim: tuple[fake_trt.FakeCuda, Path]) -> None:
    """Addresses are bound once per context; a decode step changes one shape and runs: 2 calls
    whatever the layer count (was 3 + 4 * num_layers bindings + the run)."""
    cuda, art = sim
    b = backend(art)
    embeds, mask, positions = _inputs(1, 14, [0])
    b.start(1)
    before = dict(cuda.trt_calls)
    b.decode(embeds[:, :8], mask[:, :8], positions[:, :8])
    tensors = 4 + 4 * DIMS.num_layers  # 3 inputs + logits, past K/V + present K/V per layer
    assert _delta(cuda, before)["set_tensor_address"] == tensors  # the prefill context
    for t in range(8, 14):
        before = dict(cuda.trt_calls)
        b.decode(embeds[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1])
        if t == 8:  # the first step on the decode context binds it, once
            assert _delta(cuda, before) == {"set_tensor_address": tensors, "execute_async_v3": 1,
                                            "set_input_shape": 3 + 2 * DIMS.num_layers}
        else:
            assert _delta(cuda, before) == {"set_input_shape": 1, "execute_async_v3": 1}, t
    # A new generation of the same batch size re-binds nothing but shapes.
    before = dict(cuda.trt_calls)
    _generate(b, embeds, mask, positions, prompt=8)
    assert "set_tensor_address" not in _delta(cuda, before)


def test_graph_replay_makes_no_tensorrt_call(sim: tuple[fake_trt.FakeCuda, Path]) -> None:
    cuda, art = sim
    b = backend(art, cuda_graph=True, graph_bucket=8)
    embeds, mask, positions = _inputs(1, 16, [0])
    b.start(1)
    b.decode(embeds[:, :4], mask[:, :4], positions[:, :4])
    per_step = []
    for t in range(4, 16):
        before, launches = dict(cuda.trt_calls), cuda.launches
        b.decode(embeds[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1])
        per_step.append((_delta(cuda, before), cuda.launches - launches))
    # total 5: first step in bucket 8 (binds the decode context, runs, captures);
    # totals 6..8: replays; total 9: bucket 16 (one new shape, run, capture); then replays.
    assert per_step[0][0]["execute_async_v3"] == 2 and per_step[0][1] == 0
    for calls, launches in per_step[1:4] + per_step[5:]:
        assert calls == {} and launches == 1
    assert per_step[4] == ({"set_input_shape": 1, "execute_async_v3": 2}, 0)


@pytest.mark.parametrize("version", ["10.3.0.30", "10.16.1.11", "11.4.0.106"])
def test_runs_on_each_supported_tensorrt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         version: str) -> None:
    """From 11.0 the fake raises on the names TensorRT 11 removed (device_memory_size,
    IExecutionContext.device_memory): build and run must not so much as read them."""
    fake_trt.install(monkeypatch, version)
    machine = MachineInfo(**{**fake_trt.MACHINE.to_dict(), "trt_version": version})
    art = write_tiny_artifact(tmp_path / "art", DIMS)
    build_engines(art, "trt-fp16", max_prompt_len=16, machine=machine)
    b = TrtBackend(load_manifest(art), machine=machine)
    embeds, mask, positions = _inputs(1, 12, [0])
    logits = _generate(b, embeds, mask, positions, prompt=9)
    want = decoder_reference(art / "onnx" / "decoder.onnx", DIMS, embeds, mask, positions)
    assert rel_err(logits[-1], want) < FP16_REL


def test_prompt_longer_than_the_profile_is_prefilled_in_chunks(
        sim: tuple[fake_trt.FakeCuda, Path]) -> None:
    from molmo_runtime.prefill import prefill

    _, art = sim
    b = backend(art)
    assert b.max_prefill_tokens == 16  # build_engines(max_prompt_len=16)
    embeds, mask, positions = _inputs(2, 23, [0, 4], seed=6)
    ref = art / "onnx" / "decoder.onnx"
    with b.new_state(2) as state:
        logits = prefill(state, embeds[:, :21], mask[:, :21], positions[:, :21],  # 16 + 5
                         b.max_prefill_tokens)
        assert state.length == 21
        want = decoder_reference(ref, DIMS, embeds[:, :21], mask[:, :21], positions[:, :21])
        assert rel_err(logits, want) < FP16_REL
        logits = state.decode(embeds[:, 21:22], mask[:, :22], positions[:, 21:22])
    assert rel_err(logits, decoder_reference(ref, DIMS, embeds[:, :22], mask[:, :22],
                                             positions[:, :22])) < FP16_REL
