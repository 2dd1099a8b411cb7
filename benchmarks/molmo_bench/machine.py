"""What the numbers were measured on: CPU, cores, memory, library versions, GPU; peak memory.

Torch-free: library versions come from package metadata, never from importing the library.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

# Packages whose versions change the numbers (distribution names as pip knows them).
LIBRARIES = ("molmo-export", "numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch",
             "tensorrt", "cuda-python", "tokenizers", "pillow")


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _cpuinfo() -> dict[str, str]:
    """First processor block of /proc/cpuinfo (Linux), else empty."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def physical_cores() -> int:
    """The count the ORT backend uses for its threads (psutil where installed)."""
    from molmo_runtime.backends.ort import physical_cores as ort_physical_cores

    return ort_physical_cores()


def total_memory_gb() -> float | None:
    try:
        import psutil  # type: ignore[import-untyped, unused-ignore]

        return round(float(psutil.virtual_memory().total) / 2**30, 1)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return out.stdout.strip() or None


def gpu_info() -> list[dict[str, str]]:
    """One entry per NVIDIA GPU that nvidia-smi lists (empty without a GPU or driver)."""
    out = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                "--format=csv,noheader"])
    gpus = []
    for line in (out or "").splitlines():
        name, driver, memory = (s.strip() for s in (line.split(",") + ["", ""])[:3])
        gpus.append({"name": name, "driver": driver, "memory_total": memory})
    return gpus


def jetpack_release() -> str | None:
    """L4T release line of a Jetson (/etc/nv_tegra_release), None elsewhere."""
    try:
        return Path("/etc/nv_tegra_release").read_text().splitlines()[0].strip("# ").strip()
    except (OSError, IndexError):
        return None


def ort_providers() -> list[str] | None:
    try:
        import onnxruntime as ort  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return None
    return list(ort.get_available_providers())


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the machine was (a noise indicator)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    cpu = _cpuinfo()
    flags = cpu.get("flags", "").split()
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "neon",
                        "asimd") if f in flags or f in cpu.get("Features", "").split()]
    return {
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores(),
        "virtualized": "hypervisor" in flags,
        "simd": simd,
        "memory_gb": total_memory_gb(),
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "libraries": {lib: v for lib in LIBRARIES if (v := _version(lib)) is not None},
        "ort_providers": ort_providers(),
        "gpus": gpu_info(),
        "jetpack_l4t": jetpack_release(),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    try:
        import resource
    except ImportError:  # Windows
        import psutil  # type: ignore[import-untyped, unused-ignore]

        return float(psutil.Process().memory_info().peak_wset) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def gpu_memory_used_mb(pid: int | None = None) -> float | None:
    """GPU memory this process holds now, per nvidia-smi (None without a GPU)."""
    out = _run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                "--format=csv,noheader,nounits"])
    if out is None:
        return None
    pid = os.getpid() if pid is None else pid
    used = 0.0
    for line in out.splitlines():
        fields = [s.strip() for s in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid):
            try:
                used += float(fields[1])
            except ValueError:
                continue
    return used
