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
import shutil
from collections.abc import Callable, Mapping
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
                    keep_fp32: str | os.PathLike[str] | None = None,
                    stream: bool | None = None, dtype: str = "fp32",
                    log: Callable[[str], None] = print,
                    trt_options: Mapping[str, Any] | None = None,
                    decoder: str = "auto") -> Path:
    """Export `model` (a checkpoint directory or a preset name such as "demo") for `target`.

    Returns the artifact directory. See the README for what each target produces. The output
    folder is locked for the whole run (a second writer fails at once). A quantized target
    builds its fp32 intermediate inside OUT's work area and removes it, or keeps it in
    `keep_fp32` (a new or empty folder, or an artifact to replace); only `out` is written.
    trt_options: keyword arguments of molmo_export.trt.build_engines (max_prompt_len,
    workspace_gb, timing_cache, builder_optimization_level) for trt-* targets.
    stream: build the graphs without loading the model (molmo_export.export.streaming); None
    chooses it for checkpoints above STREAM_ABOVE_BYTES and for dtype "fp16".
    decoder: "auto" gives the ort-* targets the decoder made for ONNX Runtime where the model
    allows it (docs/fused_decoder.md); "portable" keeps the plain-op decoder everywhere.
    """
    from molmo_export.export.artifact_dir import WORK, OutputLock

    check_target(target)
    if decoder not in DECODER_CHOICES:
        raise MolmoError(f"--decoder {decoder!r}: choose one of {', '.join(DECODER_CHOICES)}")
    fused = decoder == "auto" and target in FUSED_TARGETS and not from_onnx
    out = Path(out)
    quantized = target in QUANTIZED_TARGETS
    if keep_fp32 is not None and not quantized:
        raise MolmoError(f"--keep-fp32 keeps the fp32 intermediate of a quantized target; "
                         f"--target {target} has none")
    if from_onnx and not target.startswith("trt-"):
        raise MolmoError("--from-onnx builds TensorRT engines from an existing artifact; "
                         "use it with --target trt-fp16 or trt-int8")
    if not from_onnx and _streams(model, stream, dtype):
        if keep_fp32 is not None:
            raise MolmoError("--keep-fp32: a streaming export writes no fp32 intermediate")
        from molmo_export.export.streaming import export_streaming_artifact

        # verification loads the PyTorch model: only when streaming was asked for, not chosen
        # because the model is too big to load
        return export_streaming_artifact(model, out, target=target, dtype=dtype,
                                         max_crops=max_crops, max_seq_len=max_seq_len,
                                         opset=opset, force=force, verify=verify and bool(stream),
                                         progress=progress, fused=fused,
                                         calibration_set=calibration_set,
                                         allow_degraded=allow_degraded, log=log)
    if dtype != "fp32":
        raise MolmoError(f"--dtype {dtype} needs the streaming exporter (drop --no-stream)")
    with OutputLock(out):
        if not from_onnx:
            from molmo_export.export.onnx_export import export_onnx_artifact

            fp32_out = Path(keep_fp32) if keep_fp32 is not None else \
                out / WORK / "fp32" if quantized else out
            try:
                # a fused fp32 artifact is verified against PyTorch after the swap, below
                export_onnx_artifact(model, fp32_out, target="onnx" if quantized else target,
                                     max_crops=max_crops, max_seq_len=max_seq_len, opset=opset,
                                     force=force, verify=verify and not (fused and not quantized),
                                     progress=progress, log=log)
                if quantized:
                    from molmo_calibration import quantize_artifact

                    quantize_artifact(fp32_out, out, target=QUANTIZED_TARGETS[target],
                                      calibration_set=calibration_set,
                                      allow_degraded=allow_degraded, progress=progress,
                                      force=force, log=log)
            finally:
                if quantized and keep_fp32 is None:
                    shutil.rmtree(out / WORK, ignore_errors=True)
            if fused:
                _fuse(model, out, verify and not quantized, log)
        if target.startswith("trt-"):
            from molmo_export.trt.builder import build_engines

            build_engines(out, target, progress=progress, **dict(trt_options or {}))
    return out


# Checkpoints above this are exported by streaming (the in-memory path holds an fp32 copy of the
# weights, 2x a bf16 checkpoint, plus the largest graph: about 4x the checkpoint's bytes).
STREAM_ABOVE_BYTES = 4 << 30


def _streams(model: str | os.PathLike[str], stream: bool | None, dtype: str) -> bool:
    if stream is not None:
        return stream
    return dtype != "fp32" or too_big_to_load(model)


def too_big_to_load(model: str | os.PathLike[str]) -> bool:
    """A checkpoint over STREAM_ABOVE_BYTES (presets never are)."""
    from molmo_export.config import RANDOM_WEIGHT_PRESETS

    if str(model) in RANDOM_WEIGHT_PRESETS or not Path(model).is_dir():
        return False
    from molmo_export.export.streaming import checkpoint_bytes

    return checkpoint_bytes(Path(model)) > STREAM_ABOVE_BYTES


def _fuse(model: str | os.PathLike[str], out: Path, verify: bool,
          log: Callable[[str], None]) -> None:
    from molmo_export.export.fused_artifact import fuse_decoder
    from molmo_export.export.onnx_export import resolve_checkpoint
    from molmo_export.export.tensor_source import CheckpointTensors

    manifest = fuse_decoder(out, CheckpointTensors(resolve_checkpoint(model)), log=log)
    if verify and manifest.decoder_flavour == "ort":
        from molmo_export.verify import verify_artifact

        verify_artifact(out, model, log=log)


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
