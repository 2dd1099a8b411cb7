"""The runtime and calibration packages (and molmo_export's top level and TensorRT builder) must
never import torch: a Jetson runs them without PyTorch."""

from __future__ import annotations

import subprocess
import sys

import pytest

MODULES = [
    "molmo_runtime",
    "molmo_runtime.pipeline",
    "molmo_runtime.processing",
    "molmo_runtime.image_processing",
    "molmo_runtime.points",
    "molmo_runtime.backends.ort",
    "molmo_runtime.backends.trt",
    "molmo_runtime.cli",
    "molmo_calibration",
    "molmo_export",
    "molmo_export.config",
    "molmo_export.export",
    "molmo_export.trt",
    "molmo_triton",
    "molmo_triton.server",
    "molmo_triton.client",
    "molmo_triton.cli",
]


@pytest.mark.parametrize("module", MODULES)
def test_import_does_not_load_torch(module: str) -> None:
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"importing {module} loaded torch: {proc.stdout}{proc.stderr}"
