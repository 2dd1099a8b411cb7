"""The early check of `--target trt-*`: stop before any work when TensorRT cannot run here.

The exporter CLI calls `require_tensorrt(target)` first, so a machine without an NVIDIA GPU or
TensorRT gets one line saying what is missing and how to get it, and nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable

from molmo_runtime.errors import MissingDependencyError
from molmo_runtime.trt_env import missing_for_tensorrt, missing_message

TRT_TARGETS = ("trt-fp16", "trt-int8")


def tensorrt_missing(probe: Callable[[], list[str]] = missing_for_tensorrt) -> list[str]:
    """What this machine lacks for building/running engines (empty when nothing)."""
    return probe()


def require_tensorrt(target: str = "trt-fp16",
                     probe: Callable[[], list[str]] = missing_for_tensorrt) -> None:
    """Raise MissingDependencyError (one line) unless TensorRT 10.3 to 11.x, cuda-python and a GPU exist."""
    missing = probe()
    if missing:
        raise MissingDependencyError(missing_message(f"--target {target}", missing))
