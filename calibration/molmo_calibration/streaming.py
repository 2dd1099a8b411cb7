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
blocks: a weight that `blocks` can read in row blocks (RowBlocks: the LM head and embeddings,
5 GB each in fp32 at 72B) is never held whole: it is converted or quantized one block of its
source's rows at a time and written to its place in the data file, so the peak is a few copies of
one block (plus, when quantized, the per-block scales, 1/8 of the int8 output).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
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


@dataclass(frozen=True)
class RowBlocks:
    """A large 2-D weight whose source [rows, cols] can be read a few rows at a time. The
    initializer is the source itself or, `transposed`, source.T ([cols, rows]: a Linear weight
    [out, in] used as MatMul's B [in, out])."""

    rows: int
    cols: int
    transposed: bool
    read: Callable[[int, int], np.ndarray]  # source rows [r0, r1) as float32 [r1 - r0, cols]
    block_rows: int

    def spans(self) -> list[tuple[int, int]]:
        return [(r, min(r + self.block_rows, self.rows))
                for r in range(0, self.rows, self.block_rows)]


Blocks = Callable[[str], "RowBlocks | None"]  # external location -> row blocks (None: read whole)


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
        self.f.write(memoryview(array.reshape(-1).view(np.uint8)))
        return self._external(name, array.shape, array.dtype)

    def chunks(self, name: str, shape: tuple[int, ...], dtype: Any,
               parts: Iterable[np.ndarray]) -> Any:
        """One tensor written as consecutive parts (its leading axis cut in pieces)."""
        for part in parts:
            self.f.write(memoryview(np.require(part, dtype, "C").reshape(-1).view(np.uint8)))
        return self._external(name, shape, np.dtype(dtype))

    def rows(self, name: str, rb: RowBlocks, dtype: Any) -> Any:
        """The RowBlocks weight as `dtype`, one block of rows in memory at a time."""
        if not rb.transposed:
            return self.chunks(name, (rb.rows, rb.cols), dtype,
                               (rb.read(r0, r1) for r0, r1 in rb.spans()))
        return self._transposed_rows(name, rb, dtype)

    def _transposed_rows(self, name: str, rb: RowBlocks, dtype: Any) -> Any:
        """source.T ([cols, rows]) from row blocks of the source: each block is columns
        [r0, r1) of the output, written row by row into place (positional writes)."""
        itemsize = np.dtype(dtype).itemsize
        self.f.flush()
        fd, base = self.f.fileno(), self.offset
        for r0, r1 in rb.spans():
            block = np.ascontiguousarray(rb.read(r0, r1).astype(dtype, copy=False).T)
            for k in range(rb.cols):
                os.pwrite(fd, memoryview(block[k].view(np.uint8)),
                          base + (k * rb.rows + r0) * itemsize)
            del block
        self.f.seek(base + rb.rows * rb.cols * itemsize)
        return self._external(name, (rb.cols, rb.rows), np.dtype(dtype))

    def _external(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """The TensorProto of the `shape` tensor that ends at the file's current end."""
        onnx = onnx_module()
        nbytes = int(np.prod(shape)) * dtype.itemsize
        proto = onnx.TensorProto(name=name, dims=shape,
                                 data_type=onnx.helper.np_dtype_to_tensor_dtype(dtype))
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)),
                           ("length", str(nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self.offset += nbytes
        return proto

    def proto(self, tensor: Any) -> Any:
        """A TensorProto made elsewhere (a quantizer's output), moved into the file if large."""
        onnx = onnx_module()
        if _external_location(tensor) is None and len(tensor.raw_data) < INLINE_BYTES:
            return tensor
        return self.tensor(tensor.name, onnx.numpy_helper.to_array(tensor))


def _cast_to_fp32(name: str) -> Any:
    """fp16 storage: `name` is computed from the stored `name`_fp16."""
    onnx = onnx_module()
    return onnx.helper.make_node("Cast", [name + "_fp16"], [name], name=f"Cast_{name}_to_fp32",
                                 to=onnx.TensorProto.FLOAT)


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
    return _detached(out.node), _detached(out.initializer)


def _detached(messages: Iterable[Any]) -> list[Any]:
    """Copies of protobuf messages that do not keep their parent alive. With protobuf's upb
    backend a sub-message shares its whole model's arena: one node kept from the quantizer's
    model would pin that model, float32 weight included, until the export ends (at 7B: +7 GB
    over the decoder's 196 MatMuls)."""
    copies = []
    for m in messages:
        copy = type(m)()
        copy.CopyFrom(m)
        copies.append(copy)
    return copies


def _quantize_rows(template: Any, node: Any, name: str, rb: RowBlocks, bits: int,
                   block_size: int, infos: dict[str, Any], data: _DataFile
                   ) -> tuple[list[Any], list[Any]]:
    """_quantize_one on a transposed RowBlocks weight (B = source.T, [K, N]), one block of N
    at a time. MatMulNBits quantizes each output column (N) on its own, and every tensor it
    makes is column-major (packed [N, k_blocks, blob], scales and zero points N * ...), so the
    blocks' results concatenated on their leading axis are the whole weight's. The packed
    weight is written as it is made; the smaller tensors are held until the end."""
    onnx = onnx_module()
    first: tuple[list[Any], list[Any]] | None = None
    held: dict[str, list[np.ndarray]] = {}
    packed: str | None = None
    for r0, r1 in rb.spans():
        weight = onnx.numpy_helper.from_array(np.ascontiguousarray(rb.read(r0, r1).T), name)
        nodes, made = _quantize_one(template, node, weight, bits, block_size, infos)
        del weight
        if first is None:
            first = nodes, made
            packed = max(made, key=lambda t: len(t.raw_data)).name
            start = data.offset  # the packed weight's parts follow one another from here
        for t in made:
            array = onnx.numpy_helper.to_array(t)
            if array.shape[0] % (r1 - r0):
                raise AssertionError(f"{t.name}: leading axis {array.shape[0]} is not per column")
            if t.name == packed:
                data.f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
            else:
                held.setdefault(t.name, []).append(array)
    assert first is not None and packed is not None and data.offset == start
    nodes, made = first
    for n in nodes:  # the first block's node, made for its N columns: now for all of them
        for a in n.attribute:
            if a.name == "N":
                a.i = rb.rows
    first_columns = rb.spans()[0][1]
    out = []
    for t in sorted(made, key=lambda t: t.name != packed):  # the packed parts come first
        shape = (t.dims[0] // first_columns * rb.rows, *t.dims[1:])
        if t.name == packed:
            out.append(data._external(t.name, shape,
                                      onnx.helper.tensor_dtype_to_np_dtype(t.data_type)))
        else:
            parts = held.pop(t.name)
            out.append(data.chunks(t.name, shape, parts[0].dtype, parts)
                       if sum(p.nbytes for p in parts) >= INLINE_BYTES else
                       onnx.numpy_helper.from_array(np.concatenate(parts), t.name))
    return nodes, out


def _qdq_weight_only_one(template: Any, node: Any, weight: Any) -> tuple[list[Any], list[Any]]:
    """qdq.quantize_qdq_int8 + strip_activation_qdq (the trt-int8 "qdq-int8-weight-only"
    decoder) on a model of just `node` and its weight: per-channel symmetric int8 weights do not
    depend on the activations, so one feed of zeros stands in for the calibration data whose
    activation Q/DQ pair is removed again."""
    import tempfile

    from molmo_calibration.qdq import quantize_qdq_int8, strip_activation_qdq

    onnx = onnx_module()
    k = weight.dims[0]  # x [1, K]: MatMul broadcasts over the leading axes the graph has
    graph = onnx.helper.make_graph(
        [node], "one_matmul",
        [onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, [1, k])],
        [onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
        initializer=[weight])
    model = onnx.helper.make_model(graph, opset_imports=list(template.opset_import),
                                   ir_version=template.ir_version)
    with tempfile.TemporaryDirectory(prefix="molmo-qdq-one-") as tmp:
        one, w8a8, out = (Path(tmp) / f for f in ("one.onnx", "w8a8.onnx", "out.onnx"))
        onnx.save_model(model, str(one))
        del model, graph
        quantize_qdq_int8(one, w8a8, [{node.input[0]: np.zeros((1, k), np.float32)}])
        strip_activation_qdq(w8a8, out)
        made = onnx.load(str(out)).graph
        return _detached(made.node), _detached(made.initializer)


def write_graph(template: Any, dest: str | os.PathLike[str], *, base_dir: Path | None = None,
                read: Reader | None = None, dtype: str = "fp32", nbits: NBits | None = None,
                qdq_weight_only: bool = False, blocks: Blocks | None = None) -> Path:
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
    if nbits is not None and qdq_weight_only:
        raise ValueError("nbits and qdq_weight_only are two ways to quantize: choose one")
    if nbits is not None:
        head = set(lm_head_nodes(template, nbits.vocab_rows))
    if nbits is not None or qdq_weight_only:
        for node in graph.node:
            if (node.op_type == "MatMul" and node.domain in ("", "ai.onnx")
                    and len(node.input) > 1 and node.input[1] in inits):
                if consumers[node.input[1]] == 1:
                    to_quantize[node.input[1]] = node
                elif qdq_weight_only:  # quantize_static would quantize it (one DQ, all users)
                    raise ArtifactError(
                        f"{node.name}: its weight {node.input[1]} has {consumers[node.input[1]]} "
                        "users; the streaming QDQ writer quantizes single-use weights only "
                        "(none of Molmo's graphs shares one)")
    infos = _value_infos(graph)
    replaced: dict[str, list[Any]] = {}  # node name -> its replacement nodes
    casts: list[Any] = []
    new_inits: list[Any] = []
    with atomic_path(dest.with_name(dest.name + ".data")) as tmp_data, open(tmp_data, "wb") as f:
        data = _DataFile(f, dest.name + ".data")
        for name, tensor in inits.items():
            ext = _external_location(tensor)  # a weight, not a small constant
            node = to_quantize.get(name)
            bits = 0
            if node is not None and nbits is not None:
                bits = nbits.lm_head_bits if node.name in head and nbits.lm_head_bits \
                    else nbits.bits
            rb = blocks(ext["location"]) if blocks is not None and ext is not None else None
            if rb is not None and (node is None or (rb.transposed and nbits is not None)):
                if node is not None:
                    replaced[node.name], made = _quantize_rows(
                        template, node, name, rb, bits, nbits.block_size,  # type: ignore[union-attr]
                        infos, data)
                    new_inits.extend(made)
                elif dtype == "fp16":
                    new_inits.append(data.rows(name + "_fp16", rb, np.float16))
                    casts.append(_cast_to_fp32(name))
                else:
                    new_inits.append(data.rows(name, rb, np.float32))
                continue
            array = read_initializer(tensor, base_dir, read)
            if node is not None and array.ndim == 2 and array.dtype == np.float32:
                weight = onnx.numpy_helper.from_array(array, name)
                del array
                if qdq_weight_only:
                    nodes, made = _qdq_weight_only_one(template, node, weight)
                else:
                    nodes, made = _quantize_one(template, node, weight, bits,
                                                nbits.block_size,  # type: ignore[union-attr]
                                                infos)
                del weight
                replaced[node.name] = nodes
                new_inits.extend(data.proto(t) for t in made)
                continue
            if dtype == "fp16" and array.dtype == np.float32 and ext is not None:
                new_inits.append(data.tensor(name + "_fp16", array.astype(np.float16)))
                casts.append(_cast_to_fp32(name))
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
