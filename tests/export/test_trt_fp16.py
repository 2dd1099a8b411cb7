"""fp32 -> fp16 ONNX with fp32 islands (what a strongly typed TensorRT network is built from).

Two evaluators:
  - onnxruntime CPU: the converted graphs are valid and run; outputs stay near fp32.
  - onnx.reference.ReferenceEvaluator: numpy computes fp16 tensors *in fp16* (ORT's CPU provider
    quietly runs many fp16 nodes in fp32), so it shows what an fp16 engine would do; the islands
    are tested by removing each one and watching the result break.

Tolerances (max |fp16 - fp32| / max |fp32| over the output), and why:
  FP16_REL = 1e-2   fp16 keeps 11 significant bits (rel. step 4.9e-4 per rounding); the tiny
                    graphs chain ~10 roundings on the way to an output, and random weights give
                    no cancellation that would make it worse.
  BROKEN_REL = 0.2  what "broken" means when an island is removed: 20x the tolerance.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from molmo_export.trt.fp16 import (
    Fp16Policy,
    convert_file_to_fp16,
    convert_model_to_fp16,
    kv_cache_policy,
)
from molmo_runtime import graph_io
from molmo_runtime.tolerances import TABLE
from tests.gpu.tiny_graphs import connector_model, decoder_model, tiny_dims, vision_model

FP16_REL = TABLE["fp16/graph_output"].rtol
BROKEN_REL = TABLE["fp16/broken"].rtol
DIMS = tiny_dims(max_seq_len=24)
ISLANDS = ("keep_norms", "keep_softmax", "keep_index_maths", "keep_rope", "fp32_residual")


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def decoder_policy(**off: bool) -> Fp16Policy:
    names = [t.name for t in (*graph_io.decoder_spec(DIMS).inputs,
                              *graph_io.decoder_spec(DIMS).outputs)]
    base = kv_cache_policy(names)
    kwargs = {k: getattr(base, k) for k in ISLANDS}
    kwargs.update({k: False for k in off})
    return Fp16Policy(fp16_io=base.fp16_io, **kwargs)


def decoder_feeds(seq: int = 7, pos_offset: int = 0, kv: type = np.float32,
                  seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((1, seq), np.int64)
    mask[0, :2] = 0  # left padding: fully masked query rows exist
    feeds = {"inputs_embeds": rng.standard_normal((1, seq, DIMS.d_model)).astype(np.float32),
             "attention_mask": mask,
             "position_ids": (np.maximum(np.arange(seq) - 2, 0) + pos_offset)[None]}
    for i in range(DIMS.num_layers):
        for n in (graph_io.past_key_name(i), graph_io.past_value_name(i)):
            feeds[n] = np.zeros((1, DIMS.num_kv_heads, DIMS.max_seq_len, DIMS.head_dim), kv)
    return feeds


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(x) for x in sess.run(None, feeds)]


def run_ref(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 overflow warnings are the point of some tests
        return [np.asarray(x) for x in ReferenceEvaluator(model).run(None, feeds)]


def input_types(model: onnx.ModelProto, op_type: str) -> set[int]:
    """Element types reaching the data input of every `op_type` node."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.input, *inferred.graph.value_info)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return {types[n.input[0]] for n in model.graph.node if n.op_type == op_type}


@pytest.mark.parametrize("make, feeds", [
    (vision_model, lambda: {"images": np.random.default_rng(1).standard_normal(
        (3, DIMS.patches_per_crop, DIMS.patch_dim)).astype(np.float32)}),
    (connector_model, lambda: {
        "image_features": np.random.default_rng(2).standard_normal(
            (2, DIMS.patches_per_crop, DIMS.vision_feature_dim)).astype(np.float32),
        "image_masks": (np.random.default_rng(3).random((2, DIMS.patches_per_crop)) > 0.3
                        ).astype(np.float32)}),
])
def test_vision_and_connector_convert_and_stay_close(make, feeds) -> None:  # type: ignore[no-untyped-def]
    model = make(DIMS)
    f16, report = convert_model_to_fp16(model, Fp16Policy(fp32_residual=True))
    onnx.checker.check_model(f16, full_check=True)
    assert report.fp16_nodes > 0 and report.fp32_islands
    f = feeds()
    want = run_ort(model, f)[0]
    for got in (run_ort(f16, f)[0], run_ref(f16, f)[0]):
        assert got.dtype == np.float32  # graph I/O keeps its types
        assert rel_err(got, want) < FP16_REL


