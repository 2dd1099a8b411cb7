"""Checkpoint -> fp32 ONNX artifact (three graphs, embeddings, tokenizer, processor, manifest)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from molmo_export import __version__
from molmo_export.config import BUILTIN_PRESETS, MolmoConfig
from molmo_export.export import export_environment, utc_now
from molmo_export.export.artifact_dir import ArtifactWriter
from molmo_export.export.graphs import ConnectorGraph, DecoderGraph, VisionEncoderGraph
from molmo_export.export.onnx_graph import DEFAULT_OPSET, export_graph
from molmo_export.model import MolmoForConditionalGeneration
from molmo_runtime.errors import MolmoError
from molmo_runtime.fileio import atomic_path
from molmo_runtime.graph_io import (
    CONNECTOR,
    DECODER,
    VISION_ENCODER,
    GraphDims,
    all_graph_specs,
)

EMBED_FILE = "embed_tokens.npy"


def resolve_checkpoint(model: str | os.PathLike[str]) -> Path:
    """A checkpoint directory, or a built-in preset materialised as one."""
    if str(model) in BUILTIN_PRESETS:
        from molmo_export.demo import materialize_preset

        return materialize_preset(str(model))
    path = Path(model)
    if not path.is_dir():
        raise MolmoError(f"--model {model}: no such directory; pass a Molmo checkpoint folder "
                         f"(config.json + *.safetensors) or one of: "
                         f"{', '.join(BUILTIN_PRESETS)}")
    return path


def graph_dims(config: MolmoConfig, max_crops: int, max_seq_len: int) -> GraphDims:
    v, t = config.vision, config.text
    pooled = (v.grid_size // config.pooling.pool_h) * (v.grid_size // config.pooling.pool_w)
    return GraphDims(patches_per_crop=v.num_patches, patch_dim=v.patch_dim,
                     vision_feature_dim=v.feature_dim, tokens_per_crop=pooled,
                     d_model=t.hidden_size, num_layers=t.num_layers,
                     num_kv_heads=t.num_kv_heads, head_dim=t.head_dim,
                     vocab_rows=t.embedding_size, max_crops=max_crops, max_seq_len=max_seq_len)


def check_max_crops(max_crops: int) -> None:
    if not 1 <= max_crops <= 12:
        raise MolmoError(f"--max-crops {max_crops}: Molmo tiles an image into 1..12 crops")


def checked_max_seq_len(config: MolmoConfig, max_seq_len: int | None) -> int:
    """--max-seq-len, defaulting to (and at most) the model's positions."""
    positions = config.text.max_position_embeddings
    if max_seq_len is not None and max_seq_len > positions:
        raise MolmoError(f"--max-seq-len {max_seq_len} exceeds the model's {positions} positions")
    return max_seq_len or positions


def write_embeddings(model: MolmoForConditionalGeneration, path: Path) -> None:
    table = model.language_model.model.embed_tokens
    weight = table.weight if hasattr(table, "weight") else table
    save_embeddings(weight.detach().to(torch.float32).cpu().numpy(), path)  # a view, no copy


