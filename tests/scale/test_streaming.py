"""Streaming export and streaming quantization against today's in-memory paths.

Equality is exact (atol 0): the streamed graphs compute with the same weights through the same
ONNX Runtime kernels; any difference is a bug, not rounding. demo runs in CI; bench-0.5b (the
same code paths at widths where MatMulNBits blocks, external data and the 151,936-row LM head
are real) is marked slow.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from molmo_calibration.ort_quant import quantize_nbits  # noqa: E402
from molmo_calibration.qdq import quantize_qdq_int8, strip_activation_qdq  # noqa: E402
from molmo_calibration.streaming import NBits, write_graph  # noqa: E402
from molmo_export.export.onnx_export import resolve_checkpoint  # noqa: E402
from molmo_export.export.onnx_graph import example_input  # noqa: E402
from molmo_export.export.streaming import (  # noqa: E402
    checkpoint_reader,
    fake_model,
    trace_template,
)
from molmo_export.weights import CheckpointWeights  # noqa: E402
from molmo_runtime.graph_io import DECODER, GraphSpec  # noqa: E402
from molmo_runtime.manifest import load_manifest  # noqa: E402
from tests.conftest import exported_artifact  # noqa: E402

PRESETS = ["demo", pytest.param("bench-0.5b", marks=[pytest.mark.slow, pytest.mark.heavy])]


def _feeds(spec: GraphSpec) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(1)
    return {t.name: example_input(t, gen).numpy() for t in spec.inputs}


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


class Case:
    """One preset: today's fp32 artifact, the checkpoint, and the streamed graph templates
    (traced once; write_graph consumes a copy)."""

    def __init__(self, preset: str, artifact: Path) -> None:
        self.manifest = load_manifest(artifact)
        self.weights = CheckpointWeights(resolve_checkpoint(preset))
        self.read = checkpoint_reader(self.weights)
        model = fake_model(self.weights.config)
        self._templates = {name: trace_template(model, name, spec, self.manifest.raw["opset"],
                                                self.read)
                           for name, spec in self.manifest.graphs.items()}

    def template(self, graph: str) -> onnx.ModelProto:
        copy = onnx.ModelProto()
        copy.CopyFrom(self._templates[graph])
        return copy


@pytest.fixture(scope="module", params=PRESETS)
def case(request: pytest.FixtureRequest) -> Case:
    # demo: the session's shared demo artifact (no export of its own); bench-0.5b: its own
    preset = request.param
    artifact = request.getfixturevalue("demo_artifact") if preset == "demo" else \
        exported_artifact(f"{preset}-scale", preset, max_seq_len=256, max_crops=2)
    return Case(preset, artifact)


def test_streamed_graphs_equal_the_in_memory_export(case: Case, tmp_path: Path) -> None:
    manifest = case.manifest
    for name, spec in manifest.graphs.items():
        streamed = write_graph(case.template(name), tmp_path / spec.file, read=case.read)
        # strict: every initializer has the shape the graph declares (quantize_dynamic needs it)
        onnx.shape_inference.infer_shapes_path(str(streamed), str(tmp_path / "inferred.onnx"))
        feeds = _feeds(spec)
        _assert_same(_run(manifest.path(spec.file), feeds), _run(streamed, feeds))


def test_streamed_nbits_equals_ort_whole_graph_quantizer(case: Case, tmp_path: Path) -> None:
    """int4 decoder with a wider (8-bit) LM head, three ways: ORT's quantizer on
    the whole fp32 graph (today), the streaming quantizer over that graph's external data, and
    the streaming quantizer straight from the checkpoint (what a streaming export writes)."""
    manifest = case.manifest
    spec = manifest.graphs[DECODER]
    fp32 = manifest.path(spec.file)
    nbits = NBits(4, 32, 8, manifest.dims.vocab_rows)
    whole = tmp_path / "whole" / "decoder.onnx"
    quantize_nbits(fp32, whole, 4, 32, 8, manifest.dims.vocab_rows)
    from_graph = write_graph(onnx.load(str(fp32), load_external_data=False),
                             tmp_path / "graph" / "decoder.onnx", base_dir=fp32.parent,
                             nbits=nbits)
    from_checkpoint = write_graph(case.template(DECODER), tmp_path / "checkpoint" / "decoder.onnx",
                                  read=case.read, nbits=nbits)
    ops = {n.op_type for n in onnx.load(str(from_checkpoint), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops
    feeds = _feeds(spec)
    expected = _run(whole, feeds)
    _assert_same(expected, _run(from_graph, feeds))
    _assert_same(expected, _run(from_checkpoint, feeds))


def test_streamed_weight_only_qdq_equals_the_whole_graph_quantizer(case: Case,
                                                                   tmp_path: Path) -> None:
    """The trt-int8 decoder's weight-only QDQ candidate (per-channel int8 weights, no activation
    Q/DQ), three ways as above: quantize_static on the whole fp32 graph then the activation
    pairs stripped (today), and the streaming writer from that graph and from the checkpoint."""
    manifest = case.manifest
    spec = manifest.graphs[DECODER]
    fp32 = manifest.path(spec.file)
    feeds = _feeds(spec)
    quantize_qdq_int8(fp32, tmp_path / "w8a8" / "decoder.onnx", [feeds])
    whole = tmp_path / "whole" / "decoder.onnx"
    strip_activation_qdq(tmp_path / "w8a8" / "decoder.onnx", whole)
    from_graph = write_graph(onnx.load(str(fp32), load_external_data=False),
                             tmp_path / "graph" / "decoder.onnx", base_dir=fp32.parent,
                             qdq_weight_only=True)
    from_checkpoint = write_graph(case.template(DECODER), tmp_path / "checkpoint" / "decoder.onnx",
                                  read=case.read, qdq_weight_only=True)
    ops = [n.op_type for n in onnx.load(str(from_checkpoint), load_external_data=False).graph.node]
    assert "DequantizeLinear" in ops and "QuantizeLinear" not in ops
    expected = _run(whole, feeds)
    _assert_same(expected, _run(from_graph, feeds))
    _assert_same(expected, _run(from_checkpoint, feeds))


def test_fp16_weights_are_the_fp32_graph_with_rounded_weights(case: Case, tmp_path: Path
                                                              ) -> None:
    """--dtype fp16 stores float16 weights and casts them back: the outputs are exactly those of
    the fp32 graph whose weights were rounded to float16 (float16 -> float32 is exact)."""
    spec = case.manifest.graphs[DECODER]

    def rounded(location: str) -> np.ndarray | None:
        array = case.read(location)
        return None if array is None else array.astype(np.float16).astype(np.float32)

    half = write_graph(case.template(DECODER), tmp_path / "fp16" / "decoder.onnx",
                       read=case.read, dtype="fp16")
    full = write_graph(case.template(DECODER), tmp_path / "fp32" / "decoder.onnx", read=rounded)
    external = [t for t in onnx.load(str(half), load_external_data=False).graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    # the weights (matrices) are float16; small constants (norm weights, biases: 1-D) stay
    # float32 as molmo_calibration.streaming says, and go to the data file once they are
    # larger than INLINE_BYTES (bench-0.5b's 896-wide ones; none of the demo's)
    assert {t.data_type for t in external if len(t.dims) >= 2} == {onnx.TensorProto.FLOAT16}
    kept = [t for t in external if t.data_type != onnx.TensorProto.FLOAT16]
    assert all(len(t.dims) == 1 and t.data_type == onnx.TensorProto.FLOAT for t in kept)
    # so the data file is half the fp32 one, but for the float32 constants it holds
    assert half.with_name("decoder.onnx.data").stat().st_size * 2 - \
        full.with_name("decoder.onnx.data").stat().st_size == 4 * sum(t.dims[0] for t in kept)
    feeds = _feeds(spec)
    _assert_same(_run(full, feeds), _run(half, feeds))


@pytest.mark.parametrize("target", ["ort-fp32", "ort-int4"])
def test_streamed_ort_target_gets_the_fused_decoder_of_the_in_memory_path(
        target: str, demo_artifact: Path, demo_quantized: Callable[[str], tuple[Path, Any]],
        demo_streamed: Callable[[str], Path], tmp_path: Path) -> None:
    """`molmo-export --stream --target ort-*` writes the decoder made for ONNX Runtime straight
    from the checkpoint (no trace, no portable graph): the same files as the in-memory path,
    which builds it after exporting / quantizing and checks it against the portable graph."""
    from molmo_export.export.fused_artifact import fuse_decoder, graph_files

    streamed = load_manifest(demo_streamed(target), "full")
    assert streamed.decoder_flavour == "ort"
    assert "skipped" in streamed.raw["decoder_check"]
    source = demo_artifact if target == "ort-fp32" else demo_quantized(target)[0]
    in_memory = tmp_path / "in-memory"
    shutil.copytree(source, in_memory)
    reference = fuse_decoder(in_memory, log=lambda s: None)
    assert streamed.raw["precision"][DECODER] == reference.raw["precision"][DECODER]
    files = graph_files(streamed, DECODER)
    assert files == graph_files(reference, DECODER)
    for rel in files:
        assert streamed.path(rel).read_bytes() == reference.path(rel).read_bytes(), rel