def test_decoder_conversion_types_and_accuracy() -> None:
    model = decoder_model(DIMS)
    f16, report = convert_model_to_fp16(model, decoder_policy())
    onnx.checker.check_model(f16, full_check=True)
    io = {v.name: v.type.tensor_type.elem_type for v in (*f16.graph.input, *f16.graph.output)}
    assert io["inputs_embeds"] == io["logits"] == TensorProto.FLOAT
    assert io[graph_io.past_key_name(0)] == io[graph_io.present_value_name(1)] == TensorProto.FLOAT16
    # The islands: norm statistics, softmax and its score MatMul, RoPE angles stay fp32 ...
    for op in ("Pow", "ReduceMean", "Softmax", "Cos", "Sin"):
        assert input_types(f16, op) == {TensorProto.FLOAT}, op
    assert set(report.fp32_islands) == {"norm", "softmax", "index", "rope", "residual"}
    # ... and the weight MatMuls run in fp16 (their weights are stored fp16).
    weights = {t.name: t.data_type for t in f16.graph.initializer}
    matmul_weights = [weights[n.input[1]] for n in f16.graph.node
                      if n.op_type == "MatMul" and n.input[1] in weights]
    assert matmul_weights and set(matmul_weights) == {TensorProto.FLOAT16}

    want = run_ort(model, decoder_feeds())
    feeds16 = decoder_feeds(kv=np.float16)
    for got in (run_ort(f16, feeds16), run_ref(f16, feeds16)):
        assert got[1].dtype == np.float16  # present.0.key
        assert rel_err(got[0], want[0]) < FP16_REL  # logits
        assert rel_err(got[1], want[1]) < FP16_REL  # new keys after RoPE


@pytest.mark.parametrize("island, setup", [
    # Qwen2-like residual magnitudes: x^2 overflows fp16 (65504) unless the norm stays fp32.
    ("keep_norms", {"act_scale": 300.0}),
    # Masked scores at finfo(float32).min become -inf in fp16; fully masked rows turn NaN.
    ("keep_softmax", {}),
    # position * inv_freq near position 3000 is far outside fp16 precision (step 2.0).
    ("keep_index_maths", {"pos_offset": 3000}),
])
def test_each_island_is_needed(island: str, setup: dict[str, float]) -> None:
    model = decoder_model(DIMS, act_scale=setup.get("act_scale", 1.0))
    feeds = decoder_feeds(pos_offset=int(setup.get("pos_offset", 0)))
    want = run_ort(model, feeds)[0]
    feeds16 = {k: v.astype(np.float16) if k.startswith("past_") else v for k, v in feeds.items()}
    kept = run_ref(convert_model_to_fp16(model, decoder_policy())[0], feeds16)[0]
    assert rel_err(kept, want) < FP16_REL
    broken = run_ref(convert_model_to_fp16(model, decoder_policy(**{island: False}))[0],
                     feeds16)
    # logits, or the keys after RoPE (what the position error shows in first)
    errors = [rel_err(b, w) for b, w in zip(broken[:2], run_ort(model, feeds)[:2])]
    assert not all(np.isfinite(b).all() for b in broken[:2]) or max(errors) > BROKEN_REL


