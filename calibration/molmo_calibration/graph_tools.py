"""Small read-only questions about ONNX graphs, and saving them (external data when large)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from molmo_runtime.errors import require

# Above this a graph is saved with its weights in "<file>.data" (protobuf's 2 GiB limit).
EXTERNAL_DATA_BYTES = 1 << 30
WEIGHT_OPS = ("MatMul", "Gemm")


def onnx_module() -> Any:
    return require("onnx", "quant", "quantization")


class _DropPreprocessAdvice(logging.Filter):
    """onnxruntime.quantization logs "Please consider to run pre-processing before
    quantization" on the root logger for every graph. We quantize the exported graphs as they
    are on purpose (the quality report measures exactly those), so the line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


_ADVICE_FILTER = _DropPreprocessAdvice()


def quantization_module() -> Any:
    """onnxruntime.quantization (the quant extra), with its pre-processing advice silenced."""
    module = require("onnxruntime.quantization", "quant", "quantization")
    logging.getLogger().addFilter(_ADVICE_FILTER)  # a no-op when already added
    return module


def model_bytes(path: str | os.PathLike[str]) -> int:
    """Size of a graph file plus its external data files (beside it)."""
    onnx = onnx_module()
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for t in model.graph.initializer for entry in t.external_data
                 if entry.key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def needs_external_data(path: str | os.PathLike[str]) -> bool:
    return model_bytes(path) > EXTERNAL_DATA_BYTES


def save_model(model: Any, path: str | os.PathLike[str], external: bool) -> None:
    onnx = onnx_module()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=path.name + ".data",
                        size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def initializer_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def weight_matmuls(model: Any) -> list[Any]:
    """MatMul / Gemm nodes whose second input is a constant (the layers with weights)."""
    inits = initializer_shapes(model)
    return [n for n in model.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1
            and n.input[1] in inits]


def lm_head_nodes(model: Any, vocab_rows: int) -> list[str]:
    """Names of the weight matmuls that produce vocabulary logits ([D, vocab] weights)."""
    inits = initializer_shapes(model)
    out = []
    for n in weight_matmuls(model):
        shape = inits[n.input[1]]
        trans_b = any(a.name == "transB" and a.i for a in n.attribute)
        if len(shape) == 2 and shape[0 if trans_b else 1] == vocab_rows:
            out.append(n.name)
    return out


def op_histogram(model: Any) -> dict[str, int]:
    return dict(Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}"
                        for n in model.graph.node))


def ensure_node_names(model: Any) -> Any:
    """Quantizers select nodes by name: give unnamed nodes a stable one."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return model
