"""The trust model, runtime side (docs/artifact_format.md "Trust model"): every path a manifest
names stays inside the artifact, everything opened is listed and checked, unlisted files are
never read, a failed export verification is refused, and hashes are cached per file state."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from molmo_runtime import hash_cache
from molmo_runtime.errors import ArtifactError
from molmo_runtime.manifest import MANIFEST_NAME, file_record, load_manifest
from molmo_runtime.processing import MolmoProcessor, MolmoTokenizer
from tests.runtime.fake_artifact import make_fake_artifact, record_opens

@pytest.fixture
def opened() -> Iterator[list[str]]:
    """Real paths of every file Python opens while the test body runs."""
    with record_opens() as paths:
        yield paths


@pytest.fixture
def art(tmp_path: Path) -> Path:
    (tmp_path / "outside.bin").write_bytes(b"secret outside the artifact")
    return make_fake_artifact(tmp_path / "art")


def _edit(art: Path, change: Any) -> None:
    raw = json.loads((art / MANIFEST_NAME).read_text())
    change(raw)
    (art / MANIFEST_NAME).write_text(json.dumps(raw))


def _relist(art: Path, rel: str) -> None:
    """Record `rel`'s current size and hash in the manifest (an attacker can do this too)."""
    _edit(art, lambda raw: raw["files"].__setitem__(rel, file_record(art, rel)))


def test_fake_artifact_opens_and_reads_only_listed_files(art: Path, opened: list[str]) -> None:
    m = load_manifest(art, verify="full")
    for spec in m.graphs.values():
        m.graph_path(spec)
    MolmoProcessor.from_artifact(m)
    listed = {os.path.realpath(art / rel) for rel in [MANIFEST_NAME, *m.files]}
    assert opened and set(opened) <= listed


@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/hostname", "onnx/../../outside.bin",
                                 "onnx//decoder.onnx", "./processor.json", "onnx\\decoder.onnx",
                                 "", ".molmo-export-staging/x"])
@pytest.mark.parametrize("where", ["files", "graph", "external_data", "engine"])
def test_paths_that_leave_the_artifact_are_refused_naming_the_entry(
        art: Path, opened: list[str], bad: str, where: str) -> None:
    def plant(raw: dict[str, Any]) -> None:
        if where == "files":
            raw["files"][bad] = {"bytes": 27, "sha256": "0" * 64}
        elif where == "graph":
            raw["graphs"]["connector"]["file"] = bad
        elif where == "external_data":
            raw["graphs"]["decoder"]["external_data"] = [bad]
        else:
            raw["engines"] = {"decoder": {"file": bad}}
    _edit(art, plant)
    opened.clear()
    with pytest.raises(ArtifactError, match="manifest entry"):
        load_manifest(art, verify="full")
    assert all(p.startswith(os.path.realpath(art)) for p in opened)


def test_a_graph_not_listed_in_files_is_refused(art: Path) -> None:
    _edit(art, lambda raw: raw["files"].pop("onnx/connector.onnx"))
    with pytest.raises(ArtifactError, match=r"graphs\['connector'\]\.file .*not listed"):
        load_manifest(art)


def test_a_symlink_leading_out_is_refused(art: Path, tmp_path: Path, opened: list[str]) -> None:
    outside = tmp_path / "outside_processor.json"
    outside.write_bytes((art / "processor.json").read_bytes())  # same bytes: the hash matches
    (art / "processor.json").unlink()
    (art / "processor.json").symlink_to(outside)
    opened.clear()
    with pytest.raises(ArtifactError, match="outside the artifact"):
        load_manifest(art, verify="full")
    assert os.path.realpath(outside) not in opened


