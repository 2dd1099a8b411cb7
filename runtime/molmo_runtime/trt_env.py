"""This machine as TensorRT sees it, and whether an engine's build record matches it. Torch-free.

A TensorRT engine (plan) runs only with the TensorRT version and on the GPU it was built for.
The engine builder stores a *build record* per engine in manifest["engines"][graph]; the runtime
compares it with `collect_machine_info()` before deserialising anything and refuses a mismatch
with one message that says to rebuild on this device. The comparison (`check_build_record`) and
the probe of what is missing (`missing_for_tensorrt`) are pure given their inputs, so they are
unit-tested with fake machines.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from molmo_runtime.errors import EngineMismatchError

# Supported TensorRT: MIN_TENSORRT <= version < MAX_TENSORRT (major.minor).
#   10.3: JetPack 6.1/6.2 ships it; it has everything we call (strongly typed networks, the
#         name-based enqueueV3 I/O API, device_memory_size_v2 and set_device_memory from 10.1).
#   < 12: 11.x is the newest major whose migration guide (removed APIs) we have checked our
#         calls against (docs/tensorrt.md, "Names per version"); a 12 may remove more, so it
#         is refused until someone checks it, rather than failing mid-build.
MIN_TENSORRT = (10, 3)
MAX_TENSORRT = (12, 0)
L4T_RELEASE_FILE = Path("/etc/nv_tegra_release")
REBUILD_HINT = "rebuild on this device: molmo-export --target {target} --from-onnx --out {out}"
GETTING_TENSORRT = ("pip install 'molmo-export[trt]' on x86-64 Linux with an NVIDIA driver; "
                    "JetPack 6 on Jetson (it ships TensorRT)")


@dataclass(frozen=True)
class MachineInfo:
    trt_version: str  # tensorrt.__version__, e.g. "10.3.0.30"
    cuda_runtime_version: str  # "12.6"
    cuda_driver_version: str  # highest CUDA the driver supports, "12.6"
    gpu_name: str  # "NVIDIA H100 80GB HBM3", "Orin"
    compute_capability: str  # "9.0", "8.7"
    l4t: str | None = None  # Jetson Linux release ("R36.4.0"), None off Jetson

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_version(v: str) -> tuple[int, ...]:
    """Leading numeric components of a version string ("10.3.0.30" -> (10, 3, 0, 30))."""
    out = []
    for part in v.split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    return tuple(out)


def parse_l4t_release(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.0, ...' (first line of /etc/nv_tegra_release) -> 'R36.4.0'."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"R{m.group(1)}.{m.group(2)}" if m else None


def read_l4t_release(path: Path = L4T_RELEASE_FILE) -> str | None:
    try:
        return parse_l4t_release(path.read_text(errors="replace"))
    except OSError:
        return None


def collect_machine_info(device: int = 0) -> MachineInfo:
    """Versions and GPU of this machine (needs tensorrt and cuda-python; call after the probe)."""
    from molmo_runtime import cuda_api

    trt = importlib.import_module("tensorrt")
    major, minor = cuda_api.compute_capability(device)
    return MachineInfo(
        trt_version=str(trt.__version__),
        cuda_runtime_version=cuda_api.runtime_version(),
        cuda_driver_version=cuda_api.driver_version(),
        gpu_name=cuda_api.device_name(device),
        compute_capability=f"{major}.{minor}",
        l4t=read_l4t_release(),
    )


# -- what is missing -------------------------------------------------------------------------------

def tensorrt_version() -> str | None:
    """tensorrt.__version__, or None when the module is absent or does not load.

    A `tensorrt` folder holding only type stubs (tensorrt-stubs) imports as an empty namespace
    package without __version__: that is "no tensorrt" too.
    """
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        version = getattr(importlib.import_module("tensorrt"), "__version__", None)
    except Exception:  # a broken install (missing libnvinfer) is "no tensorrt" to the user
        return None
    return str(version) if version is not None else None


def _gpu_reason() -> str:
    """Empty when a CUDA GPU is usable, else why not."""
    if importlib.util.find_spec("cuda") is None:
        return "no cuda-python module"
    from molmo_runtime import cuda_api

    return cuda_api.probe_gpu().reason


def missing_for_tensorrt(
    trt_version: Callable[[], str | None] = tensorrt_version,
    gpu_reason: Callable[[], str] = _gpu_reason,
) -> list[str]:
    """What this machine lacks for TensorRT engines; empty when nothing. Probes are injectable."""
    missing = []
    version = trt_version()
    if version is None:
        missing.append("no tensorrt module")
    elif not supported_tensorrt(version):
        missing.append(f"tensorrt {version} (need {supported_range()})")
    reason = gpu_reason()
    if reason:
        missing.append(reason)
    return missing


def supported_tensorrt(version: str) -> bool:
    """Whether a tensorrt.__version__ is in the supported range [MIN_TENSORRT, MAX_TENSORRT)."""
    v = parse_version(version)[:2]
    return len(v) == 2 and MIN_TENSORRT <= v < MAX_TENSORRT


def supported_range() -> str:
    lo, hi = (".".join(map(str, v)) for v in (MIN_TENSORRT, MAX_TENSORRT))
    return f">= {lo}, < {hi}"


def missing_message(what: str, missing: list[str]) -> str:
    """One line: what needs what, how to get it, and what this machine lacks."""
    return (f"{what} needs an NVIDIA GPU with TensorRT {supported_range()} and cuda-python "
            f"({GETTING_TENSORRT}); this machine has " + ", ".join(missing))


# -- build records ---------------------------------------------------------------------------------

def _cuda_major(v: str) -> int | None:
    parts = parse_version(v)
    return parts[0] if parts else None


def check_build_record(record: Mapping[str, Any], machine: MachineInfo,
                       source_sha256: str | None = None) -> list[str]:
    """Every way an engine's build record disagrees with this machine (empty = usable).

    Compared exactly: TensorRT version (plans are tied to the exact version), GPU name and
    compute capability (kernels are chosen per GPU), Jetson L4T release. CUDA: major version
    only. source_sha256: the hash of the ONNX file the manifest lists now; an engine built from
    another graph is stale.
    """
    problems = []

    def differs(key: str, here: object, label: str) -> None:
        built = record.get(key)
        if built != here:
            problems.append(f"{label}: engine built with {built!r}, this machine has {here!r}")

    differs("trt_version", machine.trt_version, "TensorRT version")
    differs("gpu_name", machine.gpu_name, "GPU")
    differs("compute_capability", machine.compute_capability, "compute capability")
    if record.get("l4t") != machine.l4t:
        differs("l4t", machine.l4t, "Jetson L4T release")
    built_cuda = _cuda_major(str(record.get("cuda_runtime_version", "")))
    if built_cuda != _cuda_major(machine.cuda_runtime_version):
        problems.append(f"CUDA major version: engine built with CUDA "
                        f"{record.get('cuda_runtime_version')!r}, this machine has "
                        f"{machine.cuda_runtime_version!r}")
    if source_sha256 is not None and record.get("source_onnx_sha256") != source_sha256:
        problems.append(f"source graph {record.get('source_onnx', '?')} changed since the engine "
                        "was built (sha256 differs)")
    return problems


def require_matching_engines(engines: Mapping[str, Mapping[str, Any]], machine: MachineInfo,
                             files: Mapping[str, Mapping[str, Any]], artifact_dir: str) -> None:
    """Raise EngineMismatchError listing every mismatch of every engine, with the rebuild command.

    engines: manifest["engines"]; files: manifest["files"] (for the current source hashes).
    """
    problems = []
    target = "trt-fp16"
    for graph, record in sorted(engines.items()):
        target = str(record.get("target", target))
        source = files.get(str(record.get("source_onnx", "")))
        sha = str(source["sha256"]) if source else None
        problems += [f"{graph}: {p}" for p in check_build_record(record, machine, sha)]
    if problems:
        raise EngineMismatchError(
            f"the TensorRT engines in {artifact_dir} do not match this machine:\n  "
            + "\n  ".join(problems) + "\n"
            + REBUILD_HINT.format(target=target, out=artifact_dir))