def save_embeddings(table: np.ndarray, path: Path) -> None:
    """embed_tokens.npy: the float32 [rows, D] table the runtime gathers rows from (mmap)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, table)


def artifact_manifest(config: MolmoConfig, source: str, target: str, precision: dict[str, str],
                      opset: int, dims: GraphDims, specs: dict[str, Any], max_crops: int,
                      max_seq_len: int, has_tokenizer: bool, staged: list[str]
                      ) -> dict[str, Any]:
    """The manifest fields every exported artifact has (files are added at commit)."""
    return {
        "exporter_version": __version__,
        "created_utc": utc_now(),
        "model": {"name": config.name, "source": source, "config": config.to_dict()},
        "target": target,
        "precision": precision,
        "opset": opset,
        "dims": dims.to_dict(),
        "graphs": {name: _graph_entry(spec.to_dict(), staged) for name, spec in specs.items()},
        "special_tokens": dict(vars(config.tokens)),
        "max_crops": max_crops,
        "max_seq_len": max_seq_len,
        "has_tokenizer": has_tokenizer,
        "environment": export_environment(),
    }


def write_processor_files(checkpoint: Path, staging: Path, max_crops: int,
                          log: Callable[[str], None]) -> bool:
    """tokenizer/ + processor.json. Returns False when the checkpoint has no tokenizer."""
    from molmo_runtime.image_processing import MolmoImageProcessor
    from molmo_runtime.processing import MolmoProcessor

    try:
        processor = MolmoProcessor.from_pretrained(checkpoint, max_crops=max_crops)
    except FileNotFoundError:
        log(f"note: {checkpoint} has no tokenizer files; the artifact runs from token ids "
            "only (generate_from_inputs), not from prompts")
        MolmoImageProcessor(max_crops=max_crops).save_to_artifact(staging)
        return False
    processor.save_to_artifact(staging)
    return True


def export_onnx_artifact(model: str | os.PathLike[str], out: str | os.PathLike[str], *,
                         target: str = "onnx", max_crops: int = 12,
                         max_seq_len: int | None = None, opset: int | None = None,
                         force: bool = False, verify: bool = True, progress: bool = True,
                         log: Callable[[str], None] = print) -> Path:
    from tqdm.auto import tqdm

    check_max_crops(max_crops)
    checkpoint = resolve_checkpoint(model)
    writer = ArtifactWriter(out, force=force)
    steps = tqdm(total=6, desc="molmo-export", unit="step", disable=not progress)
    try:
        steps.set_postfix_str("loading checkpoint")
        ref = MolmoForConditionalGeneration.from_pretrained(checkpoint).eval()
        config = ref.config
        max_seq_len = checked_max_seq_len(config, max_seq_len)
        dims = graph_dims(config, max_crops, max_seq_len)
        specs = all_graph_specs(dims)
        steps.update()
        adapters = {VISION_ENCODER: VisionEncoderGraph(ref), CONNECTOR: ConnectorGraph(ref),
                    DECODER: DecoderGraph(ref)}
        for name, adapter in adapters.items():
            steps.set_postfix_str(f"exporting {name}")
            export_graph(adapter, specs[name], writer.path(specs[name].file),
                         opset or DEFAULT_OPSET)
            steps.update()
        steps.set_postfix_str("embeddings, tokenizer")
        write_embeddings(ref, writer.path(EMBED_FILE))
        has_tokenizer = write_processor_files(checkpoint, writer.staging, max_crops, log)
        steps.update()
        manifest = artifact_manifest(
            config, str(model), target, {name: "fp32" for name in specs}, opset or DEFAULT_OPSET,
            dims, specs, max_crops, max_seq_len, has_tokenizer, writer.staged_files())
        writer.stage_manifest(manifest)
        manifest["verification"] = _verify_staged(writer.staging, ref, verify, log)
        writer.commit(manifest)
        steps.update()
    except BaseException:
        writer.abort()
        raise
    finally:
        steps.close()
    raise_if_verification_failed(manifest, out)
    return Path(out)


def raise_if_verification_failed(manifest: dict[str, Any], out: str | os.PathLike[str]) -> None:
    """An artifact whose verification failed is committed marked as failed, then reported."""
    if manifest["verification"]["passed"] is False:
        raise MolmoError(f"{manifest['verification']['summary']}. The artifact was written to "
                         f"{out} marked as failed: the runtime refuses it unless "
                         "--allow-unverified / allow_unverified=True")


def _graph_entry(spec: dict[str, Any], staged: list[str]) -> dict[str, Any]:
    """A graph's manifest entry, listing its external data files (onnx/<graph>.onnx.data...)."""
    external = [rel for rel in staged if rel.startswith(spec["file"] + ".")]
    return {**spec, "external_data": external} if external else spec


def _verify_staged(staging: Path, ref: MolmoForConditionalGeneration, verify: bool,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """Verify the staged artifact against the reference before it is committed; the result
    goes into the manifest (the runtime refuses an artifact whose verification failed)."""
    if not verify:
        return {"passed": None, "summary": "skipped (--no-verify)"}
    from molmo_export.verify import verify_artifact

    try:
        results = verify_artifact(staging, ref, log=log)
    except MolmoError as e:
        return {"passed": False, "summary": str(e).split("\n")[0]}
    return {"passed": True, "summary": f"{len(results)} checks passed"}
