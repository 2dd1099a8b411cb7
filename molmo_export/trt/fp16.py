"""fp32 ONNX -> fp16 ONNX with fp32 islands, for TensorRT's strongly typed networks. Torch-free.

Why a graph rewrite rather than builder flags: a strongly typed network (TensorRT 10+,
NetworkDefinitionCreationFlag.STRONGLY_TYPED) takes every tensor's precision from the ONNX types,
so the precision plan is data we can inspect and run in onnxruntime on any machine (tests do).
The weakly typed alternative (BuilderFlag.FP16 + per-layer OBEY_PRECISION_CONSTRAINTS) is
deprecated from TensorRT 10.12 and leaves the choice to the builder, invisible until a GPU runs
it. Precision is decided per node:

    fp16       everything else: MatMul/Gemm, elementwise, gathers, activations
    fp32       islands the numerics ask for (Qwen2 overflows in fp16 without them):
      norm      LayerNormalization/RMSNormalization ops, and decomposed norms: ReduceMean with
                the Pow/Mul(x, x) feeding it and the chain up to the node that rescales x
      softmax   Softmax and the score path feeding it back to its MatMul (Q.K^T accumulates
                and is masked in fp32)
      index     float maths computed only from integer inputs: the additive attention mask from
                attention_mask, RoPE angles/cos/sin from position_ids (position * inv_freq is
                far outside fp16 precision beyond a few hundred positions)
      rope      applying cos/sin: the Mul nodes taking cos/sin and the Add/Sub joining them
      residual  (option) residual-stream Adds that feed a norm
      qdq       Q/DQ nodes whose scales do not fit fp16, or in opset < 18 graphs (Q/DQ take
                float32 only before opset 19; an opset-18 graph with Q/DQ is raised to 19)

A Cast is inserted on every edge where producer and consumer precision differ; constants are
converted (values beyond fp16 range are clipped, and counted) or duplicated when both
precisions consume them. Graph inputs/outputs keep their types except those named in
`fp16_io` (the decoder's KV cache: it lives on the device and halves in size).

`convert_file_to_fp16` streams weights one tensor at a time into an external-data file, so a
7B decoder converts with one tensor in memory rather than the whole model.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
FLOAT_TYPES = (FLOAT, FLOAT16)
FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14

# Classes of tensors by what they are computed from.
CONST, INDEX, ACT = "const", "index", "act"

_NORM_OPS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
             "GroupNormalization", "InstanceNormalization"}
_SOFTMAX_OPS = {"Softmax", "LogSoftmax"}
_MATMUL_OPS = {"MatMul", "Gemm", "Einsum"}
# Ops a norm's statistics flow through between ReduceMean and the rescale of x.
_NORM_CHAIN_OPS = {"Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Pow", "Cast", "Max", "Clip"}
# Ops between the score MatMul and the Softmax (scale, mask, soft-capping, reshapes).
_SCORE_CHAIN_OPS = {"Add", "Sub", "Mul", "Div", "Where", "Cast", "Max", "Min", "Clip", "Tanh",
                    "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Identity", "Neg"}
# Ops whose inputs may be of any type: never insert a Cast in front of them.
_ANY_INPUT_OPS = {"Cast", "Shape", "Size"}
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
_QUANTIZE_OPS = {"QuantizeLinear", "DynamicQuantizeLinear"}
_CHAIN_DEPTH = 8
_INLINE_FOR_INFERENCE = 4096  # elements


def _numel(t: TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


@dataclass(frozen=True)
class Fp16Policy:
    fp16_io: frozenset[str] = frozenset()  # graph inputs/outputs that become float16
    keep_norms: bool = True
    keep_softmax: bool = True
    keep_index_maths: bool = True
    keep_rope: bool = True
    fp32_residual: bool = False


def kv_cache_policy(io_names: Iterable[str], fp32_residual: bool = True) -> Fp16Policy:
    """The decoder's policy: KV cache I/O in fp16, residual stream in fp32."""
    kv = frozenset(n for n in io_names if n.startswith(("past_key_values.", "present.")))
    return Fp16Policy(fp16_io=kv, fp32_residual=fp32_residual)


@dataclass
class Fp16Report:
    """What a conversion did (recorded in the engine's build record)."""

    fp16_nodes: int = 0
    fp32_islands: dict[str, list[str]] = field(default_factory=dict)  # kind -> node names
    casts_inserted: int = 0
    clipped_constants: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"fp16_nodes": self.fp16_nodes,
                "fp32_nodes": {k: len(v) for k, v in sorted(self.fp32_islands.items())},
                "casts_inserted": self.casts_inserted,
                "clipped_constants": len(self.clipped_constants)}


