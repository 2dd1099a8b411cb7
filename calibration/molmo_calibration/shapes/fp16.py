"""The fp16 graphs TensorRT builds from, run in ONNX Runtime: their task accuracy is measured
like any target's (`molmo-eval ARTIFACT --fp16`), so the fp16 conversion is checked on the task,
not only on logits. Torch-free; needs onnx.

The graphs are converted exactly as `molmo_export.trt.builder` converts them before building
an engine (same function, same default settings; the decoder's KV cache I/O becomes fp16), into
a scratch folder beside links to the artifact's other files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from molmo_runtime.manifest import Manifest, load_manifest


def fp16_manifest(artifact_dir: str | os.PathLike[str], workdir: str | os.PathLike[str],
                  log: Any = None) -> Manifest:
    """A manifest over `workdir` whose graphs are the fp16 conversions of the artifact's fp32
    graphs; every other file the manifest names is linked (or copied) from the artifact."""
    from molmo_export.trt.builder import BuildSettings, fp16_onnx

    src = load_manifest(artifact_dir)
    if any(p != "fp32" for p in src.raw.get("precision", {}).values()):
        raise ValueError(f"{src.directory}: the fp16 graphs are made from an fp32 artifact "
                         f"(this one is {src.target})")
    work = Path(workdir)
    graph_files = {spec.file for spec in src.graphs.values()}
    for rel in src.files:
        if rel in graph_files or rel.startswith(tuple(f + "." for f in graph_files)):
            continue  # graphs (and their external data) are converted below
        dest = work / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src.path(rel), dest)
        except OSError:
            import shutil

            shutil.copyfile(src.path(rel), dest)
    settings = BuildSettings()
    for name, spec in src.graphs.items():
        dest = work / spec.file
        dest.parent.mkdir(parents=True, exist_ok=True)
        report = fp16_onnx(src.path(spec.file), dest, spec, settings.fp32_residual)
        if log is not None:
            log(f"{name}: fp16 graph ({report.summary()})")
    from molmo_calibration.shapes.gate import manifest_over

    raw = {k: v for k, v in src.raw.items() if k != "files"}
    raw["precision"] = {name: "fp16" for name in src.graphs}
    return manifest_over(work, raw)


def fp16_pipeline(artifact_dir: str | os.PathLike[str], workdir: str | os.PathLike[str],
                  threads: int | None = None) -> Any:
    """A MolmoPipeline (ONNX Runtime) over the fp16 graphs of an fp32 artifact."""
    from molmo_runtime.backends.ort import OrtBackend
    from molmo_runtime.pipeline import MolmoPipeline
    from molmo_runtime.processing import MolmoProcessor

    manifest = fp16_manifest(artifact_dir, workdir)
    return MolmoPipeline(manifest, OrtBackend(manifest, threads=threads),
                         MolmoProcessor.from_pretrained(manifest.directory))
