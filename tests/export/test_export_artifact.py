"""The artifact directory: graphs pass onnx.checker, exports are deterministic, interrupted
exports leave nothing that looks complete, tampering is caught, user files are never touched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from molmo_export.export import export_artifact
from molmo_runtime.errors import ArtifactError, MolmoError
from molmo_runtime.manifest import MANIFEST_NAME, VOLATILE_KEYS, load_manifest
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _export_demo(out: Path, **kwargs: object) -> Path:
    return export_artifact("demo", "onnx", out, verify=False, progress=False,
                           log=lambda s: None, max_seq_len=2048, **kwargs)


def test_every_graph_passes_onnx_checker_by_path(demo_artifact: Path) -> None:
    manifest = load_manifest(demo_artifact)
    for spec in manifest.graphs.values():
        onnx.checker.check_model(str(demo_artifact / spec.file), full_check=True)


def test_manifest_lists_every_file_with_hash(demo_artifact: Path) -> None:
    manifest = load_manifest(demo_artifact)
    files = set(manifest.files)
    assert {"embed_tokens.npy", "processor.json", "onnx/vision_encoder.onnx",
            "onnx/connector.onnx", "onnx/decoder.onnx"} <= files
    assert any(f.startswith("tokenizer/") for f in files)
    assert manifest.raw["exporter_version"] and manifest.raw["schema_version"] == 1


@pytest.fixture(scope="module")
def reexported(demo_artifact: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Path, dict[str, int]]:
    """A copy of the session's demo artifact with a user's file beside it, exported again in
    place (one export serves the determinism and the in-place tests), and the inode each listed
    file had before: the update renames new files in, so a changed inode shows a file was
    written again, not kept."""
    art = tmp_path_factory.mktemp("reexport") / "art"
    shutil.copytree(demo_artifact, art)
    (art / "notes.txt").write_text("keep me too")
    inodes = {rel: (art / rel).stat().st_ino for rel in load_manifest(art).files}
    _export_demo(art)
    return art, inodes


def test_same_export_twice_is_byte_identical(demo_artifact: Path,
                                             reexported: tuple[Path, dict[str, int]]) -> None:
    again, before = reexported
    a, b = load_manifest(demo_artifact).raw, load_manifest(again).raw
    for key in VOLATILE_KEYS:
        a.pop(key), b.pop(key)
    a["model"].pop("source"), b["model"].pop("source")
    assert a == b  # includes the sha256 of every file
    for rel in a["files"]:
        assert (again / rel).stat().st_ino != before[rel], f"{rel} was not written again"
        assert (demo_artifact / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_interrupted_export_leaves_no_manifest_and_rerun_works(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "molmo_export.cli", "--model", "demo",
                             "--target", "onnx", "--out", str(out), "--no-verify",
                             "--no-progress", "--max-seq-len", "2048"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    staged = out / ".molmo-export-staging" / "onnx" / "vision_encoder.onnx"
    while not staged.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the export finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / MANIFEST_NAME).exists()
    with pytest.raises(ArtifactError, match="missing"):
        load_manifest(out)
    _export_demo(out)
    load_manifest(out, verify="full")
    assert not (out / ".molmo-export-staging").exists()


def test_tampered_missing_and_foreign_files_are_caught(demo_artifact: Path,
                                                       tmp_path: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(demo_artifact, art)
    graph = art / "onnx" / "connector.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="connector.onnx: sha256 differs"):
        load_manifest(art)
    (art / "processor.json").unlink()
    with pytest.raises(ArtifactError, match="processor.json: missing"):
        load_manifest(art)
    raw = json.loads((art / MANIFEST_NAME).read_text())
    raw["schema_version"] = 99
    (art / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="schema version 99"):
        load_manifest(art)


def test_refuses_foreign_folder_without_force_and_never_deletes_user_files(
        reexported: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(MolmoError, match="--force"):
        _export_demo(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # an existing artifact is updated in place; the user's file beside it stays
    art, _ = reexported
    assert (art / "notes.txt").read_text() == "keep me too"
    load_manifest(art)


def test_trt_target_without_gpu_fails_early_and_writes_nothing(tmp_path: Path) -> None:
    from molmo_export.trt.availability import tensorrt_missing

    if not tensorrt_missing():
        pytest.skip("this machine has TensorRT and a GPU")
    out = tmp_path / "trt"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "molmo_export.cli", "--model", "demo",
                           "--target", "trt-fp16", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "TensorRT" in lines[0], proc.stderr
    assert not out.exists()
    assert time.time() - t0 < 60  # before loading or exporting anything
