"""The TensorRT ONNX-parser lint (molmo_export.trt.parser_lint) on planted faults and on the
graphs users build: the exported demo and golden artifacts, their fp16 engine graphs and their
INT8 QDQ graphs, against JetPack 6's parser (TensorRT 10.3) and the newest table (10.15, which
TensorRT 11 is linted with)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from molmo_export.config import get_preset
from molmo_export.trt import build_engines
from molmo_export.trt.builder import fp16_onnx
from molmo_export.trt.parser_lint import (
    JETPACK6,
    NEWEST,
    ParserLintError,
    lint_file,
    lint_model,
    lint_version,
    require_parseable,
    support_table,
)
from molmo_runtime import graph_io
from molmo_runtime.manifest import load_manifest
from tests.gpu import fake_trt
from tests.gpu.tiny_graphs import decoder_model, tiny_dims, write_tiny_artifact

VERSIONS = (JETPACK6, NEWEST)


def test_the_table_names_its_source_and_is_complete() -> None:
    t = support_table()
    assert "onnx-tensorrt" in t["source"]["operators"] and t["source"]["retrieved"]
    assert t["opset"] == {"10.0": [9, 20], "10.15": [9, 24]}
    for op, entry in t["operators"].items():
        if entry["supported"]:
            assert entry["types"], op
            assert set(entry["types"]) <= set(t["dtypes"]["10.15"]), op
    for op in (*t["rules"]["constant_inputs"], *t["rules"]["attributes"]):
        assert t["operators"][op]["supported"], op
    assert lint_version("10.3.0.30") == "10.3" and lint_version("10.8.0.43") == "10.8"
    assert lint_version("11.4.0.106") == NEWEST == lint_version("10.16.1.11")


def test_tiny_graphs_are_clean() -> None:
    for v in VERSIONS:
        assert lint_model(decoder_model(tiny_dims()), v) == []


def _planted(model: onnx.ModelProto, node: onnx.NodeProto,
             inits: tuple[TensorProto, ...] = ()) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.node.append(node)
    out.graph.initializer.extend(inits)
    return out


@pytest.mark.parametrize("node, inits, versions, words", [
    # an op the parser lacks altogether
    (helper.make_node("Unique", ["inputs_embeds"], ["u"], name="planted_unique"), (),
     VERSIONS, "does not support Unique"),
    # an op the parser gained after JetPack 6's TensorRT
    (helper.make_node("RMSNormalization", ["inputs_embeds", "w"], ["r"], name="planted_rms"),
     (numpy_helper.from_array(np.ones(32, np.float32), "w"),), (JETPACK6,),
     "needs TensorRT >= 10.15"),
    # a custom-domain op (as ORT's quantizer or fusions emit)
    (helper.make_node("FusedMatMul", ["inputs_embeds", "inputs_embeds"], ["f"],
                      name="planted_ms", domain="com.microsoft"), (), VERSIONS, "custom domain"),
    # axes computed at run time where the parser needs a constant
    (helper.make_node("ReduceMean", ["inputs_embeds", "position_ids"], ["m"],
                      name="planted_axes"), (), VERSIONS, "must be a build-time constant"),
    # an unsupported attribute value
    (helper.make_node("TopK", ["inputs_embeds", "k"], ["v", "i"], name="planted_topk",
                      sorted=0), (numpy_helper.from_array(np.array([2], np.int64), "k"),),
     VERSIONS, "sorted=0"),
    # a non-zero zero point
    (helper.make_node("QuantizeLinear", ["inputs_embeds", "s", "z"], ["q"], name="planted_q"),
     (numpy_helper.from_array(np.array(0.1, np.float32), "s"),
      numpy_helper.from_array(np.array(3, np.int8), "z")), VERSIONS, "must be 0"),
    # a data type the op does not take (Sqrt of int64)
    (helper.make_node("Sqrt", ["position_ids"], ["sq"], name="planted_sqrt"), (), VERSIONS,
     "is INT64"),
])
def test_planted_faults_are_caught_naming_the_node(node: onnx.NodeProto,
                                                   inits: tuple[TensorProto, ...],
                                                   versions: tuple[str, ...], words: str) -> None:
    model = _planted(decoder_model(tiny_dims()), node, inits)
    for v in VERSIONS:
        problems = [str(p) for p in lint_model(model, v)]
        hits = [p for p in problems if node.name in p and words in p]
        assert bool(hits) == (v in versions), (v, problems)


def test_opset_beyond_the_parser() -> None:
    model = decoder_model(tiny_dims())
    model.opset_import[0].version = 21
    assert any("opset 21 is outside 9..20" in str(p) for p in lint_model(model, JETPACK6))
    assert lint_model(model, NEWEST) == []


def test_build_fails_early_naming_the_nodes(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    """--target trt-*: the lint runs on every source graph before any conversion or build."""
    fake_trt.install(monkeypatch)
    art = write_tiny_artifact(tmp_path / "art", tiny_dims())
    path = art / "onnx" / "connector.onnx"
    model = onnx.load(str(path))
    model.graph.node.append(helper.make_node("Unique", ["image_masks"], ["u"], name="bad_node"))
    onnx.save(model, str(path))
    m = load_manifest(art, verify="none")
    raw = dict(m.raw)
    from molmo_runtime.manifest import file_record, write_manifest

    raw["files"] = {**m.files, "onnx/connector.onnx": file_record(art, "onnx/connector.onnx")}
    write_manifest(art, raw)
    with pytest.raises(ParserLintError) as e:
        build_engines(art, "trt-fp16", machine=fake_trt.MACHINE)
    assert "connector (connector.onnx):" in str(e.value)
    assert "node 'bad_node' (Unique)" in str(e.value)
    assert fake_trt.Builder.log == []  # nothing was built
    assert not (art / "engines").exists()


# -- the exported graphs ---------------------------------------------------------------------------

def _graphs(art: Path) -> dict[str, Path]:
    m = load_manifest(art, verify="none")
    return {name: m.path(spec.file) for name, spec in m.graphs.items()}


def _fp16_graphs(art: Path, tmp: Path) -> dict[str, Path]:
    m = load_manifest(art, verify="none")
    out = {}
    for name, spec in m.graphs.items():
        dst = tmp / f"{name}.onnx"
        fp16_onnx(m.path(spec.file), dst, spec, fp32_residual=True)
        out[f"{name} (fp16)"] = dst
    return out


@pytest.mark.parametrize("which", ["demo_artifact", "golden_artifact"])
def test_exported_graphs_pass_the_lint(which: str, request: pytest.FixtureRequest,
                                       tmp_path: Path) -> None:
    art = request.getfixturevalue(which)
    graphs = {**_graphs(art), **_fp16_graphs(art, tmp_path)}
    for v in VERSIONS:
        require_parseable(graphs, v)
    ops = {n.op_type for g in graphs.values()
           for n in onnx.load(str(g), load_external_data=False).graph.node}
    assert {"MatMul", "Softmax", "Cast"} <= ops  # it did look at real graphs


def test_bench_preset_has_the_demo_architecture() -> None:
    """bench-0.5b differs from demo in sizes only, so it exports the same operators and the
    demo's lint covers it (exporting the 0.5B model in the suite would take minutes)."""
    def architecture(name: str) -> dict[str, object]:
        cfg = get_preset(name)
        flags = {}
        for part in ("vision", "pooling", "text"):
            for f in dataclasses.fields(getattr(cfg, part)):
                value = getattr(getattr(cfg, part), f.name)
                if isinstance(value, (bool, str)) or f.name.endswith(("eps", "theta")):
                    flags[f"{part}.{f.name}"] = value
        return flags

    bench, demo = architecture("bench-0.5b"), architecture("demo")
    assert bench == demo


