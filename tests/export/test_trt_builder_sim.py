"""build_engines with TensorRT simulated (tests/gpu/fake_trt): what it asks TensorRT for, what
it writes (plans, build records, manifest), and that a failed or impossible build writes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto

from molmo_export.trt import build_engines, require_tensorrt
from molmo_export.trt.builder import EngineBuildError
from molmo_export.trt.profiles import graph_profiles
from molmo_runtime import graph_io
from molmo_runtime.errors import ArtifactError, InputError, MissingDependencyError
from molmo_runtime.fileio import sha256_file
from molmo_runtime.manifest import load_manifest
from molmo_runtime.trt_env import check_build_record, missing_for_tensorrt
from tests.gpu import fake_trt
from tests.gpu.tiny_graphs import tiny_dims, write_tiny_artifact

DIMS = tiny_dims(max_seq_len=24, max_crops=3)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def art(tmp_path: Path) -> Path:
    return write_tiny_artifact(tmp_path / "art", DIMS)


def test_build_writes_plans_and_records(monkeypatch: pytest.MonkeyPatch, art: Path,
                                        tmp_path: Path) -> None:
    fake_trt.install(monkeypatch)
    cache = tmp_path / "timing.cache"
    said: list[str] = []
    engines = build_engines(art, "trt-fp16", workspace_gb=1.5, timing_cache=cache,
                            builder_optimization_level=4, tactic_sources=["cublas_lt"],
                            max_prompt_len=16, progress=said.append, machine=fake_trt.MACHINE)
    m = load_manifest(art)  # full hash verification of every file, plans included
    assert m.raw["engines"] == engines
    assert set(engines) == set(graph_io.GRAPH_NAMES)
    assert not list(art.glob(".trt-build-*"))  # the temporary build folder is gone
    log = fake_trt.Builder.log
    assert len(log) == 3
    for name, rec in engines.items():
        plan = art / rec["file"]
        assert rec["file"] == f"engines/{name}.plan" and plan.is_file()
        assert m.files[rec["file"]] == {"bytes": plan.stat().st_size, "sha256": rec["sha256"]}
        assert rec["source_onnx"] == f"onnx/{name}.onnx"
        assert rec["source_onnx_sha256"] == sha256_file(art / rec["source_onnx"])
        assert rec["target"] == "trt-fp16" and rec["gpu_name"] == "Fake GPU"
        assert check_build_record(rec, fake_trt.MACHINE, rec["source_onnx_sha256"]) == []
        assert rec["flags"]["workspace_gb"] == 1.5
        assert rec["flags"]["profiles"]["max_prompt_len"] == 16
        assert rec["precision"]["fp16_nodes"] > 0 and not rec["precision"]["int8_qdq"]
        want = [p.to_dict() for p in graph_profiles(m.graphs[name], m.dims,
                                                     _settings(max_prompt_len=16))]
        assert rec["profiles"] == want
    for build in log:
        assert build["flags"] == 1 << 1  # STRONGLY_TYPED
        assert build["pool_limits"] == {"WORKSPACE": int(1.5 * 2**30)}
        assert build["opt_level"] == 4 and build["tactics"] == 1 << 1  # CUBLAS_LT
    decoder = next(b for b in log if "decoder" in b["onnx"])
    types = {v.name: v.type.tensor_type.elem_type for v in decoder["model"].graph.input}
    assert types[graph_io.past_key_name(0)] == TensorProto.FLOAT16  # strongly typed fp16 cache
    assert types["inputs_embeds"] == TensorProto.FLOAT
    assert [len(p) for p in decoder["profiles"]] == [3 + 2 * DIMS.num_layers] * 2
    assert cache.read_bytes().endswith(b"+")  # the timing cache was written back
    assert any("decoder" in s and "building" in s for s in said)


def _settings(**kw: int):  # type: ignore[no-untyped-def]
    from molmo_export.trt.profiles import ProfileSettings

    return ProfileSettings(**kw)


def test_rebuilding_one_graph_keeps_the_others(monkeypatch: pytest.MonkeyPatch, art: Path) -> None:
    fake_trt.install(monkeypatch)
    first = build_engines(art, "trt-fp16", machine=fake_trt.MACHINE)
    second = build_engines(art, "trt-fp16", graphs=["connector"], machine=fake_trt.MACHINE)
    assert second["decoder"] == first["decoder"]
    assert second["connector"]["built_utc"] >= first["connector"]["built_utc"]
    load_manifest(art)
    with pytest.raises(InputError, match="unknown graph"):
        build_engines(art, "trt-fp16", graphs=["lm_head"], machine=fake_trt.MACHINE)


def test_failed_build_writes_nothing(monkeypatch: pytest.MonkeyPatch, art: Path) -> None:
    fake_trt.install(monkeypatch)
    real = fake_trt.Builder.build_serialized_network

    def fail_on_decoder(self, network, config):  # type: ignore[no-untyped-def]
        return None if "decoder" in network.onnx_path else real(self, network, config)

    monkeypatch.setattr(fake_trt.Builder, "build_serialized_network", fail_on_decoder)
    before = snapshot(art)
    with pytest.raises(EngineBuildError, match="failed to build an engine from decoder"):
        build_engines(art, "trt-fp16", machine=fake_trt.MACHINE)
    assert snapshot(art) == before


def test_parse_error_is_reported(monkeypatch: pytest.MonkeyPatch, art: Path) -> None:
    fake_trt.install(monkeypatch)

    def fail(self, path):  # type: ignore[no-untyped-def]
        self.num_errors = 1
        return False

    monkeypatch.setattr(fake_trt.OnnxParser, "parse_from_file", fail)
    before = snapshot(art)
    with pytest.raises(EngineBuildError,
                       match="could not parse connector.onnx:\n  fake parser error"):
        build_engines(art, "trt-fp16", machine=fake_trt.MACHINE)
    assert snapshot(art) == before


def test_int8_needs_the_qdq_graphs(monkeypatch: pytest.MonkeyPatch, art: Path) -> None:
    fake_trt.install(monkeypatch)
    before = snapshot(art)
    with pytest.raises(InputError, match="calibrat"):
        build_engines(art, "trt-int8", machine=fake_trt.MACHINE)
    assert snapshot(art) == before


def test_int8_builds_from_the_qdq_graphs(monkeypatch: pytest.MonkeyPatch, art: Path) -> None:
    """manifest['graphs_qdq'] as molmo_calibration writes it; a graph it lacks is built fp16."""
    fake_trt.install(monkeypatch)
    m = load_manifest(art)
    qdq = "onnx/qdq/vision_encoder.onnx"
    (art / "onnx" / "qdq").mkdir()
    shutil.copy(art / "onnx" / "vision_encoder.onnx", art / qdq)  # stands in for a QDQ graph
    raw = dict(m.raw)
    raw["graphs_qdq"] = {"vision_encoder": {**m.graphs["vision_encoder"].to_dict(), "file": qdq}}
    raw["files"] = {**m.files, qdq: {"bytes": (art / qdq).stat().st_size,
                                     "sha256": sha256_file(art / qdq)}}
    (art / "manifest.json").write_text(json.dumps(raw))
    engines = build_engines(art, "trt-int8", machine=fake_trt.MACHINE)
    assert engines["vision_encoder"]["source_onnx"] == qdq
    assert engines["vision_encoder"]["precision"]["int8_qdq"] is True
    assert engines["decoder"]["source_onnx"] == "onnx/decoder.onnx"
    assert engines["decoder"]["target"] == "trt-int8"


def test_no_tensorrt_stops_before_any_work(art: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The early error: one line naming what is missing and how to get it; nothing written."""
    if not missing_for_tensorrt():
        pytest.skip("this machine has TensorRT and a GPU")
    before = snapshot(art)
    for target in ("trt-fp16", "trt-int8"):
        with pytest.raises(MissingDependencyError) as e:
            build_engines(art, target)  # type: ignore[arg-type]
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"--target {target} needs an NVIDIA GPU")
        assert "pip install 'molmo-export[trt]'" in msg and "this machine has" in msg
    assert snapshot(art) == before
    # Stops before looking at the artifact at all: a missing directory is not even read.
    with pytest.raises(MissingDependencyError):
        build_engines(art.parent / "absent", "trt-fp16")
    assert not (art.parent / "absent").exists()


