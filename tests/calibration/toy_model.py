"""Toy fp32 artifacts with numpy + onnx.helper that follow molmo_runtime.graph_io exactly.

They let the calibration tests run without torch: a ViT-like vision encoder (LayerNormalization,
Softmax attention, QuickGELU MLP, residual adds, two block outputs concatenated), a connector
(pad embedding by mask, 2x2 mean pooling, SwiGLU projector) and a Qwen2-like decoder (RMSNorm,
GQA attention over the [past | new] keys with the graph_io cache convention, SwiGLU MLP, logits of
the last position only). Weights are random with a fixed seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from molmo_runtime.graph_io import (
    CONNECTOR,
    DECODER,
    VISION_ENCODER,
    GraphDims,
    all_graph_specs,
    past_key_name,
    past_value_name,
    present_key_name,
    present_value_name,
)
from molmo_runtime.manifest import file_record, write_manifest

OPSET = 17
F32 = TensorProto.FLOAT


@dataclass(frozen=True)
class ToySizes:
    vit_width: int = 32
    vit_heads: int = 2
    vit_layers: int = 2
    d_model: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    layers: int = 2
    mlp: int = 128
    vocab: int = 300
    max_crops: int = 4
    max_seq_len: int = 2048
    lm_head_scale: float = 4.0  # logits of a few units, like the demo model's

    def dims(self) -> GraphDims:
        return GraphDims(patches_per_crop=576, patch_dim=588,
                         vision_feature_dim=2 * self.vit_width, tokens_per_crop=144,
                         d_model=self.d_model, num_layers=self.layers,
                         num_kv_heads=self.kv_heads, head_dim=self.head_dim,
                         vocab_rows=self.vocab, max_crops=self.max_crops,
                         max_seq_len=self.max_seq_len)


class _Builder:
    """Collects nodes and initializers; every helper returns its output name."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, fan_in: int, fan_out: int, hint: str, scale: float = 1.0) -> str:
        w = self.rng.standard_normal((fan_in, fan_out)).astype(np.float32)
        return self.const(w * np.float32(scale / np.sqrt(fan_in)), hint)

    def op(self, op_type: str, inputs: list[str], hint: str | None = None,
           outputs: list[str] | None = None, **attrs: object) -> str:
        outs = outputs or [self.name(hint or op_type.lower())]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type),
                                           **attrs))
        return outs[0]

    def linear(self, x: str, fan_in: int, fan_out: int, hint: str, bias: bool = False) -> str:
        y = self.op("MatMul", [x, self.weight(fan_in, fan_out, hint + "_w")], hint)
        if bias:
            b = self.rng.standard_normal(fan_out).astype(np.float32) * 0.02
            y = self.op("Add", [y, self.const(b, hint + "_b")])
        return y

    def layer_norm(self, x: str, width: int) -> str:
        scale = (1.0 + 0.1 * self.rng.standard_normal(width)).astype(np.float32)
        bias = (0.05 * self.rng.standard_normal(width)).astype(np.float32)
        return self.op("LayerNormalization", [x, self.const(scale, "ln_w"),
                                              self.const(bias, "ln_b")], axis=-1, epsilon=1e-5)

    def rms_norm(self, x: str, width: int) -> str:
        var = self.op("ReduceMean", [self.op("Mul", [x, x])], axes=[-1], keepdims=1)
        inv = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [
            var, self.const(np.array(1e-6, np.float32))])])])
        w = (1.0 + 0.1 * self.rng.standard_normal(width)).astype(np.float32)
        return self.op("Mul", [self.op("Mul", [x, inv]), self.const(w, "rms_w")])

    def shape_const(self, dims: list[int]) -> str:
        return self.const(np.array(dims, np.int64), "shape")

    def attention(self, q: str, k: str, v: str, head_dim: int, mask: str | None) -> str:
        """q [B, H, S, hd], k/v [B, H, T, hd] -> [B, H, S, hd]."""
        kt = self.op("Transpose", [k], perm=[0, 1, 3, 2])
        scores = self.op("Mul", [self.op("MatMul", [q, kt]),
                                 self.const(np.array(head_dim**-0.5, np.float32))])
        if mask is not None:
            scores = self.op("Where", [mask, scores, self.const(np.array(-1e9, np.float32))])
        return self.op("MatMul", [self.op("Softmax", [scores], axis=-1), v])

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
              name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="molmo-calibration-tests")
        model.ir_version = 9
        onnx.checker.check_model(model, full_check=True)
        return model


def _value_infos(spec_tensors: tuple) -> list[onnx.ValueInfoProto]:  # type: ignore[type-arg]
    dtypes = {"float32": F32, "int64": TensorProto.INT64}
    return [helper.make_tensor_value_info(t.name, dtypes[t.dtype], list(t.dims))
            for t in spec_tensors]