ArrayLoader = Callable[[TensorProto], np.ndarray]


# -- analysis --------------------------------------------------------------------------------------

class _Graph:
    """Index of one graph: producers, consumers, tensor types and classes."""

    def __init__(self, model: onnx.ModelProto, load: ArrayLoader) -> None:
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.inputs = {v.name for v in g.input} - set(self.inits)
        self.outputs = [v.name for v in g.output]
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for i, n in enumerate(self.nodes):
            for o in n.output:
                self.producer[o] = i
            for k, name in enumerate(n.input):
                if name:
                    self.consumers[name].append((i, k))
        self.types = tensor_types(model, load)
        self.klass = self._classify()

    def _classify(self) -> dict[str, str]:
        """const (weights and maths on them), index (from integer inputs), act (activations)."""
        klass = {name: CONST for name in self.inits}
        for name in self.inputs:
            klass[name] = ACT if self.types.get(name) in FLOAT_TYPES else INDEX
        for n in self.nodes:  # ONNX nodes are topologically sorted
            ins = {klass.get(x, ACT) for x in n.input if x}
            k = ACT if ACT in ins else INDEX if INDEX in ins else CONST
            for o in n.output:
                # An integer tensor derived from activations (Shape, ArgMax...) is index data;
                # quantized activations are still activations.
                quantized = n.op_type in _QUANTIZE_OPS
                klass[o] = (INDEX if k == ACT and not quantized
                            and self.types.get(o) not in FLOAT_TYPES else k)
        return klass

    def is_float(self, name: str) -> bool:
        return self.types.get(name) in FLOAT_TYPES

    def node_floats(self, i: int) -> bool:
        n = self.nodes[i]
        return any(self.is_float(x) for x in (*n.input, *n.output) if x)