def test_require_tensorrt_with_injected_probe() -> None:
    require_tensorrt("trt-fp16", probe=lambda: [])
    with pytest.raises(MissingDependencyError, match="this machine has no tensorrt module$"):
        require_tensorrt("trt-int8", probe=lambda: ["no tensorrt module"])


def test_importable_without_tensorrt_and_torch(tmp_path: Path) -> None:
    """The builder package imports on a machine with neither (a Jetson has no torch)."""
    code = ("import sys; import molmo_export.trt, molmo_export.trt.builder, "
            "molmo_export.trt.fp16, molmo_runtime.backends.trt; "
            "assert 'torch' not in sys.modules and 'tensorrt' not in sys.modules")
    assert os.system(f"{sys.executable} -c \"{code}\"") == 0


def test_plan_is_refused_if_the_source_changes(monkeypatch: pytest.MonkeyPatch, art: Path) -> None:
    from molmo_runtime.backends.trt import TrtBackend

    fake_trt.install(monkeypatch)
    build_engines(art, "trt-fp16", machine=fake_trt.MACHINE)
    raw = json.loads((art / "manifest.json").read_text())
    raw["files"]["onnx/decoder.onnx"]["sha256"] = "0" * 64  # a re-exported graph
    (art / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="decoder: source graph onnx/decoder.onnx changed"):
        TrtBackend(load_manifest(art, verify="none"), machine=fake_trt.MACHINE)