def vision_encoder(s: ToySizes, seed: int = 1) -> onnx.ModelProto:
    b = _Builder(seed)
    w, h = s.vit_width, s.vit_heads
    hd = w // h
    # images [N, 576, 588] -> patches [N, 576, w] (+ learned positions)
    x = b.linear("images", 588, w, "patch", bias=True)
    x = b.op("Add", [x, b.const(0.1 * b.rng.standard_normal((576, w)).astype(np.float32), "pos")])
    x = b.layer_norm(x, w)
    outs = []
    for _ in range(s.vit_layers):
        n = b.layer_norm(x, w)
        heads = []
        for name in ("q", "k", "v"):
            t = b.linear(n, w, w, name, bias=True)
            t = b.op("Reshape", [t, b.shape_const([0, 576, h, hd])])
            heads.append(b.op("Transpose", [t], perm=[0, 2, 1, 3]))  # [N, h, 576, hd]
        a = b.attention(*heads, head_dim=hd, mask=None)
        a = b.op("Reshape", [b.op("Transpose", [a], perm=[0, 2, 1, 3]),
                             b.shape_const([0, 576, w])])
        x = b.op("Add", [x, b.linear(a, w, w, "o", bias=True)])  # residual
        n = b.layer_norm(x, w)
        m = b.linear(n, w, 2 * w, "fc1", bias=True)
        m = b.op("Mul", [m, b.op("Sigmoid", [b.op("Mul", [
            m, b.const(np.array(1.702, np.float32))])])])  # QuickGELU
        x = b.op("Add", [x, b.linear(m, 2 * w, w, "fc2", bias=True)])
        outs.append(x)
    b.op("Concat", [outs[-1], outs[-2]], outputs=["image_features"], axis=-1)
    spec = all_graph_specs(s.dims())[VISION_ENCODER]
    return b.model(_value_infos(spec.inputs), _value_infos(spec.outputs), VISION_ENCODER)


def connector(s: ToySizes, seed: int = 2) -> onnx.ModelProto:
    b = _Builder(seed)
    f, d = 2 * s.vit_width, s.d_model
    # pad embedding where the mask says the patch is padding: x + (1 - mask) * pad
    pad = b.const(0.5 * b.rng.standard_normal(f).astype(np.float32), "pad_embed")
    missing = b.op("Sub", [b.const(np.array(1.0, np.float32)), b.op(
        "Unsqueeze", ["image_masks", b.const(np.array([-1], np.int64))])])  # [N, 576, 1]
    x = b.op("Add", ["image_features", b.op("Mul", [missing, pad])])
    # 2x2 pooling: [N, 24, 24, f] -> [N, 12, 2, 12, 2, f] -> mean -> [N, 144, f]
    x = b.op("Reshape", [x, b.shape_const([0, 12, 2, 12, 2, f])])
    x = b.op("ReduceMean", [x], axes=[2, 4], keepdims=0)
    x = b.op("Reshape", [x, b.shape_const([0, 144, f])])
    g = b.linear(x, f, 2 * d, "w1")
    u = b.linear(x, f, 2 * d, "w3")
    a = b.op("Mul", [b.op("Mul", [g, b.op("Sigmoid", [g])]), u])
    b.op("MatMul", [a, b.weight(2 * d, d, "w2")], outputs=["image_tokens"])
    spec = all_graph_specs(s.dims())[CONNECTOR]
    return b.model(_value_infos(spec.inputs), _value_infos(spec.outputs), CONNECTOR)


