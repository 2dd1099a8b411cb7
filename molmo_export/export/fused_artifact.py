"""Give an ONNX Runtime artifact the fused decoder (flavour "ort") in place of the portable one.

    artifact (fp32 or quantized, portable decoder) + checkpoint
      ─► build the fused decoder of the same precision from the checkpoint, one tensor at a time
      ─► check it against the portable decoder it replaces (same inputs, prefill + decode steps)
      ─► manifest: decoder_flavour "ort", the decoder's spec, the check's numbers (written last)

Models the contrib ops cannot express exactly (ort_decoder.unsupported_reason: 7B-O, MolmoE)
keep the portable decoder, and the manifest says why (`decoder_flavour_note`).
The quantized targets keep their quality report: it was measured with the portable decoder, and
the fused one holds the same quantized weights (the check below bounds what differs).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from molmo_export.export.artifact_dir import ArtifactWriter
from molmo_export.export.ort_decoder import build_fused_decoder, unsupported_reason
from molmo_export.export.tensor_source import CheckpointTensors, TensorSource
from molmo_runtime.errors import MolmoError
from molmo_runtime.graph_io import DECODER, decoder_spec
from molmo_runtime.manifest import MANIFEST_NAME, Manifest, load_manifest
from molmo_runtime.tolerances import TABLE

# manifest precision of the decoder -> ort_decoder.PRECISIONS key
PRECISION_KEY = {"fp32": "fp32", "int8-weight-only-nbits": "int8", "int4-weight-only-nbits": "int4"}


def graph_files(manifest: Manifest, graph: str) -> list[str]:
    """Artifact-relative paths of a graph file and its external data files."""
    rel = manifest.graphs[graph].file
    model = onnx.load(str(manifest.path(rel)), load_external_data=False)
    folder = Path(rel).parent
    data = {(folder / e.value).as_posix() for t in model.graph.initializer
            for e in t.external_data if e.key == "location"}
    return [rel, *sorted(data)]


def fuse_decoder(artifact_dir: str | os.PathLike[str], source: TensorSource | None = None, *,
                 log: Callable[[str], None] = print) -> Manifest:
    """Replace the artifact's portable decoder by the fused one (see the module docstring)."""
    manifest = load_manifest(artifact_dir, verify="size")
    if source is None:
        from molmo_export.export.onnx_export import resolve_checkpoint

        source = CheckpointTensors(resolve_checkpoint(manifest.raw["model"]["source"]))
    writer = ArtifactWriter(manifest.directory)
    try:
        reason = unsupported_reason(source.config.text)
        raw = _manifest_base(manifest)
        if reason is None:
            decoder_precision = str(manifest.raw.get("precision", {}).get(DECODER, "fp32"))
            if decoder_precision not in PRECISION_KEY:
                raise MolmoError(f"no fused decoder for a {decoder_precision} decoder")
            old = graph_files(manifest, DECODER)
            _link_files(manifest, writer.staging, skip=set(old))
            spec = decoder_spec(manifest.dims, "ort")
            build_fused_decoder(source, manifest.dims, PRECISION_KEY[decoder_precision],
                                writer.path(spec.file))
            check = compare_decoders(manifest.path(old[0]), writer.path(spec.file),
                                     manifest, PRECISION_KEY[decoder_precision])
            log(f"fused decoder vs portable ({decoder_precision}): " + ", ".join(
                f"{k} {v:.2e}" for k, v in check.items() if isinstance(v, float)))
            raw.update(decoder_flavour="ort", decoder_check=check,
                       graphs={**raw["graphs"], DECODER: spec.to_dict()})
        else:
            _link_files(manifest, writer.staging, skip=set())
            log(f"note: keeping the portable decoder: {reason}")
            raw.update(decoder_flavour="portable", decoder_flavour_note=reason)
        result = writer.commit(raw)
    except BaseException:
        writer.abort()
        raise
    return load_manifest(result.parent, verify="none")


def _manifest_base(manifest: Manifest) -> dict[str, Any]:
    return {k: v for k, v in manifest.raw.items()
            if k not in ("files", "schema_version", "format")}


def _link_files(manifest: Manifest, staging: Path, skip: set[str]) -> None:
    for rel in manifest.files:
        if rel == MANIFEST_NAME or rel in skip:
            continue
        dest = staging / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(manifest.path(rel), dest)  # artifact files are replaced, never edited
        except OSError:
            shutil.copy2(manifest.path(rel), dest)


def decoder_view(manifest: Manifest, path: Path, flavour: str) -> Manifest:
    """`manifest` with only a decoder graph: the file `path` (and its external data beside
    it), read as graph_io's `flavour`. For tools that run one decoder file through the
    runtime's ORT backend (the check below, benchmarks) without copying it into an artifact."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    data = {e.value for t in model.graph.initializer for e in t.external_data
            if e.key == "location"}
    spec = {**decoder_spec(manifest.dims, flavour).to_dict(), "file": path.name}
    return Manifest(path.parent, {**manifest.raw, "graphs": {DECODER: spec},
                                  "files": {rel: {} for rel in (path.name, *sorted(data))},
                                  "decoder_flavour": flavour})


def compare_decoders(portable: Path, fused: Path, manifest: Manifest, precision: str,
                     threads: int = 2, seed: int = 0) -> dict[str, Any]:
    """Run both decoders on the same random inputs: a left-padded batch of 2 (prefill of 12
    positions) then 4 decode steps, each decoder with its own cache convention.

    -> max |Δ logits| over all steps, the largest |logits|, and the bound from the tolerance
    table; raises MolmoError when the difference exceeds it."""
    from molmo_runtime.backends.ort import OrtBackend

    dims = manifest.dims
    rng = np.random.default_rng(seed)
    batch, prompt, steps = 2, 12, 4
    embeds = rng.standard_normal((batch, prompt + steps, dims.d_model), np.float32)
    mask = np.ones((batch, prompt + steps), np.int64)
    mask[1, :3] = 0  # row 1: 3 positions of left padding
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    logits = []
    for path, flavour in ((portable, "portable"), (fused, "ort")):
        backend = OrtBackend(decoder_view(manifest, path, flavour),
                             providers=["CPUExecutionProvider"], threads=threads,
                             graphs=(DECODER,))
        backend.start(batch)
        out = [backend.decode(embeds[:, :prompt], mask[:, :prompt], positions[:, :prompt])]
        for t in range(prompt, prompt + steps):
            out.append(backend.decode(embeds[:, t:t + 1], mask[:, :t + 1],
                                      positions[:, t:t + 1]))
        backend.close()
        logits.append(np.stack(out))
    diff = float(np.abs(logits[0].astype(np.float64) - logits[1]).max())
    scale = float(np.abs(logits[0]).max())
    tol = TABLE[f"fused/logits_vs_portable_{precision}"]
    bound = tol.atol + tol.rtol * scale
    same_top1 = bool((logits[0].argmax(-1) == logits[1].argmax(-1)).all())
    if not diff <= bound:
        raise MolmoError(f"the fused decoder differs from the portable one by {diff:.3e} in the "
                         f"logits (bound {bound:.3e}, {tol.reason}); not writing it")
    return {"max_abs_logits": diff, "max_logits": scale, "bound": bound,
            "same_top1": same_top1, "case": f"batch {batch} (one row left-padded by 3), "
                                             f"prefill {prompt}, {steps} decode steps"}
