"""manifest.json: the contract between the exporter and the runtimes. Torch-free.

Layout of an artifact directory (see ../shared/docs/DESIGN.md):

    manifest.json  processor.json  embed_tokens.npy  tokenizer/  onnx/*.onnx  engines/*.plan

The manifest records the schema version, exporter version, model config, graph I/O (graph_io
specs), special token ids, max_crops / max_seq_len, and the size and sha256 of every file. The
runtime refuses an artifact whose schema it does not know or whose files do not match.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from molmo_runtime.containment import check_relpath, inside
from molmo_runtime.errors import ArtifactError
from molmo_runtime.fileio import sha256_file, write_json_atomic
from molmo_runtime.graph_io import GraphDims, GraphSpec
from molmo_runtime.hash_cache import HashCache
from molmo_runtime.onnx_refs import external_data_locations

SCHEMA_VERSION = 1
FORMAT_NAME = "molmo-export-artifact"
MANIFEST_NAME = "manifest.json"
# Keys whose values may differ between two otherwise identical exports.
VOLATILE_KEYS = ("created_utc",)

VerifyMode = Literal["full", "cached", "size", "none"]
# Always read by the runtime, so always listed.
EMBED_FILE = "embed_tokens.npy"
PROCESSOR_FILE = "processor.json"
TOKENIZER_DIR = "tokenizer"
_SHA256_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest whose structure and paths were checked (see check_manifest).

    `raw` is the JSON object as written. Files are reached through `path`, which refuses
    anything the manifest does not list.
    """

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

    @property
    def verification(self) -> dict[str, Any] | None:
        """The export's verification record: {"passed": True/False/None, ...}, or None for
        artifacts written before it was recorded."""
        rec = self.raw.get("verification")
        return dict(rec) if isinstance(rec, dict) else None

    @property
    def unmeasured_quality(self) -> str | None:
        """What it means that a quantized artifact's quality was never measured (the streaming
        export writes "quality": {"measured": false}: no fp32 reference run fits in memory);
        None for every other artifact."""
        quality = self.raw.get("quality")
        if not self.raw.get("quantization") or not isinstance(quality, dict) \
                or quality.get("measured") is not False:
            return None
        return (f"the quality of this {self.target} artifact was never measured "
                f"({quality.get('reason', 'no reason recorded')}): its weights went through the "
                "same quantizer as a measured export, but how far its answers are from the fp32 "
                "model's is unknown, and it has no quality report or thresholds to check it "
                "against")

    def path(self, relpath: str) -> Path:
        """The listed file `relpath`, resolved inside the artifact; ArtifactError otherwise."""
        if relpath not in self.raw["files"]:
            raise ArtifactError(
                f"{self.directory}: {relpath!r} is not listed in the manifest's files, so it is "
                "not read (only listed, checked files are); re-export the artifact")
        return inside(self.directory, relpath, f"files[{relpath!r}]", self._root)

    @functools.cached_property
    def _root(self) -> str:
        return os.path.realpath(self.directory)

    def graph_path(self, spec: GraphSpec) -> Path:
        """The graph's file, after checking that every external data file it will make ONNX
        Runtime open is a listed file inside the artifact (molmo_runtime.onnx_refs)."""
        path = self.path(spec.file)
        base = path.parent.relative_to(self._root).as_posix()
        for location in sorted(external_data_locations(path)):
            check_relpath(location, f"external data of {spec.file}")
            self.path(location if base == "." else f"{base}/{location}")
        return path

    def listed_under(self, folder: str) -> frozenset[str]:
        """Names of the listed files directly inside `folder` (e.g. "tokenizer")."""
        prefix = folder.rstrip("/") + "/"
        return frozenset(rel[len(prefix):] for rel in self.raw["files"]
                         if rel.startswith(prefix) and "/" not in rel[len(prefix):])


def file_record(artifact_dir: str | os.PathLike[str], relpath: str) -> dict[str, Any]:
    p = Path(artifact_dir) / relpath
    return {"bytes": p.stat().st_size, "sha256": sha256_file(p)}