def decoder(s: ToySizes, seed: int = 3) -> onnx.ModelProto:
    b = _Builder(seed)
    d, h, kv, hd = s.d_model, s.heads, s.kv_heads, s.head_dim
    # sizes: seq = new tokens, total = past + seq, past = total - seq
    seq = b.op("Gather", [b.op("Shape", ["inputs_embeds"]), b.const(np.array(1, np.int64))])
    total = b.op("Gather", [b.op("Shape", ["attention_mask"]), b.const(np.array(1, np.int64))])
    past = b.op("Sub", [total, seq])
    zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    # allowed[b, 0, i, j] = (j <= past + i) and attention_mask[b, j]
    qpos = b.op("Unsqueeze", [b.op("Add", [b.op("Range", [zero, seq, one]), past]),
                              b.const(np.array([1], np.int64))])  # [S, 1]
    kpos = b.op("Range", [zero, total, one])  # [T]
    causal = b.op("LessOrEqual", [kpos, qpos])  # [S, T]
    keep = b.op("Unsqueeze", [b.op("Cast", ["attention_mask"], to=TensorProto.BOOL),
                              b.const(np.array([1, 2], np.int64))])  # [B, 1, 1, T]
    mask = b.op("And", [causal, keep])  # [B, 1, S, T]
    # absolute position embedding from position_ids keeps the toy simple (the real one: RoPE)
    pos_table = b.const(0.5 * b.rng.standard_normal((s.max_seq_len, d)).astype(np.float32),
                        "pos")
    x = b.op("Add", ["inputs_embeds", b.op("Gather", [pos_table, "position_ids"])])
    present = []
    for layer in range(s.layers):
        n = b.rms_norm(x, d)
        q = b.op("Transpose", [b.op("Reshape", [b.linear(n, d, h * hd, "q", bias=True),
                                                b.shape_const([0, 0, h, hd])])], perm=[0, 2, 1, 3])
        new_kv = []
        for name in ("k", "v"):
            t = b.linear(n, d, kv * hd, name, bias=True)
            new_kv.append(b.op("Transpose", [b.op("Reshape", [t, b.shape_const([0, 0, kv, hd])])],
                               perm=[0, 2, 1, 3]))  # [B, kv, S, hd]
        k_new = b.op("Identity", [new_kv[0]], outputs=[present_key_name(layer)])
        v_new = b.op("Identity", [new_kv[1]], outputs=[present_value_name(layer)])
        present += [k_new, v_new]
        full = []
        for cache, new in ((past_key_name(layer), k_new), (past_value_name(layer), v_new)):
            valid = b.op("Slice", [cache, b.const(np.array([0], np.int64)),
                                   b.op("Unsqueeze", [past, b.const(np.array([0], np.int64))]),
                                   b.const(np.array([2], np.int64))])  # [B, kv, past, hd]
            t = b.op("Concat", [valid, new], axis=2)  # [B, kv, T, hd]
            t = b.op("Expand", [b.op("Unsqueeze", [t, b.const(np.array([2], np.int64))]),
                                b.shape_const([1, 1, h // kv, 1, 1])])  # GQA repeat
            full.append(b.op("Reshape", [t, b.shape_const([0, h, -1, hd])]))
        a = b.attention(q, full[0], full[1], hd, mask)
        a = b.op("Reshape", [b.op("Transpose", [a], perm=[0, 2, 1, 3]),
                             b.shape_const([0, 0, h * hd])])
        x = b.op("Add", [x, b.linear(a, h * hd, d, "o")])
        n = b.rms_norm(x, d)
        g, u = b.linear(n, d, s.mlp, "gate"), b.linear(n, d, s.mlp, "up")
        m = b.op("Mul", [b.op("Mul", [g, b.op("Sigmoid", [g])]), u])
        x = b.op("Add", [x, b.linear(m, s.mlp, d, "down")])
    x = b.rms_norm(x, d)
    last = b.op("Slice", [x, b.const(np.array([-1], np.int64)),
                          b.const(np.array([2**62], np.int64)), b.const(np.array([1], np.int64))])
    b.op("MatMul", [last, b.weight(d, s.vocab, "lm_head", scale=s.lm_head_scale)],
         outputs=["logits"])
    spec = all_graph_specs(s.dims())[DECODER]
    return b.model(_value_infos(spec.inputs), _value_infos(spec.outputs), DECODER)


def write_toy_artifact(out: Path, sizes: ToySizes = ToySizes()) -> Path:
    """A complete fp32 artifact directory (no tokenizer: samples come pre-tokenized)."""
    dims = sizes.dims()
    specs = all_graph_specs(dims)
    models = {VISION_ENCODER: vision_encoder(sizes), CONNECTOR: connector(sizes),
              DECODER: decoder(sizes)}
    for name, model in models.items():
        path = out / specs[name].file
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
    rng = np.random.default_rng(4)
    np.save(out / "embed_tokens.npy",
            rng.standard_normal((sizes.vocab + 128, sizes.d_model)).astype(np.float32))
    (out / "processor.json").write_text(json.dumps({"max_crops": sizes.max_crops}))
    files = ["embed_tokens.npy", "processor.json", *(specs[n].file for n in models)]
    write_manifest(out, {
        "exporter_version": "toy", "model": {"name": "toy", "config": {}},
        "target": "onnx", "precision": {n: "fp32" for n in specs}, "opset": OPSET,
        "dims": dims.to_dict(), "graphs": {n: sp.to_dict() for n, sp in specs.items()},
        "special_tokens": {"bos": 256, "eos": 256, "pad": 256, "im_start": 300, "im_end": 301,
                           "im_patch": 302, "im_col": 303, "image": 304},
        "max_crops": sizes.max_crops, "max_seq_len": sizes.max_seq_len, "has_tokenizer": False,
        "files": {f: file_record(out, f) for f in files}})
    return out
