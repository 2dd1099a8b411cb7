"""Fuzzed manifests: a valid manifest edited at random (entries dropped, retyped, repathed,
rehashed, added) either opens and verifies, or raises ArtifactError; nothing else escapes, and
no file outside the artifact, or inside it but unlisted, is ever opened.

"Opening" is everything the runtime does with an artifact before it runs a graph:
load_manifest(verify="full"), every Manifest property, the graph files with their external data
(Manifest.graph_path), the processor (tokenizer + processor.json) and the embedding table.
One small fake artifact is built once; each example rewrites only manifest.json.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from molmo_runtime.embedding import EmbeddingTable
from molmo_runtime.errors import ArtifactError
from molmo_runtime.manifest import EMBED_FILE, MANIFEST_NAME, load_manifest
from molmo_runtime.processing import MolmoProcessor
from tests.runtime.fake_artifact import make_fake_artifact, record_opens

_ART: list[tuple[Path, dict[str, Any]]] = []


def _artifact() -> tuple[Path, dict[str, Any]]:
    """The fake artifact (built once), with bait around it: a file outside, a symlink leading
    to it, an unlisted file and an unlisted tokenizer/added_tokens.json."""
    if not _ART:
        root = Path(tempfile.mkdtemp(prefix="manifest-fuzz-"))
        (root / "outside.bin").write_bytes(b"outside")
        art = make_fake_artifact(root / "art")
        (art / "link_out.bin").symlink_to(root / "outside.bin")
        (art / "unlisted.bin").write_bytes(b"unlisted")
        (art / "tokenizer" / "added_tokens.json").write_text('{"catdog": 11}')
        _ART.append((art, json.loads((art / MANIFEST_NAME).read_text())))
    return _ART[0]


PATHS = ["../outside.bin", "/etc/hostname", "link_out.bin", "unlisted.bin", "onnx/../x",
         "tokenizer/added_tokens.json", "processor.json", "onnx/decoder.onnx",
         "onnx/decoder.onnx.data", "embed_tokens.npy", "", ".", "a//b", "C:\\x", "manifest.json",
         ".molmo-export-staging/x", "onnx", "tokenizer/", "\x00", "é/ü.bin"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
    | st.text(max_size=8) | st.sampled_from(PATHS),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=6)


@st.composite
def edits(draw: st.DrawFn) -> list[tuple[list[Any], str, Any]]:
    """(where: a key path into the manifest, what: drop|set|repath|rehash|add, value)."""
    _, raw = _artifact()
    out = []
    for _ in range(draw(st.integers(1, 4))):
        path: list[Any] = []
        node: Any = raw
        while isinstance(node, (dict, list)) and node and draw(st.integers(0, 3)) > 0:
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict)
                                       else range(len(node))))
            path.append(key)
            node = node[key]
        what = draw(st.sampled_from(["drop", "set", "repath", "rehash", "add"]))
        value: Any = {
            "set": lambda: draw(json_values),
            "repath": lambda: draw(st.sampled_from(PATHS)),
            "rehash": lambda: draw(st.sampled_from(["0" * 64, "F" * 64, "x", 7, -1, 2**70])),
            "add": lambda: (draw(st.sampled_from(PATHS)),
                            {"bytes": draw(st.integers(-1, 100)), "sha256": draw(
                                st.sampled_from(["0" * 64, "a" * 63, None]))}),
            "drop": lambda: None,
        }[what]()
        out.append((path, what, value))
    return out


def _apply(raw: dict[str, Any], path: list[Any], what: str, value: Any) -> None:
    if what == "add":
        if isinstance(raw.get("files"), dict):
            raw["files"][value[0]] = value[1]
        return
    if what == "rehash":
        files = raw.get("files")
        if isinstance(files, dict) and files:
            rec = files[sorted(files)[len(path) % len(files)]]
            if isinstance(rec, dict):
                rec["sha256" if isinstance(value, str) else "bytes"] = value
        return
    if not path:
        return
    parent: Any = raw
    for key in path[:-1]:
        if not isinstance(parent, (dict, list)):
            return
        try:
            parent = parent[key]
        except (KeyError, IndexError, TypeError):
            return
    key = path[-1]
    if isinstance(parent, dict) or (isinstance(parent, list) and isinstance(key, int)
                                    and key < len(parent)):
        if what == "drop":
            if isinstance(parent, list) or key in parent:
                del parent[key]
        else:
            parent[key] = value


def _open_everything(art: Path) -> None:
    m = load_manifest(art, verify="full")
    _ = (m.dims, m.special_tokens, m.max_crops, m.max_seq_len, m.target, m.model_config,
         m.files, m.verification)
    for spec in m.graphs.values():
        m.graph_path(spec)
    if m.raw.get("has_tokenizer", True):
        MolmoProcessor.from_artifact(m)
    EmbeddingTable(m.path(EMBED_FILE))


@settings(max_examples=2000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(edits())
def test_fuzzed_manifest_opens_or_raises_artifact_error_and_reads_nothing_else(
        changes: list[tuple[list[Any], str, Any]]) -> None:
    art, original = _artifact()
    raw = copy.deepcopy(original)
    for path, what, value in changes:
        _apply(raw, path, what, value)
    (art / MANIFEST_NAME).write_text(json.dumps(raw))
    with record_opens() as opened:
        try:
            _open_everything(art)
        except ArtifactError:
            pass
    root = os.path.realpath(art)
    listed = raw.get("files") if isinstance(raw.get("files"), dict) else {}
    allowed = {os.path.join(root, MANIFEST_NAME)} | {
        os.path.join(root, *rel.split("/")) for rel in listed if isinstance(rel, str)}
    stray = [p for p in opened if p not in allowed]
    assert not stray, (stray, changes)


def test_the_unedited_fake_artifact_opens() -> None:
    art, original = _artifact()
    (art / MANIFEST_NAME).write_text(json.dumps(original))
    _open_everything(art)
