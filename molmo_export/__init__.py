"""molmo_export: the PyTorch reference Molmo, checkpoint loading, ONNX export, verification and
TensorRT engine building.

Importing this package does not import torch: the configs and the engine builder are torch-free
(engines are built on the target device, which need not have PyTorch). The model classes load
torch on first use.
"""

from __future__ import annotations

from typing import Any

from molmo_export.config import (
    PRESETS,
    MolmoConfig,
    MolmoPoolingConfig,
    MolmoSpecialTokens,
    MolmoTextConfig,
    MolmoVisionConfig,
    get_preset,
)

__version__ = "0.1.0"

_LAZY = {
    "MolmoVisionModel": "molmo_export.model",
    "MolmoConnector": "molmo_export.model",
    "MolmoTextModel": "molmo_export.model",
    "MolmoForCausalLM": "molmo_export.model",
    "MolmoForConditionalGeneration": "molmo_export.model",
}

__all__ = [
    "PRESETS", "MolmoConfig", "MolmoPoolingConfig", "MolmoSpecialTokens", "MolmoTextConfig",
    "MolmoVisionConfig", "get_preset", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        from molmo_runtime.errors import require

        require("torch", "export", f"molmo_export.{name}")
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'molmo_export' has no attribute {name!r}")
