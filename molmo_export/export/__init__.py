"""export_artifact: checkpoint (or built-in preset) -> artifact directory for one --target.

    load model ─► vision_encoder.onnx ─► connector.onnx ─► decoder.onnx ─► embed_tokens.npy
      ─► tokenizer/ + processor.json ─► manifest.json ─► verify (ORT vs PyTorch)
      ─► [ort-int8 / ort-int4 / trt-int8: molmo_calibration]  ─► [trt-*: engines/*.plan]
      ─► [ort-*: the decoder made for ONNX Runtime replaces the portable one (fused_artifact)]

Importing this module does not import torch: `--from-onnx` (building TensorRT engines on the
target device from an existing artifact) works on machines without PyTorch.
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from molmo_runtime.errors import MolmoError

TARGETS = ("onnx", "ort-fp32", "ort-int8", "ort-int4", "trt-fp16", "trt-int8")
FUSED_TARGETS = ("ort-fp32", "ort-int8", "ort-int4")  # get graph_io's "ort" decoder flavour
DECODER_CHOICES = ("auto", "portable")
QUANTIZED_TARGETS = {"ort-int8": "ort-int8", "ort-int4": "ort-int4", "trt-int8": "trt-int8-qdq"}


def default_target() -> str:
    """trt-fp16 where TensorRT and a GPU are present, else ort-fp32."""
    from molmo_export.trt.availability import tensorrt_missing

    return "ort-fp32" if tensorrt_missing() else "trt-fp16"


def check_target(target: str) -> None:
    """Fail before any work if the target cannot be built on this machine."""
    if target not in TARGETS:
        raise MolmoError(f"unknown --target {target!r}; choose one of {', '.join(TARGETS)}")
    if target.startswith("trt-"):
        from molmo_export.trt.availability import require_tensorrt

        require_tensorrt(target)


def export_artifact(model: str | os.PathLike[str] = "demo", target: str = "ort-fp32",
                    out: str | os.PathLike[str] = "out/demo", *, max_crops: int = 12,
                    max_seq_len: int | None = None, opset: int | None = None,
                    force: bool = False, verify: bool = True, from_onnx: bool = False,
                    calibration_set: str | os.PathLike[str] = "default",
                    allow_degraded: bool = False, progress: bool = True,
                    decoder: str = "auto", log: Callable[[str], None] = print) -> Path:
    """Export `model` (a checkpoint directory or a preset name such as "demo") for `target`.

    Returns the artifact directory. See the README for what each target produces.
    decoder: "auto" gives the ort-* targets the decoder made for ONNX Runtime where the model
    allows it (docs/fused_decoder.md); "portable" keeps the plain-op decoder everywhere.
    """
    check_target(target)
    if decoder not in DECODER_CHOICES:
        raise MolmoError(f"--decoder {decoder!r}: choose one of {', '.join(DECODER_CHOICES)}")
    fused = decoder == "auto" and target in FUSED_TARGETS and not from_onnx
    out = Path(out)
    if from_onnx:
        if not target.startswith("trt-"):
            raise MolmoError("--from-onnx builds TensorRT engines from an existing artifact; "
                             "use it with --target trt-fp16 or trt-int8")
    else:
        from molmo_export.export.onnx_export import export_onnx_artifact

        quantized = target in QUANTIZED_TARGETS
        # Quantized targets start from an fp32 artifact written beside the final one.
        fp32_out = out.with_name(out.name + "-fp32") if quantized else out
        # a fused fp32 artifact is verified against PyTorch after the swap, below
        export_onnx_artifact(model, fp32_out, target="onnx" if quantized else target,
                             max_crops=max_crops, max_seq_len=max_seq_len, opset=opset,
                             force=force, verify=verify and not (fused and not quantized),
                             progress=progress, log=log)
        if quantized:
            from molmo_calibration import quantize_artifact

            quantize_artifact(fp32_out, out, target=QUANTIZED_TARGETS[target],
                              calibration_set=calibration_set, allow_degraded=allow_degraded,
                              progress=progress, force=force, log=log)
        if fused:
            from molmo_export.export.fused_artifact import fuse_decoder
            from molmo_export.export.onnx_export import resolve_checkpoint
            from molmo_export.export.tensor_source import CheckpointTensors

            manifest = fuse_decoder(out, CheckpointTensors(resolve_checkpoint(model)), log=log)
            if verify and not quantized and manifest.decoder_flavour == "ort":
                from molmo_export.verify import verify_artifact

                verify_artifact(out, model, log=log)
    if target.startswith("trt-"):
        from molmo_export.trt.builder import build_engines

        build_engines(out, target, progress=progress)
    return out


def export_environment() -> dict[str, Any]:
    """Versions that produced an artifact (recorded in the manifest; not part of the hash)."""
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "platform": platform.platform(terse=True),
            **{pkg: version(pkg) for pkg in ("molmo-export", "torch", "onnx", "onnxscript",
                                             "onnxruntime", "numpy")}}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
