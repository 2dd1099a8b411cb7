"""molmo_runtime: run exported Molmo artifacts with numpy, Pillow, tokenizers and ONNX Runtime or
TensorRT. Never imports torch (tests/test_torch_free.py proves it)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Lazy public names: importing the package stays cheap and never pulls a backend.
_LAZY = {
    "MolmoImageProcessor": "molmo_runtime.image_processing",
    "MolmoProcessor": "molmo_runtime.processing",
    "MolmoPipeline": "molmo_runtime.pipeline",
    "GenerationResult": "molmo_runtime.pipeline",
    "parse_points": "molmo_runtime.points",
    "load_manifest": "molmo_runtime.manifest",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'molmo_runtime' has no attribute {name!r}")