def test_shared_constants_are_duplicated_and_large_ones_clipped() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])
    c = numpy_helper.from_array(np.full((3,), 1e-7, np.float32), "c")  # below fp16's normal range
    big = numpy_helper.from_array(np.array([1e6], np.float32), "big")
    nodes = [helper.make_node("Mul", ["x", "c"], ["h"]),  # fp16 region
             helper.make_node("Add", ["h", "big"], ["y"]),  # fp16 region: 1e6 is clipped
             helper.make_node("Mul", ["x", "x"], ["sq"]),  # norm statistics: fp32
             helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
             helper.make_node("Add", ["ms", "c"], ["z"])]  # eps of the norm: fp32 keeps 1e-7
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y, z], [c, big]),
                              opset_imports=[helper.make_opsetid("", 17)])
    f16, report = convert_model_to_fp16(model)
    onnx.checker.check_model(f16, full_check=True)
    assert sorted(report.fp32_islands["norm"]) == ["Add_4", "Mul_2", "ReduceMean_3"]
    inits = {t.name: t for t in f16.graph.initializer}
    assert inits["c"].data_type == TensorProto.FLOAT
    assert inits["c__fp16"].data_type == TensorProto.FLOAT16
    assert numpy_helper.to_array(inits["big"]).item() == 65504.0
    assert report.clipped_constants == ["big"]
    y16, z16 = run_ort(f16, {"x": np.full((2, 3), 1e-3, np.float32)})
    assert z16.dtype == np.float32
    np.testing.assert_allclose(z16, 1e-6 + 1e-7, rtol=1e-6)  # fp32 maths, fp32 constant
    assert y16[0, 0] == 65504.0


def test_file_conversion_streams_external_data(tmp_path: Path) -> None:
    model = decoder_model(DIMS)
    src = tmp_path / "src" / "decoder.onnx"
    src.parent.mkdir()
    onnx.save(model, str(src), save_as_external_data=True, location="decoder.onnx.data",
              size_threshold=0)
    dst = tmp_path / "fp16" / "decoder.onnx"
    dst.parent.mkdir()
    report = convert_file_to_fp16(src, dst, decoder_policy())
    assert (dst.parent / "decoder.onnx.data").stat().st_size > 0
    # (onnx.save with external data rewrote `model` in place: convert a fresh copy)
    in_memory, mem_report = convert_model_to_fp16(decoder_model(DIMS), decoder_policy())
    assert report.summary() == mem_report.summary()
    onnx.checker.check_model(str(dst), full_check=True)
    feeds = decoder_feeds(kv=np.float16)
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    from_file = sess.run(["logits"], feeds)[0]
    np.testing.assert_array_equal(from_file, run_ort(in_memory, feeds)[0])


def _qdq_model(opset: int, scale: float) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.integers(-127, 127, (4, 3)).astype(np.int8), "w_q")
    inits = [w, numpy_helper.from_array(np.array(scale, np.float32), "w_s"),
             numpy_helper.from_array(np.array(0, np.int8), "w_z"),
             numpy_helper.from_array(np.array(0.02, np.float32), "x_s"),
             numpy_helper.from_array(np.array(0, np.int8), "x_z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "qdq", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset, scale, n_fp32", [(17, 0.01, 3), (18, 0.01, 0), (19, 0.01, 0),
                                                   (19, 1e-6, 1)])
def test_qdq_nodes(opset: int, scale: float, n_fp32: int) -> None:
    """Q/DQ follow the fp16 region where ONNX allows fp16 scales (opset 19; an opset-18 graph is
    raised to 19) and the scales are normal fp16 numbers; otherwise they stay fp32 with Casts
    around them."""
    model = _qdq_model(opset, scale)
    f16, report = convert_model_to_fp16(model)
    onnx.checker.check_model(f16, full_check=True)
    assert f16.opset_import[0].version == (19 if opset == 18 else opset)
    assert len(report.fp32_islands.get("qdq", [])) == n_fp32  # 1: only the tiny weight scale
    assert set(report.fp32_islands) <= {"qdq"}
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    want = run_ort(model, {"x": x})[0]
    assert rel_err(run_ort(f16, {"x": x})[0], want) < FP16_REL


def test_control_flow_is_refused() -> None:
    body = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "b", [],
                             [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    node = helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)
    model = helper.make_model(helper.make_graph([node], "g", [cond, x], [out]))
    with pytest.raises(ValueError, match="subgraph"):
        convert_model_to_fp16(model)
