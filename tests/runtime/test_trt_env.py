"""Build-record matching and refusal, and the probe of what TensorRT needs (fake machines)."""

from __future__ import annotations

from pathlib import Path

import pytest

from molmo_runtime.errors import EngineMismatchError
from molmo_runtime.trt_env import (
    MachineInfo,
    check_build_record,
    missing_for_tensorrt,
    missing_message,
    parse_l4t_release,
    parse_version,
    read_l4t_release,
    require_matching_engines,
    supported_tensorrt,
    tensorrt_version,
)

ORIN = MachineInfo(trt_version="10.3.0.30", cuda_runtime_version="12.6",
                   cuda_driver_version="12.6", gpu_name="Orin", compute_capability="8.7",
                   l4t="R36.4.3")
H100 = MachineInfo(trt_version="10.13.0.35", cuda_runtime_version="12.9",
                   cuda_driver_version="12.9", gpu_name="NVIDIA H100 80GB HBM3",
                   compute_capability="9.0", l4t=None)


def record(machine: MachineInfo, **changes: object) -> dict[str, object]:
    rec: dict[str, object] = {"file": "engines/decoder.plan", "target": "trt-fp16",
                              "source_onnx": "onnx/decoder.onnx", "source_onnx_sha256": "abc",
                              **machine.to_dict()}
    rec.update(changes)
    return rec


def test_matching_record_has_no_problems() -> None:
    assert check_build_record(record(ORIN), ORIN, "abc") == []
    # A newer CUDA minor version or driver is fine; only the major version must agree.
    assert check_build_record(record(ORIN, cuda_runtime_version="12.2",
                                     cuda_driver_version="12.2"), ORIN, "abc") == []


@pytest.mark.parametrize("field, value, words", [
    ("trt_version", "10.3.0.26", "TensorRT version"),
    ("gpu_name", "NVIDIA GeForce RTX 4090", "GPU"),
    ("compute_capability", "8.9", "compute capability"),
    ("l4t", "R36.3.0", "L4T"),
    ("cuda_runtime_version", "11.4", "CUDA major"),
])
def test_each_mismatch_is_named(field: str, value: str, words: str) -> None:
    problems = check_build_record(record(ORIN, **{field: value}), ORIN, "abc")
    assert len(problems) == 1 and words in problems[0]
    assert value in problems[0]


def test_source_graph_hash_mismatch() -> None:
    problems = check_build_record(record(ORIN), ORIN, "def")
    assert problems == ["source graph onnx/decoder.onnx changed since the engine was built "
                        "(sha256 differs)"]
    assert check_build_record(record(ORIN), ORIN, None) == []  # no source listed: not checked


def test_engine_from_another_machine_is_refused_with_the_rebuild_command() -> None:
    engines = {"decoder": record(H100), "vision_encoder": record(ORIN, source_onnx_sha256="x",
                                                                  source_onnx="onnx/v.onnx")}
    files = {"onnx/decoder.onnx": {"sha256": "abc"}, "onnx/v.onnx": {"sha256": "changed"}}
    with pytest.raises(EngineMismatchError) as e:
        require_matching_engines(engines, ORIN, files, "/data/out")
    msg = str(e.value)
    assert "decoder: TensorRT version" in msg and "decoder: GPU" in msg
    assert "vision_encoder: source graph" in msg
    assert msg.rstrip().endswith(
        "rebuild on this device: molmo-export --target trt-fp16 --from-onnx --out /data/out")
    require_matching_engines({"decoder": record(ORIN)}, ORIN, files, "/data/out")  # no raise


def test_l4t_release_parsing(tmp_path: Path) -> None:
    line = ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
            "DATE: Wed Jan  8 01:49:37 UTC 2025")
    assert parse_l4t_release(line) == "R36.4.3"
    assert parse_l4t_release("nonsense") is None
    f = tmp_path / "nv_tegra_release"
    f.write_text(line + "\n# KERNEL_VARIANT: oot\n")
    assert read_l4t_release(f) == "R36.4.3"
    assert read_l4t_release(tmp_path / "absent") is None


def test_parse_version() -> None:
    assert parse_version("10.3.0.30") == (10, 3, 0, 30)
    assert parse_version("10.13.0.post1") == (10, 13, 0)
    assert parse_version("") == ()


def test_missing_probe_names_everything_missing() -> None:
    assert missing_for_tensorrt(lambda: "10.3.0.30", lambda: "") == []
    assert missing_for_tensorrt(lambda: None, lambda: "no CUDA GPU") == [
        "no tensorrt module", "no CUDA GPU"]
    assert missing_for_tensorrt(lambda: "8.6.1", lambda: "") == [
        "tensorrt 8.6.1 (need >= 10.3, < 12.0)"]
    msg = missing_message("--target trt-fp16", ["no tensorrt module", "no CUDA GPU"])
    assert "\n" not in msg
    assert msg.startswith("--target trt-fp16 needs an NVIDIA GPU with TensorRT >= 10.3, < 12.0")
    assert "pip install 'molmo-export[trt]'" in msg and "JetPack 6" in msg
    assert msg.endswith("this machine has no tensorrt module, no CUDA GPU")


@pytest.mark.parametrize("version, ok", [
    ("10.2.0.19", False),  # before JetPack 6.1's TensorRT: set_device_memory etc. exist, but
                           # nothing older than what we test against is claimed
    ("10.3.0.30", True),   # JetPack 6.1/6.2
    ("10.13.3.9", True),
    ("10.16.1.11", True),
    ("11.0.0.114", True),
    ("11.4.0.106", True),  # newest on PyPI when this range was set
    ("12.0.0.1", False),   # a major whose removals nobody has checked against our calls
    ("9.3.0.1", False),
    ("", False),
    ("abc", False),
])
def test_supported_range(version: str, ok: bool) -> None:
    assert supported_tensorrt(version) is ok
    missing = missing_for_tensorrt(lambda: version, lambda: "")
    assert missing == ([] if ok else [f"tensorrt {version} (need >= 10.3, < 12.0)"])


@pytest.mark.skipif(tensorrt_version() is not None, reason="tensorrt is installed here")
def test_real_probe_on_a_machine_without_tensorrt() -> None:
    assert "no tensorrt module" in missing_for_tensorrt()