def tensor_types(model: onnx.ModelProto, load: ArrayLoader) -> dict[str, int]:
    """Element type of every tensor, by ONNX shape inference.

    Inference needs the values of shape-like constants (Reshape shapes, Unsqueeze axes): those
    stored as external data are loaded inline in the copy inferred on (they are small; float
    weights, the bulk, stay external and only their declared type and dims are used).
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for t in probe.graph.initializer:
        external = t.data_location == TensorProto.EXTERNAL
        if external and (t.data_type not in FLOAT_TYPES or _numel(t) <= _INLINE_FOR_INFERENCE):
            t.CopyFrom(numpy_helper.from_array(load(t), t.name))
    inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False)
    types: dict[str, int] = {}
    g = inferred.graph
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    return types


def _norm_islands(gr: _Graph) -> tuple[set[int], set[str]]:
    """Nodes of norm statistics, and the tensors being normalised (their `x`)."""
    island: set[int] = set()
    sources_all: set[str] = set()
    for i, n in enumerate(gr.nodes):
        if n.op_type in _NORM_OPS:
            island.add(i)
            sources_all.add(n.input[0])
            continue
        if n.op_type != "ReduceMean" or gr.klass.get(n.input[0]) != ACT:
            continue
        island.add(i)
        data = n.input[0]
        p = gr.producer.get(data)
        sources = {data}
        if p is not None:
            pn = gr.nodes[p]
            squares = (pn.op_type == "Pow" and gr.klass.get(pn.input[1]) == CONST) or (
                pn.op_type == "Mul" and pn.input[0] == pn.input[1])
            if squares:
                island.add(p)
                sources = {pn.input[0]}
        sources_all |= sources
        # Forward through the statistics chain (maths on the reduction and constants only) to
        # the node that rescales x, inclusive.
        frontier, depth = [n.output[0]], 0
        chain_tensors = {n.output[0]}
        while frontier and depth < _CHAIN_DEPTH:
            nxt = []
            for t in frontier:
                for c, _ in gr.consumers.get(t, []):
                    cn = gr.nodes[c]
                    if cn.op_type not in _NORM_CHAIN_OPS or c in island:
                        continue
                    others = [x for x in cn.input if x and x not in chain_tensors]
                    if any(x in sources for x in others):
                        island.add(c)  # the rescale of x: last node of the island
                    elif all(gr.klass.get(x) == CONST for x in others):
                        island.add(c)
                        chain_tensors.update(cn.output)
                        nxt.extend(cn.output)
            frontier, depth = nxt, depth + 1
    return island, sources_all


def _softmax_islands(gr: _Graph) -> set[int]:
    island: set[int] = set()
    for i, n in enumerate(gr.nodes):
        if n.op_type not in _SOFTMAX_OPS:
            continue
        island.add(i)
        frontier, depth = [n.input[0]], 0
        while frontier and depth < _CHAIN_DEPTH:
            nxt: list[str] = []
            for t in frontier:
                p = gr.producer.get(t)
                if p is None or p in island:
                    continue
                pn = gr.nodes[p]
                if pn.op_type in _MATMUL_OPS:
                    island.add(p)
                elif pn.op_type in _SCORE_CHAIN_OPS:
                    island.add(p)
                    nxt.extend(x for x in pn.input if x and gr.klass.get(x) == ACT)
            frontier, depth = nxt, depth + 1
    return island


def _index_islands(gr: _Graph) -> set[int]:
    """Float maths on integer-derived data (masks, RoPE angles): whole nodes of class index."""
    out = set()
    for i, n in enumerate(gr.nodes):
        if any(gr.klass.get(o) == INDEX for o in n.output) and gr.node_floats(i):
            if any(gr.klass.get(x) == INDEX for x in n.input if x) or n.op_type == "Cast":
                out.add(i)
    return out


def _rope_islands(gr: _Graph) -> set[int]:
    """Mul(activation, index-derived float) (x*cos, rot(x)*sin) and the Add/Sub joining them."""
    muls = set()
    for i, n in enumerate(gr.nodes):
        if n.op_type == "Mul" and len(n.input) == 2:
            classes = {gr.klass.get(x) for x in n.input}
            if classes == {ACT, INDEX} and all(gr.is_float(x) for x in n.input):
                muls.add(i)
    joins = set()
    for i, n in enumerate(gr.nodes):
        if n.op_type in ("Add", "Sub") and all(gr.producer.get(x) in muls for x in n.input):
            joins.add(i)
    return muls | joins


def _residual_adds(gr: _Graph, norm_sources: set[str]) -> set[int]:
    out = set()
    for t in norm_sources:
        p = gr.producer.get(t)
        if p is None:
            continue
        n = gr.nodes[p]
        if n.op_type == "Add" and all(gr.klass.get(x) == ACT for x in n.input):
            out.add(p)
    return out


def _qdq_islands(gr: _Graph, opset: int, load: ArrayLoader) -> set[int]:
    """Q/DQ nodes that must stay fp32: opset < 19 (float32-only Q/DQ) or scales unsafe in fp16."""
    out = set()
    for i, n in enumerate(gr.nodes):
        if n.op_type not in _QDQ_OPS:
            continue
        if opset < 19:
            out.add(i)
            continue
        scale = gr.inits.get(n.input[1])
        if scale is None:
            continue  # a computed scale follows its producer's precision
        s = np.abs(load(scale).astype(np.float64))
        if s.size and (s.min() < FP16_MIN_NORMAL or s.max() > FP16_MAX):
            out.add(i)
    return out


def plan_fp16(model: onnx.ModelProto, policy: Fp16Policy,
              load: ArrayLoader | None = None) -> dict[int, str]:
    """Node index -> island kind for every node that stays fp32 (all others run in fp16)."""
    _check_supported(model)
    load = load or numpy_helper.to_array
    gr = _Graph(model, load)
    kinds: dict[int, str] = {}

    def mark(nodes: Iterable[int], kind: str) -> None:
        for i in nodes:
            kinds.setdefault(i, kind)

    norm, sources = _norm_islands(gr)
    if policy.keep_norms:
        mark(norm, "norm")
    if policy.keep_softmax:
        mark(_softmax_islands(gr), "softmax")
    if policy.keep_index_maths:
        mark(_index_islands(gr), "index")
    if policy.keep_rope:
        mark(_rope_islands(gr), "rope")
    if policy.fp32_residual:
        mark(_residual_adds(gr, sources), "residual")
    mark(_qdq_islands(gr, _opset(model), load), "qdq")
    return kinds


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _qdq_opset_19(model: onnx.ModelProto) -> bool:
    """Raise an opset-18 graph with Q/DQ nodes to opset 19, where Q/DQ take fp16 scales.

    Safe for 18 -> 19 only: every op that changed in 19 (Cast, CastLike, Constant, Equal,
    Identity, If, Loop, Pad, Q/DQ, Reshape, Scan, Shape, Size) gained types or attributes with
    defaults that keep opset-18 behaviour. Returns whether the opset was changed.
    """
    if _opset(model) != 18 or not any(n.op_type in _QDQ_OPS for n in model.graph.node):
        return False
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 19
    return True


def _check_supported(model: onnx.ModelProto) -> None:
    for n in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in n.attribute):
            raise ValueError(
                f"node {n.name or n.op_type} has a subgraph ({n.op_type}); the fp16 conversion "
                "handles flat graphs only: re-export without control flow")


# -- rewrite ---------------------------------------------------------------------------------------

def _fp16_array(a: np.ndarray, name: str, report: Fp16Report) -> np.ndarray:
    a32 = a.astype(np.float32)
    if a32.size and np.abs(a32[np.isfinite(a32)]).max(initial=0.0) > FP16_MAX:
        report.clipped_constants.append(name)
        a32 = np.where(np.isfinite(a32), np.clip(a32, -FP16_MAX, FP16_MAX), a32)
    return a32.astype(np.float16)


class TensorStore:
    """Where converted constants go: inline (small models) or an external-data file."""

    def __init__(self, data_file: Path | None = None, inline_below: int = 1024) -> None:
        self.data_file = data_file
        self.inline_below = inline_below
        self._fh: IO[bytes] | None = None
        self._offset = 0

    def make(self, name: str, array: np.ndarray) -> TensorProto:
        t = numpy_helper.from_array(np.require(array, requirements="C"), name)
        if self.data_file is None or array.nbytes < self.inline_below:
            return t
        if self._fh is None:
            self._fh = open(self.data_file, "wb")
        pad = -self._offset % 64  # keep tensors aligned for mmap-friendly readers
        self._fh.write(b"\0" * pad)
        self._offset += pad
        raw = t.raw_data
        self._fh.write(raw)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_file.name), ("offset", str(self._offset)),
                     ("length", str(len(raw)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self._offset += len(raw)
        return t

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _rewrite(model: onnx.ModelProto, kinds: dict[int, str], policy: Fp16Policy,
             load: ArrayLoader, store: TensorStore) -> Fp16Report:
    gr = _Graph(model, load)
    g = model.graph
    report = Fp16Report()
    for i, kind in sorted(kinds.items()):
        report.fp32_islands.setdefault(kind, []).append(gr.nodes[i].name or f"#{i}")
    is16 = [i not in kinds for i in range(len(gr.nodes))]
    report.fp16_nodes = sum(1 for i in range(len(gr.nodes)) if is16[i] and gr.node_floats(i))

    # Element type of every non-constant float tensor after conversion.
    cur: dict[str, int] = {}
    for v in g.input:
        if v.name in gr.inits:
            continue
        t = v.type.tensor_type
        if t.elem_type in FLOAT_TYPES and v.name in policy.fp16_io:
            t.elem_type = FLOAT16
        cur[v.name] = t.elem_type
    for i, n in enumerate(gr.nodes):
        _retype_attributes(n, is16[i])
        for o in n.output:
            if gr.is_float(o):
                cur[o] = _output_type(n, o, is16[i], gr)

    # A graph output whose producer runs in the other precision: the producer now writes an
    # inner tensor (which internal consumers read too) and a Cast writes the output.
    new_nodes: dict[int, list[onnx.NodeProto]] = defaultdict(list)  # inserted before node i
    for v in g.output:
        t = v.type.tensor_type
        if t.elem_type not in FLOAT_TYPES or v.name in gr.inits:
            continue
        want = FLOAT16 if v.name in policy.fp16_io else t.elem_type
        t.elem_type = want
        have = cur.get(v.name, want)
        if have == want:
            continue
        p_out = gr.producer[v.name]
        inner = f"{v.name}__{'fp16' if have == FLOAT16 else 'fp32'}"
        _rename_tensor(gr, v.name, inner)
        cur[inner] = have
        new_nodes[p_out + 1].append(helper.make_node("Cast", [inner], [v.name],
                                                 name=f"{v.name}__out_cast", to=want))
        report.casts_inserted += 1

    # What each consumer wants for each float input.
    wants: dict[str, set[int]] = defaultdict(set)
    edges: list[tuple[int, int, str, int]] = []  # node, input slot, tensor, wanted type
    for i, n in enumerate(gr.nodes):
        for k, x in enumerate(n.input):
            if not x or not gr.is_float(x):
                continue
            if n.op_type in _ANY_INPUT_OPS:
                if x in gr.inits:  # keep the constant as it is
                    wants[x].add(gr.inits[x].data_type)
                    edges.append((i, k, x, gr.inits[x].data_type))
                continue
            want = FLOAT16 if is16[i] else FLOAT
            wants[x].add(want)
            edges.append((i, k, x, want))

    # Constants: one tensor per wanted precision (converted, or the original kept).
    const_name: dict[tuple[str, int], str] = {}
    new_inits = []
    for name, init in gr.inits.items():
        if init.data_type not in FLOAT_TYPES:
            new_inits.append(store.make(name, load(init)))
            continue
        needed = wants.get(name, set())
        if not needed:
            continue  # unused float constant: dropped
        array = load(init)
        for ty in sorted(needed):
            out_name = name if (ty == init.data_type or len(needed) == 1) else (
                f"{name}__fp16" if ty == FLOAT16 else f"{name}__fp32")
            arr = _fp16_array(array, name, report) if ty == FLOAT16 else array.astype(np.float32)
            const_name[(name, ty)] = out_name
            new_inits.append(store.make(out_name, arr))
    del g.initializer[:]
    g.initializer.extend(new_inits)

    # Casts on edges whose producer precision differs from what the consumer wants.
    casts: dict[tuple[str, int], str] = {}
    for i, k, x, want in edges:
        if (x, want) in const_name:
            gr.nodes[i].input[k] = const_name[(x, want)]
            continue
        have = cur.get(x, want)
        if have == want or have not in FLOAT_TYPES:
            continue
        if (x, want) not in casts:
            y = f"{x}__to_{'fp16' if want == FLOAT16 else 'fp32'}"
            src = gr.producer.get(x)
            new_nodes[src + 1 if src is not None else 0].append(
                helper.make_node("Cast", [x], [y], name=f"{y}__cast", to=want))
            casts[(x, want)] = y
            report.casts_inserted += 1
        gr.nodes[i].input[k] = casts[(x, want)]

    ordered = []
    for i, n in enumerate(gr.nodes):
        ordered.extend(new_nodes.get(i, []))
        ordered.append(n)
    ordered.extend(new_nodes.get(len(gr.nodes), []))
    del g.node[:]
    g.node.extend(ordered)
    del g.value_info[:]  # stale types; consumers re-infer
    return report


def _rename_tensor(gr: _Graph, old: str, new: str) -> None:
    """Rename a node output and every internal use of it (not the graph output list)."""
    p = gr.producer.pop(old)
    node = gr.nodes[p]
    for k, o in enumerate(node.output):
        if o == old:
            node.output[k] = new
    gr.producer[new] = p
    for c, k in gr.consumers.get(old, []):
        gr.nodes[c].input[k] = new
    gr.consumers[new] = gr.consumers.pop(old, [])
    gr.types[new] = gr.types[old]
    gr.klass[new] = gr.klass[old]


def _retype_attributes(n: onnx.NodeProto, fp16: bool) -> None:
    """Float types named by attributes (Cast to, ConstantOfShape value) follow the node's precision."""
    if not fp16:
        return
    for a in n.attribute:
        if n.op_type == "Cast" and a.name == "to" and a.i == FLOAT:
            a.i = FLOAT16
        if n.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == FLOAT:
            value = numpy_helper.to_array(a.t).astype(np.float16)
            a.t.CopyFrom(numpy_helper.from_array(value, a.t.name))


