"""Streaming weight-only QDQ (the trt-int8 decoder's "qdq-int8-weight-only" candidate): each
weight MatMul quantized on its own (write_graph(qdq_weight_only=True)) gives the graph that
quantizing the whole graph gives (qdq.quantize_qdq_int8 + strip_activation_qdq): the same
initializers exactly, the same nodes, the same outputs. On a small graph with what the Molmo
graphs hold: weight MatMuls (one with a bias Add), a MatMul of two activations (attention, left
float). A weight shared by two MatMuls (none in Molmo's graphs; quantize_static makes one DQ
for both) is refused by the streaming path with a clear error rather than written differently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from molmo_calibration.qdq import quantize_qdq_int8, strip_activation_qdq  # noqa: E402
from molmo_calibration.streaming import write_graph  # noqa: E402


def _model(shared: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    h = onnx.helper

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(
            (rng.standard_normal(shape) * rng.uniform(0.01, 1, shape[-1])).astype(np.float32),
            name)

    nodes = [
        h.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        h.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        h.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        h.make_node("MatMul", ["q", "kt"], ["scores"], name="attention"),  # two activations
        h.make_node("Softmax", ["scores"], ["p"], axis=-1, name="softmax"),
        h.make_node("MatMul", ["p", "x"], ["ctx"], name="mix"),
        h.make_node("MatMul", ["ctx", "wo"], ["o0"], name="o_proj"),
        h.make_node("Add", ["o0", "bo"], ["o1" if shared else "o"], name="o_bias"),
        *([h.make_node("MatMul", ["o1", "shared"], ["s1"], name="shared_1"),
           h.make_node("MatMul", ["s1", "shared"], ["o"], name="shared_2")] if shared else []),
        h.make_node("MatMul", ["o", "head"], ["logits"], name="lm_head"),
    ]
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, "seq", 64])],
        [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, "seq", 500])],
        initializer=[w("wq", 64, 64), w("wk", 64, 64), w("wo", 64, 64), w("bo", 64),
                     w("head", 64, 500), *([w("shared", 64, 64)] if shared else [])])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_streamed_weight_only_qdq_equals_the_whole_graph_quantizer(tmp_path: Path) -> None:
    fp32 = tmp_path / "fp32.onnx"
    onnx.save_model(_model(), str(fp32))
    x = np.random.default_rng(4).standard_normal((1, 7, 64)).astype(np.float32)
    quantize_qdq_int8(fp32, tmp_path / "w8a8.onnx", [{"x": x}])
    strip_activation_qdq(tmp_path / "w8a8.onnx", tmp_path / "whole.onnx")
    streamed = write_graph(_model(), tmp_path / "streamed" / "g.onnx", qdq_weight_only=True)
    a, b = onnx.load(str(tmp_path / "whole.onnx")), onnx.load(str(streamed))
    ia = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    ib = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert ia.keys() == ib.keys()
    for name in ia:
        assert ia[name].dtype == ib[name].dtype, name
        np.testing.assert_array_equal(ia[name], ib[name], err_msg=name)
    assert sorted(str(n) for n in a.graph.node) == sorted(str(n) for n in b.graph.node)
    dq = {n.input[0] for n in b.graph.node if n.op_type == "DequantizeLinear"}
    assert dq == {"wq_quantized", "wk_quantized", "wo_quantized", "head_quantized"}
    assert ib["head_quantized"].dtype == np.int8 and ib["head_scale"].shape == (500,)
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})
           for p in (tmp_path / "whole.onnx", streamed)]
    np.testing.assert_array_equal(run[0][0], run[1][0])


def test_a_shared_weight_is_refused(tmp_path: Path) -> None:
    from molmo_runtime.errors import ArtifactError

    with pytest.raises(ArtifactError, match="shared has 2 users"):
        write_graph(_model(shared=True), tmp_path / "g.onnx", qdq_weight_only=True)
    assert not any(tmp_path.iterdir())  # nothing half-written
