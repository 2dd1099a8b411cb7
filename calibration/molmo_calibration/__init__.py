"""molmo_calibration: calibration sets, INT8/INT4 quantization of exported Molmo graphs, and the
quality report that says how far a quantized artifact is from fp32. Never imports torch.

    from molmo_calibration import quantize_artifact
    report = quantize_artifact("out/demo-fp32", "out/demo-int8", target="ort-int8")
    print(report.to_markdown())
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "quantize_artifact": "molmo_calibration.quantize",
    "quantize_prepared": "molmo_calibration.quantize",
    "QualityReport": "molmo_calibration.report",
    "QualityError": "molmo_calibration.report",
    "QualityWarning": "molmo_calibration.report",
    "Thresholds": "molmo_calibration.report",
    "CalibrationSet": "molmo_calibration.calibration_set",
    "load_calibration_set": "molmo_calibration.calibration_set",
    "write_set_manifest": "molmo_calibration.calibration_set",
    "RECIPES": "molmo_calibration.recipes",
    "TARGETS": "molmo_calibration.recipes",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'molmo_calibration' has no attribute {name!r}")
