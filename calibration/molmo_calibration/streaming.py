"""Writing (and weight-only quantizing) an ONNX graph one initializer at a time.

    write_graph(template, dest, read=..., dtype="fp32" | "fp16", nbits=NBits(4, 32, 8, V))

`template` is a ModelProto whose initializers may live anywhere: inline, in external data files
beside `base_dir`, or behind a location that `read` resolves (the streaming exporter's
checkpoint references). Each initializer is read, converted or quantized, appended to
`<dest>.data` and dropped before the next one is read, so peak memory is about one tensor (a few
copies of it) plus the graph proto, however large the graph is.

nbits: every MatMul with a constant B becomes MatMulNBits exactly as ort_quant.quantize_nbits
makes it, because it is made by the same code: ONNX Runtime's MatMulNBitsQuantizer, run on a
one-node model holding just that MatMul and its weight (the quantizer handles nodes one by one,
so the result is the same node and the same bytes as quantizing the whole graph).
fp16: the float weights stored outside the proto (the large ones) are stored as float16 and a
Cast to float32 follows each one, so graph I/O and compute stay float32 (the weights' disk size
halves; ORT folds the Casts at load). Small constants (norm weights, rotary tables) stay float32.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from molmo_calibration.graph_tools import (
    ensure_node_names,
    lm_head_nodes,
    onnx_module,
    quantization_module,
)
from molmo_calibration.ort_quant import NBITS_ACCURACY_LEVEL
from molmo_runtime.errors import ArtifactError
from molmo_runtime.fileio import atomic_path

Reader = Callable[[str], "np.ndarray | None"]  # external location -> array (None: not mine)
INLINE_BYTES = 1024  # smaller tensors stay inside the .onnx file (onnx's own default)
DTYPES = ("fp32", "fp16")


@dataclass(frozen=True)
class NBits:
    """Weight-only MatMulNBits settings (recipes: ort-int8 / ort-int4 decoders)."""

    bits: int
    block_size: int
    lm_head_bits: int | None  # the vocabulary projection's own width, where it differs
    vocab_rows: int


def _external_location(tensor: Any) -> dict[str, str] | None:
    onnx = onnx_module()
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def read_initializer(tensor: Any, base_dir: Path | None, read: Reader | None) -> np.ndarray:
    """The array behind one initializer, wherever its bytes are."""
    onnx = onnx_module()
    ext = _external_location(tensor)
    if ext is None:
        return onnx.numpy_helper.to_array(tensor)
    location = ext["location"]
    if read is not None:
        array = read(location)
        if array is not None:
            return array
    if base_dir is None:
        raise ArtifactError(f"initializer {tensor.name}: external data {location!r} and no "
                            "folder to read it from")
    path = (base_dir / location).resolve()
    if base_dir.resolve() not in path.parents:
        raise ArtifactError(f"initializer {tensor.name}: external data {location!r} is outside "
                            f"{base_dir}")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    with open(path, "rb") as f:
        f.seek(int(ext.get("offset", 0)))
        array = np.fromfile(f, dtype=dtype, count=count)
    if array.size != count:
        raise ArtifactError(f"{path}: truncated external data for {tensor.name}")
    return array.reshape(tuple(tensor.dims))


class _DataFile:
    """Appends tensors to one external data file and points TensorProtos at them."""

    def __init__(self, f: Any, location: str) -> None:
        self.f, self.location, self.offset = f, location, 0

    def tensor(self, name: str, array: np.ndarray) -> Any:
        onnx = onnx_module()
        array = np.require(array, requirements="C")  # (ascontiguousarray makes 0-d 1-d)
        if array.nbytes < INLINE_BYTES:
            return onnx.numpy_helper.from_array(array, name)
        proto = onnx.TensorProto(name=name, dims=array.shape,
                                 data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
        self.f.write(memoryview(array.reshape(-1).view(np.uint8)))
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)),
                           ("length", str(array.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self.offset += array.nbytes
        return proto

    def proto(self, tensor: Any) -> Any:
        """A TensorProto made elsewhere (a quantizer's output), moved into the file if large."""
        onnx = onnx_module()
        if _external_location(tensor) is None and len(tensor.raw_data) < INLINE_BYTES:
            return tensor
        return self.tensor(tensor.name, onnx.numpy_helper.to_array(tensor))


def _value_infos(graph: Any) -> dict[str, Any]:
    return {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}


def _quantize_one(template: Any, node: Any, weight: Any, bits: int, block_size: int,
                  infos: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """ORT's MatMulNBitsQuantizer on a model of just `node` and its weight initializer."""
    onnx = onnx_module()
    quantization_module()
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    def info(name: str) -> Any:
        return infos.get(name) or onnx.helper.make_tensor_value_info(name, 0, None)

    graph = onnx.helper.make_graph([node], "one_matmul", [info(node.input[0])],
                                   [info(node.output[0])], initializer=[weight])
    model = onnx.helper.make_model(graph, opset_imports=list(template.opset_import),
                                   ir_version=template.ir_version)
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                             accuracy_level=NBITS_ACCURACY_LEVEL)
    q.process()
    out = q.model.model.graph
    return list(out.node), list(out.initializer)


def write_graph(template: Any, dest: str | os.PathLike[str], *, base_dir: Path | None = None,
                read: Reader | None = None, dtype: str = "fp32", nbits: NBits | None = None
                ) -> Path:
    """Write `template` to `dest` (+ `dest`.data), one initializer at a time; see the module
    docstring. `template` is modified (its initializers and nodes are replaced)."""
    onnx = onnx_module()
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    dest = Path(dest)
    graph = ensure_node_names(template).graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    to_quantize: dict[str, Any] = {}  # weight name -> its MatMul
    head: set[str] = set()
    if nbits is not None:
        head = set(lm_head_nodes(template, nbits.vocab_rows))
        for node in graph.node:
            if (node.op_type == "MatMul" and node.domain in ("", "ai.onnx")
                    and len(node.input) > 1 and node.input[1] in inits
                    and consumers[node.input[1]] == 1):
                to_quantize[node.input[1]] = node
    infos = _value_infos(graph)
    replaced: dict[str, list[Any]] = {}  # node name -> its replacement nodes
    casts: list[Any] = []
    new_inits: list[Any] = []
    with atomic_path(dest.with_name(dest.name + ".data")) as tmp_data, open(tmp_data, "wb") as f:
        data = _DataFile(f, dest.name + ".data")
        for name, tensor in inits.items():
            external = _external_location(tensor) is not None  # a weight, not a small constant
            array = read_initializer(tensor, base_dir, read)
            node = to_quantize.get(name)
            if node is not None and array.ndim == 2 and array.dtype == np.float32:
                bits = nbits.lm_head_bits if node.name in head and nbits.lm_head_bits \
                    else nbits.bits  # type: ignore[union-attr]
                weight = onnx.numpy_helper.from_array(array, name)
                del array
                nodes, made = _quantize_one(template, node, weight, bits,
                                            nbits.block_size, infos)  # type: ignore[union-attr]
                del weight
                replaced[node.name] = nodes
                new_inits.extend(data.proto(t) for t in made)
                continue
            if dtype == "fp16" and array.dtype == np.float32 and external:
                new_inits.append(data.tensor(name + "_fp16", array.astype(np.float16)))
                casts.append(onnx.helper.make_node("Cast", [name + "_fp16"], [name],
                                                   name=f"Cast_{name}_to_fp32",
                                                   to=onnx.TensorProto.FLOAT))
            else:
                new_inits.append(data.tensor(name, array))
            del array
        f.flush()
        nodes = [*casts]
        for node in graph.node:
            nodes.extend(replaced.get(node.name, [node]))
        graph.ClearField("initializer")
        graph.initializer.extend(new_inits)
        graph.ClearField("node")
        graph.node.extend(nodes)
        if replaced and not any(o.domain == "com.microsoft" for o in template.opset_import):
            template.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        with atomic_path(dest) as tmp:
            tmp.write_bytes(template.SerializeToString())
    if data.offset == 0:
        dest.with_name(dest.name + ".data").unlink()
    return dest