def _output_type(n: onnx.NodeProto, o: str, fp16: bool, gr: _Graph) -> int:
    if n.op_type == "Cast":
        return int(next(a.i for a in n.attribute if a.name == "to"))
    return FLOAT16 if fp16 else gr.types[o]


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    """Constant nodes with a tensor value become initializers, so one code path converts both."""
    g = model.graph
    keep = []
    for n in g.node:
        value = next((a.t for a in n.attribute if a.name == "value"), None)
        if n.op_type == "Constant" and value is not None and len(n.attribute) == 1:
            t = TensorProto()
            t.CopyFrom(value)
            t.name = n.output[0]
            g.initializer.append(t)
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)


def _name_nodes(model: onnx.ModelProto) -> None:
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)


def convert_model_to_fp16(model: onnx.ModelProto, policy: Fp16Policy = Fp16Policy()
                          ) -> tuple[onnx.ModelProto, Fp16Report]:
    """In-memory conversion (weights inline). Returns a new model and what was done."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _constants_to_initializers(out)
    _name_nodes(out)
    _qdq_opset_19(out)
    kinds = plan_fp16(out, policy)
    report = _rewrite(out, kinds, policy, numpy_helper.to_array, TensorStore())
    return out, report


def convert_file_to_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                         policy: Fp16Policy = Fp16Policy()) -> Fp16Report:
    """Convert an ONNX file (weights inline or external) to `dst` + `dst.data`, streaming weights."""
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    base = str(src.parent)

    def load(t: TensorProto) -> np.ndarray:
        return numpy_helper.to_array(t, base_dir=base)

    _constants_to_initializers(model)
    _name_nodes(model)
    _qdq_opset_19(model)
    kinds = plan_fp16(model, policy, load)
    store = TensorStore(dst.with_name(dst.name + ".data"))
    try:
        report = _rewrite(model, kinds, policy, load, store)
    finally:
        store.close()
    onnx.save(model, str(dst))
    return report
