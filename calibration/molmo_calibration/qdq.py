"""QDQ graphs for TensorRT's explicit quantization, by onnxruntime.quantization.quantize_static.

TensorRT wants symmetric int8 (zero point 0), per-channel weights on the output-channel axis, and
no com.microsoft ops. Only the weight MatMuls/Gemms are quantized (op_types_to_quantize +
MatMulConstBOnly): LayerNorm, softmax and the attention matmuls around it, and the residual adds
keep float inputs and outputs. Biases stay float (TensorRT fuses them; int32 bias DQ is not a
TensorRT input).

    qdq-int8              W8A8: static activation ranges from the calibration samples (MinMax)
    qdq-int8-weight-only  the same per-channel int8 weights, with the activation Q/DQ pairs
                          removed again, so only DequantizeLinear(int8 weight) -> MatMul remains
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from molmo_calibration.graph_tools import (
    ensure_node_names,
    needs_external_data,
    onnx_module,
    quantization_module,
    save_model,
    weight_matmuls,
)


def make_reader(feeds: Sequence[dict[str, np.ndarray]]) -> Any:
    """A CalibrationDataReader over prepared input dicts (one graph run each)."""
    q = quantization_module()

    class _ListReader(q.CalibrationDataReader):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            self._it: Iterable[dict[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)  # type: ignore[call-overload, no-any-return]

        def rewind(self) -> None:
            self._it = iter(feeds)

    return _ListReader()


def quantize_qdq_int8(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                      feeds: Sequence[dict[str, np.ndarray]]) -> None:
    """Static W8A8 QDQ of the weight matmuls, calibrated on `feeds`."""
    if not feeds:
        raise ValueError("static QDQ quantization needs at least one calibration input")
    q = quantization_module()
    onnx = onnx_module()
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    external = needs_external_data(src)
    with tempfile.TemporaryDirectory(prefix="molmo-qdq-") as tmp:
        # quantize_static selects nodes by name: name every node first (a copy, src is kept).
        named = Path(tmp) / "named.onnx"
        model = ensure_node_names(onnx.load(str(src)))
        # Only the matmuls with constant weights: QDQ mode ignores MatMulConstBOnly, so the
        # attention matmuls (and with them softmax) are kept float by naming the others.
        weights = [n.name for n in weight_matmuls(model)]
        save_model(model, named, external)
        del model
        q.quantize_static(str(named), str(dst), make_reader(feeds), nodes_to_quantize=weights,
                          use_external_data_format=external, **qdq_int8_options())


def qdq_int8_options() -> dict[str, Any]:
    """quantize_static's settings for TensorRT's int8 QDQ graphs (the module docstring): one
    source for the whole-graph path and the streaming one (molmo_calibration.streaming)."""
    q = quantization_module()
    return dict(
        quant_format=q.QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True,
        activation_type=q.QuantType.QInt8,
        weight_type=q.QuantType.QInt8,
        calibrate_method=q.CalibrationMethod.MinMax,
        extra_options={
            "ActivationSymmetric": True,  # TensorRT: zero point 0
            "WeightSymmetric": True,
            "MatMulConstBOnly": True,
            "QuantizeBias": False,
            "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
            "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # B [K, N]: per column
        })


def strip_activation_qdq(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> int:
    """Weight-only variant of a QDQ graph: drop every Q->DQ pair on an activation (the weight
    DequantizeLinear nodes on int8 initializers stay). Returns the number of pairs removed."""
    onnx = onnx_module()
    src = Path(src)
    external = needs_external_data(src)
    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    drop: set[int] = set()
    pairs = 0
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        dqs = consumers.get(node.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs) or \
                any(d.output[0] in outputs for d in dqs):
            continue
        drop.add(id(node))
        pairs += 1
        for d in dqs:
            drop.add(id(d))
            rename[d.output[0]] = node.input[0]
    kept = [n for n in graph.node if id(n) not in drop]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for n in kept for name in n.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:  # the activation scales / zero points of the removed pairs
        graph.initializer.remove(t)
    save_model(model, dst, external)
    return pairs
