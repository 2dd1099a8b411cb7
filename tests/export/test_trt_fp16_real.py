"""The fp16 engine graphs of the *exported* models, computed with true fp16 arithmetic.

The builder converts each exported graph to fp16 with fp32 islands (molmo_export.trt.fp16)
before TensorRT sees it. ONNX Runtime's CPU provider runs many fp16 nodes in fp32, so here the
converted vision encoder, connector and decoder of the demo and golden artifacts run in
onnx.reference.ReferenceEvaluator, where numpy computes every fp16 op in fp16, and are
compared with the fp32 graphs in ONNX Runtime; bounds: tolerances.TABLE["trt-fp16/*"].

Then Qwen2's large residual activations are planted in the real decoder (weights scaled so the
residual stream reaches ~1e5, beyond fp16's 65504) to show the fp32 islands keep the logits
finite, and that the same graph without them overflows.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from molmo_export.trt.builder import fp16_onnx
from molmo_export.trt.fp16 import convert_model_to_fp16, kv_cache_policy, plan_fp16
from molmo_runtime import graph_io
from molmo_runtime.graph_io import GraphDims
from molmo_runtime.manifest import Manifest, load_manifest
from molmo_runtime.tolerances import TABLE

FP16_MAX = 65504.0


@pytest.fixture(params=["demo_artifact", "golden_artifact"])
def manifest(request: pytest.FixtureRequest) -> Manifest:
    return load_manifest(request.getfixturevalue(request.param), verify="none")


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def fp32_ort(m: Manifest, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(m.path(m.graphs[graph].file)),
                                providers=["CPUExecutionProvider"])
    return [np.asarray(x) for x in sess.run(None, feeds)]


def fp16_ref(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overflow warnings are the point of one test
        return [np.asarray(x) for x in ReferenceEvaluator(model).run(None, feeds)]


def engine_graph(m: Manifest, graph: str, tmp: Path) -> onnx.ModelProto:
    """The graph build_engines hands to TensorRT (same function, same policy)."""
    dst = tmp / f"{graph}.fp16.onnx"
    fp16_onnx(m.path(m.graphs[graph].file), dst, m.graphs[graph], fp32_residual=True)
    return onnx.load(str(dst))


def decoder_feeds(m: Manifest, length: int, kv: type, seed: int = 0) -> dict[str, np.ndarray]:
    """A prompt of real embedding rows (their true scale), empty cache."""
    d: GraphDims = m.dims
    table = np.load(m.path("embed_tokens.npy"), mmap_mode="r")
    ids = np.random.default_rng(seed).integers(0, min(table.shape[0], 256), length)
    feeds = {"inputs_embeds": np.asarray(table[ids], np.float32)[None],
             "attention_mask": np.ones((1, length), np.int64),
             "position_ids": np.arange(length, dtype=np.int64)[None]}
    for i in range(d.num_layers):
        for n in (graph_io.past_key_name(i), graph_io.past_value_name(i)):
            feeds[n] = np.zeros((1, d.num_kv_heads, d.max_seq_len, d.head_dim), kv)
    return feeds


def test_exported_graphs_in_true_fp16(manifest: Manifest, tmp_path: Path) -> None:
    m, d, rng = manifest, manifest.dims, np.random.default_rng(0)
    images = rng.standard_normal((2, d.patches_per_crop, d.patch_dim)).astype(np.float32)
    feats32 = fp32_ort(m, graph_io.VISION_ENCODER, {"images": images})[0]
    feats16 = fp16_ref(engine_graph(m, graph_io.VISION_ENCODER, tmp_path), {"images": images})[0]
    assert feats16.dtype == np.float32  # graph I/O keeps its types
    assert rel_err(feats16, feats32) <= TABLE["trt-fp16/vision_features"].rtol

    masks = rng.random((2, d.patches_per_crop)).astype(np.float32)
    masks[-1, : d.patches_per_crop // 3] = 0.0  # a partly padded crop
    conn = {"image_features": feats32, "image_masks": masks}
    tokens32 = fp32_ort(m, graph_io.CONNECTOR, conn)[0]
    tokens16 = fp16_ref(engine_graph(m, graph_io.CONNECTOR, tmp_path), conn)[0]
    assert rel_err(tokens16, tokens32) <= TABLE["trt-fp16/connector_tokens"].rtol

    decoder = engine_graph(m, graph_io.DECODER, tmp_path)
    io = {v.name: v.type.tensor_type.elem_type for v in decoder.graph.input}
    assert io[graph_io.past_key_name(0)] == onnx.TensorProto.FLOAT16  # the engine's cache
    want = fp32_ort(m, graph_io.DECODER, decoder_feeds(m, 24, np.float32))
    got = fp16_ref(decoder, decoder_feeds(m, 24, np.float16))
    names = [o.name for o in decoder.graph.output]
    assert rel_err(got[names.index("logits")], want[0]) <= TABLE["trt-fp16/logits"].rtol


# -- planted outliers ------------------------------------------------------------------------------

def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in names:
        out.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT,
                                                                   None))
    return out


def test_planted_residual_outliers_stay_finite_only_with_islands(demo_artifact: Path) -> None:
    """Qwen2's residual stream carries a few channels of huge magnitude (beyond fp16's 65504),
    built up layer by layer. Planted here: every residual branch of the real demo decoder (after
    attention, after the MLP) gets +3e4 in one channel, which fp16 holds, so their sum, the
    residual stream, reaches ~1.2e5, which it does not."""
    m = load_manifest(demo_artifact, verify="none")
    model = onnx.load(str(m.path(m.graphs[graph_io.DECODER].file)))
    spec = m.graphs[graph_io.DECODER]
    policy = kv_cache_policy([t.name for t in (*spec.inputs, *spec.outputs)],
                             fp32_residual=True)
    adds = [model.graph.node[i] for i, k in sorted(plan_fp16(model, policy).items())
            if k == "residual"]
    assert len(adds) == 2 * m.dims.num_layers  # after attention and after the MLP, per layer
    residual = {"inputs_embeds"} | {a.output[0] for a in adds}
    bias = np.zeros(m.dims.d_model, np.float32)
    bias[5] = 3e4
    model.graph.initializer.append(numpy_helper.from_array(bias, "planted_outlier"))
    planted: dict[str, onnx.NodeProto] = {}  # branch tensor -> the Add that plants the outlier
    for k, add in enumerate(adds):
        slot = next(j for j, x in enumerate(add.input) if x not in residual)
        branch = add.input[slot]
        planted[branch] = onnx.helper.make_node("Add", [branch, "planted_outlier"],
                                                [f"{branch}__planted"], name=f"planted_{k}")
        add.input[slot] = f"{branch}__planted"
    nodes = []  # each planted Add right after the branch's producer (nodes stay sorted)
    for n in model.graph.node:
        nodes += [n, *(planted[o] for o in n.output if o in planted)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)

    feeds = decoder_feeds(m, 16, np.float32, seed=1)
    probe = [a.output[0] for a in adds]
    sess = ort.InferenceSession(_with_outputs(model, probe).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    stream = float(np.abs(outs[adds[-1].output[0]][0, -1]).max())  # the last position
    assert 1e5 < stream < 2e5, stream  # past fp16's range, as Qwen2's outliers
    want = outs["logits"]
    assert np.isfinite(want).all()

    feeds16 = {k: v.astype(np.float16) if k.startswith("past_") else v
               for k, v in feeds.items()}
    kept, _ = convert_model_to_fp16(model, policy)
    logits = fp16_ref(kept, feeds16)[[o.name for o in kept.graph.output].index("logits")]
    assert np.isfinite(logits).all()
    assert rel_err(logits, want) <= TABLE["trt-fp16/logits"].rtol
    # Without either island the same graph overflows: the residual Adds in fp16 (> 65504),
    # or the norm's x * x in fp16.
    for off in ("fp32_residual", "keep_norms"):
        broken, _ = convert_model_to_fp16(model, dataclasses.replace(policy, **{off: False}))
        bad = fp16_ref(broken, feeds16)[[o.name for o in broken.graph.output].index("logits")]
        assert not np.isfinite(bad).all(), off