def test_converted_graph_is_valid_onnx(monkeypatch: pytest.MonkeyPatch, art: Path) -> None:
    fake_trt.install(monkeypatch)
    build_engines(art, "trt-fp16", machine=fake_trt.MACHINE)
    for build in fake_trt.Builder.log:
        onnx.checker.check_model(build["model"], full_check=True)


def test_cli_build_settings_reach_the_build_record(monkeypatch: pytest.MonkeyPatch, art: Path,
                                                   tmp_path: Path) -> None:
    import molmo_export.trt.availability as availability
    import molmo_export.trt.builder as builder
    from molmo_export.cli import main_export

    fake_trt.install(monkeypatch)
    monkeypatch.setattr(availability, "require_tensorrt", lambda target="trt-fp16": None)
    monkeypatch.setattr(builder, "collect_machine_info", lambda: fake_trt.MACHINE)
    cache = tmp_path / "timing.cache"
    rc = main_export(["--target", "trt-fp16", "--from-onnx", "--out", str(art), "--no-progress",
                      "--max-prompt-len", "16", "--workspace-gb", "1.5",
                      "--timing-cache", str(cache), "--builder-optimization-level", "4"])
    assert rc == 0
    m = load_manifest(art)
    for rec in m.raw["engines"].values():
        flags = rec["flags"]
        assert flags["workspace_gb"] == 1.5 and flags["builder_optimization_level"] == 4
        assert flags["timing_cache"] == str(cache) and flags["profiles"]["max_prompt_len"] == 16
    decoder = m.raw["engines"]["decoder"]["profiles"][0]
    assert decoder["name"] == "prefill" and decoder["shapes"]["inputs_embeds"][2][1] == 16
    assert cache.is_file()
    assert all(b["opt_level"] == 4 for b in fake_trt.Builder.log)


@pytest.mark.parametrize("argv, words", [
    (["--target", "ort-fp32", "--max-prompt-len", "16"],
     "--max-prompt-len apply to TensorRT targets only"),
    (["--target", "trt-fp16", "--builder-optimization-level", "7"], "takes 0..5"),
    (["--target", "trt-int8", "--workspace-gb", "0"], "workspace_gb=0.0"),
    (["--target", "trt-fp16", "--max-prompt-len", "0"], "0 is less than 1"),  # argparse type
    (["--target", "trt-fp16", "--timing-cache", "{tmp}/absent/t.cache"], "existing folder"),
])
def test_cli_refuses_bad_build_settings_before_any_work(
        argv: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from molmo_export.cli import main_export

    out = tmp_path / "out"
    try:
        rc = main_export([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--out", str(out)])
    except SystemExit as e:  # refused by an argparse type
        rc = e.code  # type: ignore[assignment]
    assert rc == 2
    assert words in capsys.readouterr().err
    assert not out.exists()