def write_manifest(artifact_dir: str | os.PathLike[str], raw: dict[str, Any]) -> Path:
    """Write manifest.json atomically. `raw["files"]` must already list every file's record."""
    raw = {"schema_version": SCHEMA_VERSION, "format": FORMAT_NAME, **raw}
    path = Path(artifact_dir) / MANIFEST_NAME
    write_json_atomic(path, raw)
    return path


def load_manifest(artifact_dir: str | os.PathLike[str], verify: VerifyMode = "cached",
                  allow_unverified: bool = False) -> Manifest:
    """Read and check an artifact's manifest.

    The structure and every path are always checked (check_manifest). verify: "full" hashes
    every listed file; "cached" (the default) checks every size and hashes only file states not
    hashed before (molmo_runtime.hash_cache); "size" only sizes; "none" nothing on disk.
    An artifact whose export verification failed is refused unless `allow_unverified`.
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
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); re-run molmo-export") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path} is not a molmo-export manifest; re-run molmo-export")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema version {version!r}, this runtime reads version "
            f"{SCHEMA_VERSION} (artifact written by molmo-export "
            f"{raw.get('exporter_version', '?')!r}); re-export with the same molmo-export "
            "version as the runtime")
    check_manifest(raw, path)
    manifest = Manifest(directory, raw)
    if verify not in ("full", "cached", "size", "none"):
        raise ArtifactError(f"verify must be 'full', 'cached', 'size' or 'none', got {verify!r}")
    record = manifest.verification
    if record is not None and record.get("passed") is False and not allow_unverified:
        summary = record.get("summary") or "see its export log"
        raise ArtifactError(
            f"{directory} failed its verification at export ({summary}); it is refused. "
            "Re-export it, or pass allow_unverified=True (--allow-unverified) to open it "
            "anyway, e.g. to debug it")
    if verify != "none":
        verify_files(manifest, mode=verify)
    return manifest


# --- structure -----------------------------------------------------------------------------------

def _fail(where: Path, entry: str, problem: str) -> ArtifactError:
    return ArtifactError(f"{where}: manifest entry {entry} {problem}; this manifest was not "
                         "written by this molmo-export version or was edited; re-export the "
                         "artifact")


def _need(raw: dict[str, Any], key: str, kind: type, where: Path, prefix: str = "") -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        found = "it is missing" if key not in raw else f"it is {type(value).__name__}"
        raise _fail(where, f"{prefix}{key}", f"must be {kind.__name__} ({found})")
    return value


def _listed(raw: dict[str, Any], rel: Any, entry: str, where: Path) -> None:
    check_relpath(rel, entry)
    if rel not in raw["files"]:
        raise _fail(where, entry, f"names {rel!r}, which is not listed in files (an unlisted "
                                  "file is never read)")


def check_manifest(raw: dict[str, Any], where: Path) -> None:
    """Types of every key the runtime reads, and containment of every path.

    Every path is relative and normalised (containment.check_relpath), and every file the
    runtime opens (graphs, their external data, engines, embed_tokens.npy, processor.json and
    the tokenizer files) is listed in `files` with its size and sha256.
    """
    files = _need(raw, "files", dict, where)
    for rel, rec in files.items():
        check_relpath(rel, f"files[{rel!r}]")
        if rel == MANIFEST_NAME:
            raise _fail(where, f"files[{rel!r}]", "lists the manifest itself")
        if not isinstance(rec, dict):
            raise _fail(where, f"files[{rel!r}]", f"is {type(rec).__name__}, not dict")
        size = _need(rec, "bytes", int, where, f"files[{rel!r}].")
        digest = _need(rec, "sha256", str, where, f"files[{rel!r}].")
        if size < 0 or len(digest) != 64 or not set(digest) <= _SHA256_HEX:
            raise _fail(where, f"files[{rel!r}]", "has a negative size or a sha256 that is not "
                                                  "64 lowercase hex digits")
    dims = _need(raw, "dims", dict, where)
    for key in GraphDims.__dataclass_fields__:
        if _need(dims, key, int, where, "dims.") < 1:
            raise _fail(where, f"dims.{key}", "is not positive")
    for key in ("max_crops", "max_seq_len"):
        if _need(raw, key, int, where) < 1:
            raise _fail(where, key, "is not positive")
    _need(raw, "target", str, where)
    tokens = _need(raw, "special_tokens", dict, where)
    _need(tokens, "eos", int, where, "special_tokens.")
    for key in tokens:
        _need(tokens, key, int, where, "special_tokens.")
    model = _need(raw, "model", dict, where)
    _need(model, "config", dict, where, "model.")
    graphs = _need(raw, "graphs", dict, where)
    for group in ("graphs", "graphs_qdq"):
        specs = graphs if group == "graphs" else raw.get(group)
        if specs is None:
            continue
        if not isinstance(specs, dict):
            raise _fail(where, group, f"is {type(specs).__name__}, not dict")
        for name, spec in specs.items():
            entry = f"{group}[{name!r}]"
            if not isinstance(spec, dict):
                raise _fail(where, entry, f"is {type(spec).__name__}, not dict")
            _listed(raw, spec.get("file"), f"{entry}.file", where)
            for i, rel in enumerate(_need(spec, "external_data", list, where, f"{entry}.")
                                    if "external_data" in spec else []):
                _listed(raw, rel, f"{entry}.external_data[{i}]", where)
            _check_graph_spec(spec, entry, where)
    engines = raw.get("engines")
    if engines is not None:
        if not isinstance(engines, dict):
            raise _fail(where, "engines", f"is {type(engines).__name__}, not dict")
        for name, rec in engines.items():
            if not isinstance(rec, dict):
                raise _fail(where, f"engines[{name!r}]", f"is {type(rec).__name__}, not dict")
            _listed(raw, rec.get("file"), f"engines[{name!r}].file", where)
    _listed(raw, EMBED_FILE, EMBED_FILE, where)
    if "has_tokenizer" in raw:
        _need(raw, "has_tokenizer", bool, where)
    if raw.get("has_tokenizer", True):
        _listed(raw, PROCESSOR_FILE, PROCESSOR_FILE, where)
    verification = raw.get("verification")
    if verification is not None and (not isinstance(verification, dict)
                                     or verification.get("passed") not in (True, False, None)):
        raise _fail(where, "verification", "is not {\"passed\": true | false | null, ...}")


def _check_graph_spec(spec: dict[str, Any], entry: str, where: Path) -> None:
    _need(spec, "name", str, where, f"{entry}.")
    for side in ("inputs", "outputs"):
        tensors = _need(spec, side, list, where, f"{entry}.")
        for i, t in enumerate(tensors):
            at = f"{entry}.{side}[{i}]"
            if not isinstance(t, dict):
                raise _fail(where, at, f"is {type(t).__name__}, not dict")
            _need(t, "name", str, where, f"{at}.")
            _need(t, "dtype", str, where, f"{at}.")
            dims = _need(t, "dims", list, where, f"{at}.")
            if not all(isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool)
                                              and d >= 0) for d in dims):
                raise _fail(where, f"{at}.dims", "holds something other than sizes and names")


# --- files on disk -------------------------------------------------------------------------------

def verify_files(manifest: Manifest, full: bool = True, mode: VerifyMode | None = None) -> None:
    """Raise ArtifactError naming every missing, resized or modified file.

    mode "full" hashes every file, "cached" only file states not hashed before, "size" only
    compares sizes (`full` is the older spelling: True = "full", False = "size").
    """
    mode = mode or ("full" if full else "size")
    cache = HashCache(manifest.directory) if mode == "cached" else None
    problems = []
    for rel, rec in sorted(manifest.files.items()):
        p = manifest.path(rel)
        if not p.is_file():
            problems.append(f"{rel}: missing (or not a regular file)")
            continue
        size = p.stat().st_size
        if size != rec["bytes"]:
            problems.append(f"{rel}: size {size} != {rec['bytes']} in the manifest")
        elif mode in ("full", "cached"):
            digest = cache.sha256(rel, p) if cache is not None else sha256_file(p)
            if digest != rec["sha256"]:
                problems.append(f"{rel}: sha256 differs from the manifest (file modified)")
    if cache is not None:
        cache.save()
    if problems:
        raise ArtifactError(
            f"artifact {manifest.directory} does not match its manifest:\n  "
            + "\n  ".join(problems)
            + "\nre-export it (molmo-export ... --out DIR --force) or restore the files")
