"""The decoder graph made for ONNX Runtime (flavour "ort"), written node by node from weights.

Per layer (pre-norm Qwen2 block), 10 nodes (11 in fp32, where the q/k/v bias is an Add):

    SkipSimplifiedLayerNormalization   residual + RMSNorm in one kernel (layer 0: plain RMSNorm)
    MatMul | MatMulNBits  q|k|v        one fused projection, Qwen2's biases included
    GroupQueryAttention                RoPE inside (cos/sin caches), causal, padding as a bias;
                                       the new K/V written in place into the runtime's cache
                                       (past and present are the same buffer)
    MatMul | MatMulNBits  o
    SkipSimplifiedLayerNormalization
    MatMul | MatMulNBits  gate         (two matmuls: faster than one of twice the width)
    MatMul | MatMulNBits  up
    QuickGelu(alpha=1) * up            SiLU(gate) * up
    MatMul | MatMulNBits  down

Graph I/O is graph_io.decoder_spec(dims, "ort"): the portable graph's inputs; `present.*` are
the past buffers themselves ([B, kv, cache, hd], updated in place), not the new positions.

Positions: RoPE uses the cache index of each position (GroupQueryAttention's own rule), and
`position_ids` is not read. For rows without padding this is the reference's position. A
left-padded row (the runtime's batches) is shifted by its padding length; RoPE makes q·k depend
only on the difference of positions, so every attention score of a valid token is the same
function of the inputs (float rounding of the rotation aside), and padded keys get a -1e9 bias
(probability exactly 0 in float32).

Weights are written to the external data file as they are read (one tensor in flight), so the
builder's memory does not grow with the model. Weight-only int8/int4 use ONNX Runtime's own
block quantizer, the same one molmo_calibration's MatMulNBits path uses, so a fused and a
portable artifact of one precision hold the same quantized weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from molmo_export.config import MolmoTextConfig
from molmo_export.export.tensor_source import TensorSource
from molmo_runtime.errors import MolmoError
from molmo_runtime.graph_io import (
    GraphDims,
    decoder_spec,
    past_key_name,
    past_value_name,
    present_key_name,
    present_value_name,
)

FUSED_OPSET = 17  # ai.onnx; com.microsoft 1
PADDING_BIAS = -1e9  # additive bias of a padded key: exp underflows to exactly 0 in float32
ALIGN = 4096  # external data offsets page-aligned, so ONNX Runtime can map them
ROW_BLOCK_BYTES = 64 * 2**20  # float32 bytes of a weight converted / quantized at a time


@dataclass(frozen=True)
class WeightPrecision:
    """How the weight matmuls are stored. bits 0 = float32 MatMul; else MatMulNBits."""

    name: str
    bits: int = 0
    block_size: int = 0
    lm_head_bits: int = 0  # 0: same as the other weights
    accuracy_level: int = 0

    @property
    def head_bits(self) -> int:
        return self.lm_head_bits or self.bits


# Same block sizes and LM-head rule as molmo_calibration.recipes (int4: the head is 4-bit too;
# `lm_head_bits` can keep it wider, see docs/fused_decoder.md for what each costs).
# accuracy_level 4: activations are quantized to int8 per block inside MatMulNBits, so the
# inner product runs on int8 dot-product instructions (AVX-512 VNNI / AMX on the Intel and
# AVX-512 VNNI on the AMD Zen 4 machines here; AVX2 vpmaddubsw elsewhere). Decode is bound by
# reading the weights, and the int8 path reads them packed; level 1 (fp32 compute) unpacks to
# float first. Its error (8-bit activations per 32/128 block) is below the weights' own.
# Measured on an AVX2-only AMD EPYC (docs/fused_decoder.md): level 4 is 4.4-6.5x faster than
# level 1 for 4-bit weights, and level 1 has no fast 8-bit kernel at all (seconds per LM head).
PRECISIONS = {
    "fp32": WeightPrecision("fp32"),
    "int8": WeightPrecision("int8", bits=8, block_size=128, accuracy_level=4),
    "int4": WeightPrecision("int4", bits=4, block_size=32, accuracy_level=4),
}


def unsupported_reason(cfg: MolmoTextConfig) -> str | None:
    """Why the contrib ops cannot express this decoder exactly (None: they can)."""
    if cfg.is_moe:
        return "mixture-of-experts feed-forward (MolmoE) has no exact fused form here"
    if cfg.norm_after:
        return ("post-norm blocks (7B-O: x + norm(attn(x))) do not match "
                "SkipSimplifiedLayerNormalization's norm(x + y)")
    if cfg.qk_norm:
        return ("QK-norm over the full q/k widths (7B-O, MolmoE) is not GroupQueryAttention's "
                "per-head q/k norm")
    if cfg.head_dim % 2:
        return "odd head_dim: no rotate-half RoPE"
    return None


def rope_caches(head_dim: int, theta: float, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [positions, head_dim/2] float32, computed as model.layers.rope_cos_sin does."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    freqs = np.arange(positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def quantize_blockwise(w_out_in: np.ndarray, bits: int, block_size: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """W [N, K] (torch layout) -> MatMulNBits (B [N, k_blocks, blob], scales [N, k_blocks]),
    symmetric (default zero point), by ONNX Runtime's block quantizer."""
    from onnxruntime.capi import _pybind_state as ort_c

    n, k = w_out_in.shape
    k_blocks = -(-k // block_size)
    b_kn = np.ascontiguousarray(w_out_in.T, np.float32)  # MatMul's B: [K, N]
    if k_blocks * block_size != k:
        b_kn = np.pad(b_kn, ((0, k_blocks * block_size - k), (0, 0)))
    packed = np.zeros((n, k_blocks, block_size * bits // 8), np.uint8)
    scales = np.zeros((n, k_blocks), np.float32)
    zero_points = np.zeros((n, -(-k_blocks * bits // 8)), np.uint8)  # unused: symmetric
    quantize = {4: ort_c.quantize_matmul_4bits, 8: ort_c.quantize_matmul_8bits}[bits]
    quantize(packed, b_kn, scales, zero_points, block_size, n, k, True)
    return packed, scales


class _GraphWriter:
    """Nodes plus initializers whose data go straight to one external data file."""

    def __init__(self, data_path: Path) -> None:
        self.data_path = data_path
        self._data = open(data_path, "wb")
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()

    def weight(self, name: str, array: np.ndarray) -> str:
        """Add an initializer (a constant shared by several nodes is added once, by name)."""
        if name in self._names:
            return name
        array = np.ascontiguousarray(array)  # (a 0-d array becomes shape [1], as always here)
        return self.weight_in_blocks(name, array.shape, array.dtype, [array])

    def weight_in_blocks(self, name: str, shape: Sequence[int], dtype: np.dtype[Any],
                         blocks: Iterable[np.ndarray]) -> str:
        """An initializer given as consecutive slices along its first axis, written to the
        data file one slice at a time (small tensors inline)."""
        self._names.add(name)
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if size < 1024:
            whole = np.concatenate([np.asarray(x, dtype).ravel() for x in blocks]).reshape(shape)
            self.initializers.append(onnx.numpy_helper.from_array(whole, name))
            return name
        self._data.write(b"\0" * (-self._data.tell() % ALIGN))
        offset = self._data.tell()
        for block in blocks:
            self._data.write(np.ascontiguousarray(block, dtype).tobytes())
        if self._data.tell() - offset != size:
            raise AssertionError(f"{name}: wrote {self._data.tell() - offset} bytes for "
                                 f"{list(shape)} {np.dtype(dtype)}")
        t = TensorProto(name=name, dims=shape, data_location=TensorProto.EXTERNAL,
                        data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        for key, value in (("location", self.data_path.name), ("offset", str(offset)),
                           ("length", str(size))):
            t.external_data.add(key=key, value=value)
        self.initializers.append(t)
        return name

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], name: str,
             domain: str = "", **attrs: Any) -> list[str]:
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name,
                                           domain=domain, **attrs))
        return list(outputs)

    def close(self) -> None:
        self._data.close()


class _DecoderBuilder:
    def __init__(self, source: TensorSource, dims: GraphDims, precision: WeightPrecision,
                 g: _GraphWriter) -> None:
        self.src, self.dims, self.p, self.g = source, dims, precision, g
        self.cfg = source.config.text

    def linear(self, x: str, names: Sequence[str], out: str, bias: Sequence[str] = (),
               bits: int | None = None) -> str:
        """x @ concat(W_i).T (+ concat(b_i)): the listed weights [N_i, K] fused along N."""
        bits = self.p.bits if bits is None else bits
        b = np.concatenate([self.src.get(n) for n in bias], axis=0) if bias else None
        # Weights go out in row blocks, never as a second whole copy (the 7B LM head is 2.2 GB
        # in float32): MatMul's B = W.T by its rows; MatMulNBits by output rows, which the
        # quantizer treats one by one (the same bytes as quantizing W in one call). A big
        # weight that the source reads by rows is never held whole at all.
        n, k = self.src.shape(names[0])
        w: np.ndarray | None = None
        if bits and len(names) == 1 and 4 * n * k > ROW_BLOCK_BYTES and \
                self.src.rows(names[0], 0, 1) is not None:

            def read(r0: int, r1: int) -> np.ndarray:
                block = self.src.rows(names[0], r0, r1)
                assert block is not None
                return block
        else:
            parts = [self.src.get(n) for n in names]
            w = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)  # [N, K]
            del parts
            n, k = w.shape

            def read(r0: int, r1: int) -> np.ndarray:
                assert w is not None
                return w[r0:r1]
        if bits == 0:
            assert w is not None
            rows = max(1, ROW_BLOCK_BYTES // (4 * n))
            weight = self.g.weight_in_blocks(f"{out}.weight", (k, n), np.dtype(np.float32),
                                             (w[:, r:r + rows].T for r in range(0, k, rows)))
            del w
            mm = self.g.node("MatMul", [x, weight], [f"{out}.mm"] if b is not None else [out],
                             name=out)[0]
            if b is None:
                return mm
            return self.g.node("Add", [mm, self.g.weight(f"{out}.bias", b)], [out],
                               name=f"{out}.bias")[0]
        block, rows = self.p.block_size, max(1, ROW_BLOCK_BYTES // (4 * k))
        scales: list[np.ndarray] = []

        def packed_rows() -> Iterable[np.ndarray]:
            for r in range(0, n, rows):
                packed, row_scales = quantize_blockwise(read(r, min(r + rows, n)), bits, block)
                scales.append(row_scales)
                yield packed

        qweight = self.g.weight_in_blocks(f"{out}.qweight", (n, -(-k // block), block * bits // 8),
                                          np.dtype(np.uint8), packed_rows())
        inputs = [x, qweight, self.g.weight(f"{out}.scales", np.concatenate(scales))]
        if b is not None:
            inputs += ["", "", self.g.weight(f"{out}.bias", b)]  # zero_points, g_idx: absent
        attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
        if self.p.accuracy_level:
            attrs["accuracy_level"] = self.p.accuracy_level
        return self.g.node("MatMulNBits", inputs, [out], name=out, domain="com.microsoft",
                           **attrs)[0]

    def shared_inputs(self) -> tuple[str, str, str, str, str]:
        """seqlens_k [B] int32, total_sequence_length scalar int32, padding bias
        [B, 1, 1, total], cos and sin caches."""
        g = self.g
        g.node("Shape", ["attention_mask"], ["total64"], name="total", start=1, end=2)
        g.node("Shape", ["inputs_embeds"], ["batch64"], name="batch", start=0, end=1)
        g.node("Cast", ["total64"], ["total32"], name="total.i32", to=TensorProto.INT32)
        g.node("Squeeze", ["total32"], ["total_sequence_length"], name="total.scalar")
        one = g.weight("one.i32", np.array([1], np.int32))
        g.node("Sub", ["total32", one], ["last32"], name="seqlens.last")
        g.node("Expand", ["last32", "batch64"], ["seqlens_k"], name="seqlens_k")
        g.node("Cast", ["attention_mask"], ["mask.f"], name="mask.float", to=TensorProto.FLOAT)
        # (mask - 1) * 1e9: 0 for valid keys, -1e9 for padding
        g.node("Sub", ["mask.f", g.weight("one.f", np.array(1, np.float32))], ["mask.m1"],
               name="mask.minus1")
        g.node("Mul", ["mask.m1", g.weight("pad.bias", np.array(-PADDING_BIAS, np.float32))],
               ["mask.bias"], name="mask.bias")
        g.node("Unsqueeze", ["mask.bias", g.weight("axes12", np.array([1, 2], np.int64))],
               ["mask.bias4"], name="mask.bias4")
        # GroupQueryAttention wants it [B, 1, seq, total] (no broadcast along seq)
        g.node("Shape", ["inputs_embeds"], ["seq64"], name="seq", start=1, end=2)
        g.node("Concat", ["batch64", g.weight("one.i64", np.array([1], np.int64)), "seq64",
                          "total64"], ["bias.shape"], name="bias.shape", axis=0)
        g.node("Expand", ["mask.bias4", "bias.shape"], ["attention_bias"], name="attention_bias")
        cos, sin = rope_caches(self.cfg.head_dim, self.cfg.rope_theta, self.dims.max_seq_len)
        return ("seqlens_k", "total_sequence_length", "attention_bias",
                g.weight("cos_cache", cos), g.weight("sin_cache", sin))

    def build(self) -> None:
        c, g = self.cfg, self.g
        seqlens, total, bias, cos, sin = self.shared_inputs()
        eps = float(c.layer_norm_eps)
        base = "language_model.model.layers.{}."
        hidden = None  # sub-layer output waiting to be added to the residual
        residual = "inputs_embeds"
        for i in range(c.num_layers):
            p = base.format(i)
            norm_w = g.weight(f"l{i}.attn_norm", self.src.get(p + "attn_norm.weight"))
            if hidden is None:
                normed = g.node("SimplifiedLayerNormalization", [residual, norm_w],
                                [f"l{i}.attn_in"], name=f"l{i}.attn_norm", axis=-1,
                                epsilon=eps)[0]
            else:
                normed, residual = self._skip_norm(hidden, residual, norm_w, f"l{i}.attn", eps)
            qkv = self.linear(normed, [p + f"attn.w{x}.weight" for x in "qkv"], f"l{i}.qkv",
                              bias=[p + f"attn.w{x}.bias" for x in "qkv"] if c.qkv_bias else ())
            attn = g.node(
                "GroupQueryAttention",
                [qkv, "", "", past_key_name(i), past_value_name(i), seqlens, total, cos, sin,
                 "", bias],
                [f"l{i}.attn_out", present_key_name(i), present_value_name(i)],
                name=f"l{i}.gqa", domain="com.microsoft", num_heads=c.num_heads,
                kv_num_heads=c.num_kv_heads, do_rotary=1, rotary_interleaved=0)[0]
            hidden = self.linear(attn, [p + "attn.wo.weight"], f"l{i}.o")
            mlp_w = g.weight(f"l{i}.mlp_norm", self.src.get(p + "mlp_norm.weight"))
            normed, residual = self._skip_norm(hidden, residual, mlp_w, f"l{i}.mlp", eps)
            # two matmuls, not one of twice the width: a gate|up MatMulNBits took 1.5x the
            # time of the two (ONNX Runtime's profiler, AMD EPYC Zen 4, docs/fused_decoder.md)
            gate = self.linear(normed, [p + "mlp.gate.weight"], f"l{i}.gate")
            up = self.linear(normed, [p + "mlp.up.weight"], f"l{i}.up")
            act = g.node("QuickGelu", [gate], [f"l{i}.silu"], name=f"l{i}.silu",
                         domain="com.microsoft", alpha=1.0)[0]
            prod = g.node("Mul", [act, up], [f"l{i}.swiglu"], name=f"l{i}.swiglu")[0]
            hidden = self.linear(prod, [p + "mlp.down.weight"], f"l{i}.down")
        final_w = g.weight("final_norm", self.src.get("language_model.model.norm.weight"))
        assert hidden is not None
        normed, _ = self._skip_norm(hidden, residual, final_w, "final", eps)
        last = g.node("Slice", [normed, g.weight("last.start", np.array([-1], np.int64)),
                                g.weight("last.end", np.array([2**62], np.int64)),
                                g.weight("last.axis", np.array([1], np.int64))],
                      ["final.last"], name="final.last")[0]
        out = self.linear(last, ["language_model.lm_head.weight"], "logits",
                          bits=self.p.head_bits)
        assert out == "logits"

    def _skip_norm(self, x: str, residual: str, weight: str, name: str, eps: float
                   ) -> tuple[str, str]:
        """-> (RMSNorm(x + residual) * weight, x + residual)."""
        normed, _, _, total = self.g.node(
            "SkipSimplifiedLayerNormalization", [x, residual, weight],
            [f"{name}_in", "", "", f"{name}.residual"], name=f"{name}.norm",
            domain="com.microsoft", epsilon=eps)
        return normed, total


def build_fused_decoder(source: TensorSource, dims: GraphDims, precision: str | WeightPrecision,
                        path: str | os.PathLike[str]) -> Path:
    """Write the "ort" decoder to `path` (+ `path`.data). Raises MolmoError where the contrib
    ops cannot express the model (see unsupported_reason)."""
    prec = PRECISIONS[precision] if isinstance(precision, str) else precision
    reason = unsupported_reason(source.config.text)
    if reason:
        raise MolmoError(f"no fused ONNX Runtime decoder for {source.config.name}: {reason}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    g = _GraphWriter(path.with_name(path.name + ".data"))
    try:
        _DecoderBuilder(source, dims, prec, g).build()
    finally:
        g.close()
    spec = decoder_spec(dims, "ort")
    graph = helper.make_graph(
        g.nodes, "molmo_decoder_ort",
        [helper.make_tensor_value_info(t.name, helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)),
                                       list(t.dims)) for t in spec.inputs],
        [helper.make_tensor_value_info(t.name, helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)),
                                       list(t.dims)) for t in spec.outputs],
        initializer=g.initializers)
    model = helper.make_model(graph, producer_name="molmo-export", opset_imports=[
        helper.make_opsetid("", FUSED_OPSET), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))
    return path