@pytest.mark.parametrize("location", ["../../outside.bin", "/etc/hostname", "secret.bin"])
def test_onnx_external_data_outside_or_unlisted_is_refused(art: Path, tmp_path: Path,
                                                           location: str) -> None:
    """A graph whose hash matches its (edited) manifest still cannot make ONNX Runtime open a
    file that is not a listed file of the artifact."""
    import onnx

    (art / "onnx" / "secret.bin").write_bytes(bytes(32))
    model = onnx.load(str(art / "onnx" / "decoder.onnx"), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save_model(model, str(art / "onnx" / "decoder.onnx"))
    _relist(art, "onnx/decoder.onnx")
    m = load_manifest(art, verify="full")
    with pytest.raises(ArtifactError, match="not a normalised relative path|not listed"):
        m.graph_path(m.graphs["decoder"])


def test_unlisted_added_tokens_json_is_never_read(art: Path, opened: list[str]) -> None:
    """A planted tokenizer/added_tokens.json would change tokenization; from an artifact it is
    not opened at all (a plain tokenizer folder still honours it)."""
    planted = art / "tokenizer" / "added_tokens.json"
    planted.write_text(json.dumps({"catdog": 11}))
    assert MolmoTokenizer.from_dir(art / "tokenizer").encode("catdog") == [11]  # the attack
    opened.clear()
    proc = MolmoProcessor.from_artifact(load_manifest(art, verify="full"))
    assert proc.tokenizer.encode("catdog") == [0]  # [UNK]: the planted token is not there
    assert os.path.realpath(planted) not in opened


def test_failed_verification_is_refused_unless_the_caller_opts_in(art: Path) -> None:
    _edit(art, lambda raw: raw.__setitem__(
        "verification", {"passed": False, "summary": "verification failed for 3 of 20 checks"}))
    with pytest.raises(ArtifactError, match="failed its verification.*allow_unverified"):
        load_manifest(art)
    assert load_manifest(art, allow_unverified=True).verification == {
        "passed": False, "summary": "verification failed for 3 of 20 checks"}
    from molmo_runtime.pipeline import MolmoPipeline

    with pytest.raises(ArtifactError, match="--allow-unverified"):
        MolmoPipeline.from_dir(art)


def test_molmo_run_refuses_a_failed_artifact_in_one_line(art: Path) -> None:
    import subprocess

    _edit(art, lambda raw: raw.__setitem__("verification", {"passed": False}))
    proc = subprocess.run([sys.executable, "-m", "molmo_runtime.cli", str(art), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--allow-unverified" in lines[0], proc.stderr


def test_hashes_are_computed_once_per_file_state(art: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hash_cache.CACHE_ENV, str(tmp_path / "cache"))
    hashed: list[str] = []
    real = hash_cache.sha256_file
    monkeypatch.setattr(hash_cache, "sha256_file", lambda p: hashed.append(str(p)) or real(p))
    time.sleep(2.1)  # files written within the last 2 s are not cached ("racy clean")
    n = len(load_manifest(art, verify="none").files)
    load_manifest(art)
    assert len(hashed) == n
    load_manifest(art)
    assert len(hashed) == n  # second open: sizes checked, nothing re-hashed
    # same size, old mtime restored: ctime still moves, so the change is seen
    target = art / "embed_tokens.npy"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ArtifactError, match="embed_tokens.npy: sha256 differs"):
        load_manifest(art)
    # truncation is caught by the size check without hashing
    hashed.clear()
    target.write_bytes(bytes(data[:-4]))
    with pytest.raises(ArtifactError, match="embed_tokens.npy: size"):
        load_manifest(art)
    assert str(target) not in hashed


def test_full_verification_ignores_the_cache(art: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from molmo_runtime import manifest as manifest_module

    monkeypatch.setenv(hash_cache.CACHE_ENV, str(tmp_path / "cache"))
    time.sleep(2.1)
    load_manifest(art)  # fills the cache
    calls: list[str] = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda p: calls.append(str(p)) or real(p))
    m = load_manifest(art, verify="full")
    assert len(calls) == len(m.files)


def test_a_garbled_cache_is_a_miss(art: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hash_cache.CACHE_ENV, str(tmp_path / "cache"))
    cache = hash_cache.HashCache(art)
    assert cache.file is not None
    cache.file.parent.mkdir(parents=True)
    cache.file.write_text('{"version": 1, "entries": {"processor.json": [1, 2]}}')
    load_manifest(art)
    cache.file.write_text("not json")
    load_manifest(art)


@pytest.mark.parametrize("key", ["files", "graphs", "dims", "special_tokens", "max_seq_len",
                                 "target", "model"])
def test_a_manifest_missing_a_key_names_it(art: Path, key: str) -> None:
    _edit(art, lambda raw: raw.pop(key))
    with pytest.raises(ArtifactError, match=f"manifest entry {key} must be .*it is missing"):
        load_manifest(art)


@pytest.mark.parametrize("key, value", [("max_seq_len", "2048"), ("max_crops", True),
                                        ("dims", []), ("graphs", {"decoder": "x.onnx"})])
def test_a_manifest_key_of_the_wrong_type_names_it(art: Path, key: str, value: Any) -> None:
    _edit(art, lambda raw: raw.__setitem__(key, value))
    with pytest.raises(ArtifactError, match=f"manifest entry {key}"):
        load_manifest(art)
