"""Lint an ONNX graph against what TensorRT's ONNX parser accepts, before any engine is built.

TensorRT parses a graph only on the device, minutes into a build (a Jetson build of a 7B decoder
takes long). This checks the same facts on any machine, in seconds, from the parser's published
support table (onnx_parser_support.json beside this file, with its source): every node's
operator, domain, the opset, data types, and the restrictions the table states that can be
checked statically (inputs that must be constants, attribute values, zero points, output
counts). Problems name the node, so an export change that emits something the JetPack 6 parser
(TensorRT 10.3) lacks fails at once, saying where.

    problems = lint_model(onnx.load(path, load_external_data=False), "10.3")
    require_parseable({"decoder": path}, "10.3")      # raises ParserLintError listing them

The table describes the parser; passing the lint means no *known* refusal, not that a build
will succeed (tactics, memory and numerics are TensorRT's). Torch-free, TensorRT-free.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from molmo_runtime.errors import ArtifactError
from molmo_runtime.trt_env import parse_version

if TYPE_CHECKING:  # onnx is imported where it is used: `import molmo_export.trt` stays light
    import onnx
    from onnx import TensorProto

SUPPORT_FILE = Path(__file__).with_name("onnx_parser_support.json")
JETPACK6 = "10.3"  # the TensorRT of JetPack 6.1/6.2: the oldest parser we build for
NEWEST = "10.15"  # the newest table we have (TensorRT 11 is linted with it)

# ONNX element type name -> the support table's name
_DTYPE_NAMES = {"FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "FLOAT8E4M3FN": "FP8",
                "FLOAT4E2M1": "FP4"}


def _dtype_name(elem: int) -> str:
    """The support table's name of an ONNX element type ("FP16", "INT64", ...)."""
    from onnx import TensorProto

    name = str(TensorProto.DataType.Name(elem))
    return _DTYPE_NAMES.get(name, name)


class ParserLintError(ArtifactError):
    """A graph uses something TensorRT's ONNX parser does not accept."""


@dataclass(frozen=True)
class LintProblem:
    node: str  # node name ("" for graph-level problems)
    op: str
    reason: str

    def __str__(self) -> str:
        where = f"node {self.node!r} ({self.op})" if self.node else "graph"
        return f"{where}: {self.reason}"


@functools.lru_cache(maxsize=1)
def support_table() -> dict[str, Any]:
    with open(SUPPORT_FILE, encoding="utf-8") as f:
        table: dict[str, Any] = json.load(f)
    return table


def _ver(v: str) -> tuple[int, ...]:
    return parse_version(v)[:2]


def _for_version(by_version: Mapping[str, Any], version: str) -> Any:
    """The entry of the newest table version <= `version` ("10.0", "10.15" keys)."""
    fitting = [k for k in by_version if _ver(k) <= _ver(version)]
    if not fitting:
        raise ValueError(f"no parser support data for TensorRT {version}")
    return by_version[max(fitting, key=_ver)]


def _constant_names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    return {t.name for t in g.initializer} | {
        o for n in g.node if n.op_type == "Constant" for o in n.output}


def _constant_values(model: onnx.ModelProto) -> dict[str, TensorProto]:
    out = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        value = next((a.t for a in n.attribute if a.name == "value"), None)
        if n.op_type == "Constant" and value is not None:
            out[n.output[0]] = value
    return out


def _tensor_types(model: onnx.ModelProto, base_dir: str | None) -> dict[str, int]:
    """Element types by ONNX type inference; the declared ones where inference fails (an
    unknown custom op stops it: that op is reported by itself)."""
    import onnx
    from onnx import numpy_helper

    from molmo_export.trt.fp16 import tensor_types

    def load(t: TensorProto) -> Any:
        return numpy_helper.to_array(t, base_dir=base_dir or "")

    try:
        return tensor_types(model, load)
    except onnx.shape_inference.InferenceError:
        g = model.graph
        types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output,
                                                                *g.value_info)}
        types.update({t.name: t.data_type for t in g.initializer})
        return {k: v for k, v in types.items() if v}


def _attr(node: onnx.NodeProto, name: str) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return None


