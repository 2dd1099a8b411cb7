"""manifest.json: the contract between the exporter and the runtimes. Torch-free.

Layout of an artifact directory (see ../shared/docs/DESIGN.md):

    manifest.json  processor.json  embed_tokens.npy  tokenizer/  onnx/*.onnx  engines/*.plan

The manifest records the schema version, exporter version, model config, graph I/O (graph_io
specs), special token ids, max_crops / max_seq_len, and the size and sha256 of every file. The
runtime refuses an artifact whose schema it does not know or whose files do not match.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from molmo_runtime.errors import ArtifactError
from molmo_runtime.fileio import sha256_file, write_json_atomic
from molmo_runtime.graph_io import GraphDims, GraphSpec

SCHEMA_VERSION = 1
FORMAT_NAME = "molmo-export-artifact"
MANIFEST_NAME = "manifest.json"
# Keys whose values may differ between two otherwise identical exports.
VOLATILE_KEYS = ("created_utc",)

VerifyMode = Literal["full", "size", "none"]


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest. `raw` is the JSON object as written."""

    directory: Path
    raw: dict[str, Any]

    @property
    def dims(self) -> GraphDims:
        return GraphDims.from_dict(self.raw["dims"])

    @property
    def graphs(self) -> dict[str, GraphSpec]:
        return {name: GraphSpec.from_dict(g) for name, g in self.raw["graphs"].items()}

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self.raw["special_tokens"])

    @property
    def max_crops(self) -> int:
        return int(self.raw["max_crops"])

    @property
    def max_seq_len(self) -> int:
        return int(self.raw["max_seq_len"])

    @property
    def target(self) -> str:
        return str(self.raw["target"])

    @property
    def decoder_flavour(self) -> str:
        """graph_io's decoder flavour: "portable" (plain ops) or "ort" (ONNX Runtime contrib ops)."""
        return str(self.raw.get("decoder_flavour", "portable"))

    @property
    def model_config(self) -> dict[str, Any]:
        return dict(self.raw["model"]["config"])

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return dict(self.raw["files"])

    def path(self, relpath: str) -> Path:
        return self.directory / relpath


def file_record(artifact_dir: str | os.PathLike[str], relpath: str) -> dict[str, Any]:
    p = Path(artifact_dir) / relpath
    return {"bytes": p.stat().st_size, "sha256": sha256_file(p)}


def write_manifest(artifact_dir: str | os.PathLike[str], raw: dict[str, Any]) -> Path:
    """Write manifest.json atomically. `raw["files"]` must already list every file's record."""
    raw = {"schema_version": SCHEMA_VERSION, "format": FORMAT_NAME, **raw}
    path = Path(artifact_dir) / MANIFEST_NAME
    write_json_atomic(path, raw)
    return path


def load_manifest(artifact_dir: str | os.PathLike[str], verify: VerifyMode = "full") -> Manifest:
    """Read and check an artifact's manifest.

    verify: "full" checks size and sha256 of every listed file, "size" only sizes (fast, for
    multi-GB artifacts on slow storage), "none" only that the manifest parses.
    """
    directory = Path(artifact_dir)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not a directory; pass the --out folder of molmo-export")
    if not path.is_file():
        raise ArtifactError(
            f"{path} is missing: {directory} is not a molmo-export artifact (or its export was "
            "interrupted); run molmo-export again with --out pointing here")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); re-run molmo-export") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path} is not a molmo-export manifest; re-run molmo-export")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema version {version}, this runtime reads version {SCHEMA_VERSION} "
            f"(artifact written by molmo-export {raw.get('exporter_version', '?')}); re-export "
            "with the same molmo-export version as the runtime")
    manifest = Manifest(directory, raw)
    if verify != "none":
        verify_files(manifest, full=(verify == "full"))
    return manifest


def verify_files(manifest: Manifest, full: bool = True) -> None:
    """Raise ArtifactError naming every missing, resized or modified file."""
    problems = []
    for rel, rec in sorted(manifest.files.items()):
        p = manifest.path(rel)
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != rec["bytes"]:
            problems.append(f"{rel}: size {p.stat().st_size} != {rec['bytes']} in the manifest")
        elif full and sha256_file(p) != rec["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (file modified)")
    if problems:
        raise ArtifactError(
            f"artifact {manifest.directory} does not match its manifest:\n  "
            + "\n  ".join(problems)
            + "\nre-export it (molmo-export ... --out DIR --force) or restore the files")
