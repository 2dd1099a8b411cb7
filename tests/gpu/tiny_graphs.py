"""Tiny ONNX graphs that follow molmo_runtime.graph_io's contract, built with onnx.helper.

Used by the TensorRT tests that run without a GPU: the fp16 conversion (same op patterns as the
exported Molmo graphs: decomposed RMSNorm, LayerNormalization, RoPE from position_ids, an
additive mask from attention_mask, softmax attention with GQA, SwiGLU), and the runner and
builder simulations (tests/gpu/fake_trt.py), which execute these graphs with onnxruntime in place
of engines. Torch-free.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from molmo_runtime import graph_io
from molmo_runtime.graph_io import GraphDims
from molmo_runtime.manifest import file_record, write_manifest

OPSET = 17
NUM_HEADS = 4
MASK_MIN = float(np.finfo(np.float32).min)  # what torch's SDPA-style masks use


def tiny_dims(max_seq_len: int = 24, max_crops: int = 3) -> GraphDims:
    return GraphDims(patches_per_crop=16, patch_dim=12, vision_feature_dim=8, tokens_per_crop=4,
                     d_model=32, num_layers=2, num_kv_heads=2, head_dim=8, vocab_rows=40,
                     max_crops=max_crops, max_seq_len=max_seq_len)


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, value: np.ndarray | float | list[int], base: str = "c") -> str:
        arr = np.asarray(value)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def weight(self, shape: tuple[int, ...], scale: float = 1.0) -> str:
        w = self.rng.standard_normal(shape).astype(np.float32) * scale / np.sqrt(shape[0])
        return self.const(w, "w")

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs: object) -> str:
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **attrs))
        return outs[0]

    def rms_norm(self, x: str, dim: int, eps: float = 1e-6) -> str:
        sq = self.op("Pow", [x, self.const(np.float32(2.0))])
        var = self.op("ReduceMean", [sq], axes=[-1], keepdims=1)
        rstd = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [var, self.const(
            np.float32(eps))])])])
        w = self.const((1.0 + 0.1 * self.rng.standard_normal(dim)).astype(np.float32), "norm")
        return self.op("Mul", [self.op("Mul", [x, rstd]), w])

    def attention(self, q: str, k: str, v: str, mask: str | None, scale: float) -> str:
        """q [.., Sq, hd], k/v [.., Sk, hd] -> [.., Sq, hd]; additive mask broadcast on scores."""
        s = self.op("MatMul", [q, self.op("Transpose", [k], perm=[0, 1, 3, 2])])
        s = self.op("Mul", [s, self.const(np.float32(scale))])
        if mask is not None:
            s = self.op("Add", [s, mask])
        return self.op("MatMul", [self.op("Softmax", [s], axis=-1), v])

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
              name: str) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


def _vi(spec: graph_io.TensorSpec) -> onnx.ValueInfoProto:
    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
            "int64": TensorProto.INT64}[spec.dtype]
    return helper.make_tensor_value_info(spec.name, elem, list(spec.dims))


def vision_model(d: GraphDims, seed: int = 0) -> onnx.ModelProto:
    """images [crops, P, PD] -> patch embed, LayerNormalization, one attention block -> [crops, P, F]."""
    b = _Builder(seed)
    hidden = d.vision_feature_dim
    x = b.op("MatMul", ["images", b.weight((d.patch_dim, hidden))])
    h = b.op("LayerNormalization", [x, b.const(np.ones(hidden, np.float32)),
                                    b.const(np.zeros(hidden, np.float32))], axis=-1)
    q = b.op("Unsqueeze", [b.op("MatMul", [h, b.weight((hidden, hidden))]), b.const([1])])
    k = b.op("Unsqueeze", [b.op("MatMul", [h, b.weight((hidden, hidden))]), b.const([1])])
    v = b.op("Unsqueeze", [b.op("MatMul", [h, b.weight((hidden, hidden))]), b.const([1])])
    a = b.op("Squeeze", [b.attention(q, k, v, None, hidden**-0.5), b.const([1])])
    b.op("Add", [x, b.op("MatMul", [a, b.weight((hidden, hidden))])])
    b.nodes[-1].output[0] = "image_features"
    spec = graph_io.vision_encoder_spec(d)
    return b.model([_vi(t) for t in spec.inputs], [_vi(t) for t in spec.outputs], "vision")


def connector_model(d: GraphDims, seed: int = 1) -> onnx.ModelProto:
    """features * masks, 4-patch mean pooling, SwiGLU projector -> image_tokens [crops, T, D]."""
    b = _Builder(seed)
    f = d.vision_feature_dim
    x = b.op("Mul", ["image_features", b.op("Unsqueeze", ["image_masks", b.const([-1])])])
    x = b.op("Reshape", [x, b.const(np.array([0, d.tokens_per_crop, -1, f], np.int64))])
    x = b.op("ReduceMean", [x], axes=[2], keepdims=0)  # [crops, T, F]
    gate = b.op("MatMul", [x, b.weight((f, 2 * d.d_model))])
    up = b.op("MatMul", [x, b.weight((f, 2 * d.d_model))])
    act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
    b.op("MatMul", [act, b.weight((2 * d.d_model, d.d_model))])
    b.nodes[-1].output[0] = "image_tokens"
    spec = graph_io.connector_spec(d)
    return b.model([_vi(t) for t in spec.inputs], [_vi(t) for t in spec.outputs], "connector")


def decoder_model(d: GraphDims, seed: int = 2, act_scale: float = 1.0) -> onnx.ModelProto:
    """The KV-cached decoder of graph_io: whole cache in, new tokens' K/V out, last logits.

    act_scale multiplies inputs_embeds inside the graph (a Mul by a constant), to give the
    residual stream Qwen2-like magnitudes in the overflow test.
    """
    b = _Builder(seed)
    hd, kv, heads, dm = d.head_dim, d.num_kv_heads, NUM_HEADS, d.d_model
    groups = heads // kv
    x = b.op("Mul", ["inputs_embeds", b.const(np.float32(act_scale))])

    # Sizes: seq from inputs_embeds, total from attention_mask, past = total - seq.
    seq = b.op("Gather", [b.op("Shape", ["inputs_embeds"]), b.const(np.array(1, np.int64))])
    total = b.op("Gather", [b.op("Shape", ["attention_mask"]), b.const(np.array(1, np.int64))])
    past = b.op("Sub", [total, seq])

    # RoPE tables from position_ids (float maths on integers: fp32 in the fp16 graph).
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    pos = b.op("Unsqueeze", [b.op("Cast", ["position_ids"], to=TensorProto.FLOAT), b.const([-1])])
    freqs = b.op("Mul", [pos, b.const(inv_freq.astype(np.float32))])  # [B, S, hd/2]
    emb = b.op("Concat", [freqs, freqs], axis=-1)
    cos = b.op("Unsqueeze", [b.op("Cos", [emb]), b.const([1])])  # [B, 1, S, hd]
    sin = b.op("Unsqueeze", [b.op("Sin", [emb]), b.const([1])])

    # Additive mask [B, 1, S, T]: padding from attention_mask, causal from past + query index.
    q_idx = b.op("Add", [b.op("Range", [b.const(np.array(0, np.int64)), seq,
                                        b.const(np.array(1, np.int64))]), past])
    k_idx = b.op("Range", [b.const(np.array(0, np.int64)), total, b.const(np.array(1, np.int64))])
    causal = b.op("Cast", [b.op("LessOrEqual", [k_idx, b.op("Unsqueeze", [q_idx, b.const([1])])])],
                  to=TensorProto.FLOAT)  # [S, T]
    pad = b.op("Unsqueeze", [b.op("Cast", ["attention_mask"], to=TensorProto.FLOAT),
                             b.const([1, 2])])  # [B, 1, 1, T]
    allowed = b.op("Mul", [pad, causal])
    mask = b.op("Mul", [b.op("Sub", [b.const(np.float32(1.0)), allowed]),
                        b.const(np.float32(MASK_MIN))])

    def heads_first(t: str, n: int) -> str:  # [B, S, n*hd] -> [B, n, S, hd]
        r = b.op("Reshape", [t, b.const(np.array([0, 0, n, hd], np.int64))])
        return b.op("Transpose", [r], perm=[0, 2, 1, 3])

    def rope(t: str) -> str:
        x1 = b.op("Slice", [t, b.const([0]), b.const([hd // 2]), b.const([3])])
        x2 = b.op("Slice", [t, b.const([hd // 2]), b.const([hd]), b.const([3])])
        rot = b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)
        return b.op("Add", [b.op("Mul", [t, cos]), b.op("Mul", [rot, sin])])

    def repeat_kv(t: str) -> str:  # [B, kv, T, hd] -> [B, heads, T, hd]
        u = b.op("Unsqueeze", [t, b.const([2])])
        shape5 = b.op("Concat", [b.op("Shape", [u], end=2), b.const([groups]),
                                 b.op("Shape", [u], start=3)], axis=0)
        e = b.op("Expand", [u, shape5])
        return b.op("Reshape", [e, b.const(np.array([0, heads, -1, hd], np.int64))])

    for i in range(d.num_layers):
        h = b.rms_norm(x, dm)
        q = rope(heads_first(b.op("MatMul", [h, b.weight((dm, heads * hd))]), heads))
        k = rope(heads_first(b.op("MatMul", [h, b.weight((dm, kv * hd))]), kv))
        v = heads_first(b.op("MatMul", [h, b.weight((dm, kv * hd))]), kv)
        b.nodes.append(helper.make_node("Identity", [k], [graph_io.present_key_name(i)]))
        b.nodes.append(helper.make_node("Identity", [v], [graph_io.present_value_name(i)]))
        end = b.op("Unsqueeze", [past, b.const([0])])
        past_k = b.op("Slice", [graph_io.past_key_name(i), b.const([0]), end, b.const([2])])
        past_v = b.op("Slice", [graph_io.past_value_name(i), b.const([0]), end, b.const([2])])
        k_all = repeat_kv(b.op("Concat", [past_k, k], axis=2))
        v_all = repeat_kv(b.op("Concat", [past_v, v], axis=2))
        a = b.attention(q, k_all, v_all, mask, hd**-0.5)  # [B, heads, S, hd]
        a = b.op("Reshape", [b.op("Transpose", [a], perm=[0, 2, 1, 3]),
                             b.const(np.array([0, 0, heads * hd], np.int64))])
        x = b.op("Add", [x, b.op("MatMul", [a, b.weight((heads * hd, dm))])])
        h = b.rms_norm(x, dm)
        gate = b.op("MatMul", [h, b.weight((dm, 3 * dm))])
        up = b.op("MatMul", [h, b.weight((dm, 3 * dm))])
        act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
        x = b.op("Add", [x, b.op("MatMul", [act, b.weight((3 * dm, dm))])])
    last = b.op("Slice", [b.rms_norm(x, dm), b.const([-1]), b.const([np.iinfo(np.int64).max]),
                          b.const([1])])
    b.op("MatMul", [last, b.weight((dm, d.vocab_rows))])
    b.nodes[-1].output[0] = "logits"
    spec = graph_io.decoder_spec(d)
    return b.model([_vi(t) for t in spec.inputs], [_vi(t) for t in spec.outputs], "decoder")


def write_tiny_artifact(out: Path, dims: GraphDims | None = None) -> Path:
    """An artifact directory (onnx/*.onnx + manifest.json) with the tiny graphs."""
    d = dims or tiny_dims()
    out.mkdir(parents=True, exist_ok=True)
    specs = graph_io.all_graph_specs(d)
    models = {graph_io.VISION_ENCODER: vision_model(d), graph_io.CONNECTOR: connector_model(d),
              graph_io.DECODER: decoder_model(d)}
    for name, m in models.items():
        (out / specs[name].file).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(m, str(out / specs[name].file))
    embed = np.random.default_rng(3).standard_normal((d.vocab_rows, d.d_model))
    np.save(out / "embed_tokens.npy", embed.astype(np.float32))
    files = {s.file: file_record(out, s.file) for s in specs.values()}
    files["embed_tokens.npy"] = file_record(out, "embed_tokens.npy")
    write_manifest(out, {
        "exporter_version": "test", "target": "onnx", "model": {"config": {"name": "tiny"}},
        "dims": d.to_dict(), "graphs": {n: s.to_dict() for n, s in specs.items()},
        "special_tokens": {"eos": 0}, "has_tokenizer": False, "max_crops": d.max_crops,
        "max_seq_len": d.max_seq_len, "files": files})
    return out


def decoder_reference(model_path: Path, dims: GraphDims, embeds: np.ndarray,
                      mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Logits of the last position of a full (cache-free) run: past 0, seq = all tokens."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    b = embeds.shape[0]
    feeds: dict[str, np.ndarray] = {"inputs_embeds": embeds, "attention_mask": mask,
                                    "position_ids": positions}
    empty = np.zeros((b, dims.num_kv_heads, dims.max_seq_len, dims.head_dim), np.float32)
    for i in range(dims.num_layers):
        feeds[graph_io.past_key_name(i)] = empty
        feeds[graph_io.past_value_name(i)] = empty
    logits = sess.run(["logits"], feeds)[0]
    return np.asarray(logits)[:, 0, :]