def lint_model(model: onnx.ModelProto, trt_version: str = JETPACK6,
               base_dir: str | os.PathLike[str] | None = None) -> list[LintProblem]:
    """Everything in `model` that TensorRT `trt_version`'s parser is documented to refuse.

    base_dir: where the model's external data lives (only small shape-like constants are read,
    for type inference and zero-point checks; weights stay on disk).
    """
    import onnx
    from onnx import numpy_helper

    table = support_table()
    ops: dict[str, Any] = table["operators"]
    rules: dict[str, Any] = table["rules"]
    base = str(base_dir) if base_dir is not None else None
    problems: list[LintProblem] = []

    lo, hi = _for_version(table["opset"], trt_version)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and not lo <= o.version <= hi:
            problems.append(LintProblem("", "", f"opset {o.version} is outside {lo}..{hi}, "
                                                f"the range TensorRT {trt_version} parses"))

    dtypes = set(_for_version(table["dtypes"], trt_version))
    io_only = set(table["io_only_dtypes"])
    types = _tensor_types(model, base)
    io_names = {v.name for v in (*model.graph.input, *model.graph.output)}
    for name, elem in sorted(types.items()):
        dt = _dtype_name(elem)
        if dt not in dtypes:
            problems.append(LintProblem("", "", f"tensor {name!r} has type {dt}, which "
                                                f"TensorRT {trt_version} does not support"))
        elif dt in io_only and name not in io_names:
            problems.append(LintProblem("", "", f"tensor {name!r} is {dt}, which TensorRT "
                                                "supports only as a network input or output"))

    constants = _constant_names(model)
    values = _constant_values(model)
    const_rules = dict(rules["constant_inputs"])
    for until, extra in rules["constant_inputs_before"].items():
        if _ver(trt_version) < _ver(until):
            const_rules.update(extra)

    for i, node in enumerate(model.graph.node):
        name, op = node.name or f"#{i}", node.op_type

        def bad(reason: str, node_name: str = name, node_op: str = op) -> None:
            problems.append(LintProblem(node_name, node_op, reason))

        if node.domain not in ("", "ai.onnx"):
            bad(f"custom domain {node.domain!r}: TensorRT parses it only with a plugin, and "
                "none is built for these engines")
            continue
        entry = ops.get(op)
        if entry is None or not entry["supported"]:
            bad(f"TensorRT's ONNX parser does not support {op}")
            continue
        if "since" in entry and _ver(trt_version) < _ver(entry["since"]):
            bad(f"{op} needs TensorRT >= {entry['since']} (this lint: {trt_version})")
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute):
            bad("has a subgraph: the engines are built from flat graphs (fp16.py refuses "
                "control flow)")
        slot = rules["type_input"].get(op, 0)
        data = node.input[slot] if len(node.input) > slot else ""
        if data and data in types:
            dt = _dtype_name(types[data])
            if dt not in entry["types"]:
                bad(f"input {data!r} is {dt}; TensorRT's {op} takes "
                    f"{', '.join(entry['types'])}")
        for k in const_rules.get(op, []):
            if len(node.input) > k and node.input[k] and node.input[k] not in constants:
                bad(f"input {k} ({node.input[k]!r}) must be a build-time constant "
                    f"(initializer or Constant): {entry.get('restrictions', '')}".rstrip(": "))
        for k in rules["zero_inputs"].get(op, []):
            if len(node.input) > k and node.input[k] in values:
                v = numpy_helper.to_array(values[node.input[k]], base_dir=base or "")
                if v.size and (v != 0).any():
                    bad(f"zero point {node.input[k]!r} must be 0 ({entry['restrictions']})")
        for attr, allowed in rules["attributes"].get(op, {}).items():
            value = _attr(node, attr)
            if value is not None and value not in allowed:
                bad(f"attribute {attr}={value!r} is not supported (allowed: {allowed})")
        most = rules["max_outputs"].get(op)
        if most is not None and sum(1 for o in node.output if o) > most:
            bad(f"uses {sum(1 for o in node.output if o)} outputs; TensorRT supports "
                f"{most} ({entry.get('restrictions', '')})")
    return problems


def lint_file(path: str | os.PathLike[str], trt_version: str = JETPACK6) -> list[LintProblem]:
    """lint_model of an ONNX file (weights stored beside it are not loaded)."""
    import onnx

    p = Path(path)
    return lint_model(onnx.load(str(p), load_external_data=False), trt_version, p.parent)


def lint_version(trt_version: str) -> str:
    """The table version a TensorRT version is linted with ("11.4.0.106" -> "10.15")."""
    v = _ver(trt_version)
    return NEWEST if v >= _ver(NEWEST) else ".".join(map(str, v))


def require_parseable(graphs: Mapping[str, str | os.PathLike[str]],
                      trt_version: str = JETPACK6, limit: int = 20) -> None:
    """Lint every graph; raise ParserLintError naming each problem (the first `limit` per
    graph) when any graph has one. graphs: name -> ONNX file."""
    report = []
    for name, path in graphs.items():
        problems = lint_file(path, trt_version)
        if problems:
            shown = [f"    {p}" for p in problems[:limit]]
            if len(problems) > limit:
                shown.append(f"    ... and {len(problems) - limit} more")
            report.append(f"  {name} ({Path(path).name}):\n" + "\n".join(shown))
    if report:
        raise ParserLintError(
            f"TensorRT {trt_version}'s ONNX parser would refuse these graphs "
            f"(onnx-tensorrt's support table, {SUPPORT_FILE.name}):\n" + "\n".join(report))