@pytest.mark.slow
def test_int8_qdq_graphs_pass_the_lint(demo_artifact: Path, tmp_path: Path) -> None:
    """trt-int8 builds from the calibrated QDQ graphs: they are linted too."""
    from molmo_calibration import quantize_artifact

    src = tmp_path / "demo"
    shutil.copytree(demo_artifact, src)
    out = tmp_path / "demo-int8"
    quantize_artifact(src, out, target="trt-int8-qdq", allow_degraded=True, progress=False,
                      max_samples=2, task_questions=0, log=lambda s: None)
    m = load_manifest(out, verify="none")
    qdq = {g: m.path(e["file"]) for g, e in m.raw["graphs_qdq"].items()}
    assert qdq
    q_ops = {n.op_type for p in qdq.values()
             for n in onnx.load(str(p), load_external_data=False).graph.node}
    assert "QuantizeLinear" in q_ops and "DequantizeLinear" in q_ops
    for v in VERSIONS:
        require_parseable(qdq, v)
        for name, path in qdq.items():
            spec = m.graphs[name]
            fp16_onnx(path, tmp_path / f"{name}.fp16.onnx", spec, fp32_residual=True)
            assert lint_file(tmp_path / f"{name}.fp16.onnx", v) == [], name
    assert graph_io.DECODER in m.graphs
