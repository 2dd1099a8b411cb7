"""SmoothQuant (Xiao et al., 2023) as an ONNX graph transform, before static W8A8 QDQ.

LLM activations have a few channels with huge magnitudes; per-tensor int8 activations then waste
their range on them. SmoothQuant moves that difficulty into the weights, exactly:

    X W = (X diag(1/s)) (diag(s) W),   s_j = max|X_j|^alpha / max|W_j,:|^(1 - alpha)

For every activation that feeds weight matmuls (q/k/v share one, gate/up share one), this inserts
one Mul by 1/s on the activation and scales the rows of each consumer's weight by s. The
per-channel maxima come from running the fp32 graph on the calibration inputs. QDQ insertion
itself is left to onnxruntime.quantization (qdq.quantize_qdq_int8) afterwards.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from molmo_calibration.graph_tools import (
    ensure_node_names,
    needs_external_data,
    onnx_module,
    save_model,
    weight_matmuls,
)
from molmo_runtime.errors import require

DEFAULT_ALPHA = 0.5
_MIN_SCALE = 1e-5


def _smoothable_groups(model: Any) -> dict[str, list[Any]]:
    """activation tensor -> the MatMul nodes (constant 2-D B) that read it as their A input.
    Only activations whose every consumer is such a matmul (so the Mul changes nothing else)."""
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    groups: dict[str, list[Any]] = {}
    for n in weight_matmuls(model):
        if n.op_type != "MatMul" or len(inits[n.input[1]].dims) != 2:
            continue
        groups.setdefault(n.input[0], []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    return {x: nodes for x, nodes in groups.items()
            if x not in graph_outputs and len(consumers[x]) == len(nodes)}


def _activation_absmax(model: Any, names: list[str], feeds: Sequence[dict[str, np.ndarray]],
                       external: bool) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of each named tensor over all calibration inputs."""
    onnx = onnx_module()
    ort = require("onnxruntime", "quant", "quantization")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None))
    absmax: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="molmo-smoothquant-") as tmp:
        path = Path(tmp) / "probe.onnx"
        save_model(probe, path, external)
        del probe
        sess = ort.InferenceSession(str(path),  # type: ignore[attr-defined]
                                    providers=["CPUExecutionProvider"])
        for feed in feeds:
            for name, value in zip(names, sess.run(names, feed)):
                m = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
                absmax[name] = m if name not in absmax else np.maximum(absmax[name], m)
    return absmax


def smooth_model(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                 feeds: Sequence[dict[str, np.ndarray]], alpha: float = DEFAULT_ALPHA) -> int:
    """Write the smoothed (mathematically equivalent) fp32 graph; returns activations smoothed."""
    onnx = onnx_module()
    from onnx import numpy_helper

    src = Path(src)
    external = needs_external_data(src)
    model = ensure_node_names(onnx.load(str(src)))
    groups = _smoothable_groups(model)
    absmax = _activation_absmax(model, sorted(groups), feeds, external)
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    new_nodes: dict[str, Any] = {}  # smoothed tensor name -> the Mul node that makes it
    for x, nodes in groups.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in nodes]
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)  # [K]
        s = np.power(np.maximum(absmax[x], _MIN_SCALE), alpha) / \
            np.power(np.maximum(w_max, _MIN_SCALE), 1.0 - alpha)
        s = np.clip(s, _MIN_SCALE, None).astype(np.float32)
        inv = model.graph.initializer.add()
        inv.CopyFrom(numpy_helper.from_array((1.0 / s).astype(np.float32), f"{x}_smooth_inv"))
        smoothed = f"{x}_smoothed"
        new_nodes[smoothed] = onnx.helper.make_node("Mul", [x, inv.name], [smoothed],
                                                    name=f"SmoothQuant_{len(new_nodes)}")
        for n, w in zip(nodes, weights):
            scaled = numpy_helper.from_array((w * s[:, None]).astype(np.float32),
                                             n.input[1] if uses[n.input[1]] == 1
                                             else f"{n.input[1]}_smoothed_{n.name}")
            if uses[n.input[1]] == 1:
                inits[n.input[1]].CopyFrom(scaled)
            else:  # a weight shared with another node keeps its original values there
                model.graph.initializer.add().CopyFrom(scaled)
                n.input[1] = scaled.name
            n.input[0] = smoothed
    # keep the node list topologically sorted: each Mul right before its first consumer
    ordered: list[Any] = []
    placed: set[str] = set()
    for n in model.graph.node:
        for i in n.input:
            if i in new_nodes and i not in placed:
                ordered.append(new_nodes[i])
                placed.add(i)
        ordered.append(n)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    save_model(model, dst, external)
    return len(groups)
