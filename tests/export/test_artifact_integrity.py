"""The trust model, writer side (docs/artifact_format.md "Trust model"): a planted manifest makes
the writer delete nothing, --force never replaces a user's file, one writer at a time, and a
writer stopped at any step of its commit leaves a folder that a plain rerun completes.

The artifacts are small fakes (tests/runtime/fake_artifact.py), written through the real
ArtifactWriter; no torch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from molmo_export.export.artifact_dir import LOCK, STAGING, WORK, ArtifactWriter, OutputLock
from molmo_runtime.errors import ArtifactError, MolmoError
from molmo_runtime.manifest import MANIFEST_NAME, load_manifest
from tests.conftest import REPO
from tests.runtime.fake_artifact import fake_manifest


_TEMPLATES: dict[int, Path] = {}


def _template(version: int) -> Path:
    """The staged files of fake artifact `version` plus its manifest (without `files`), made
    once per session so that writers (also in subprocesses) only copy them."""
    if version not in _TEMPLATES:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix=f"fake-v{version}-"))
        raw = fake_manifest(folder, version)
        (folder / MANIFEST_NAME).write_text(json.dumps(raw))
        _TEMPLATES[version] = folder
    return _TEMPLATES[version]


# What a writer does, as a script: the subprocess tests run it (light imports, no numpy/onnx).
WRITER = """
import json, os, shutil, sys
from pathlib import Path
from molmo_export.export import artifact_dir as ad

def write(out, template, force=False):
    writer = ad.ArtifactWriter(out, force=force)
    try:
        shutil.copytree(template, writer.staging, dirs_exist_ok=True)
        writer.commit(json.loads((Path(template) / "manifest.json").read_text()))
    except BaseException:
        writer.abort()
        raise
"""


def write_version(out: Path, version: int, force: bool = False) -> Path:
    """Write fake artifact `version` into `out` through ArtifactWriter."""
    scope: dict[str, Any] = {}
    exec(WRITER, scope)
    scope["write"](out, _template(version), force)
    return out


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every path under `folder` with its bytes (files) or link target (symlinks)."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def _set_manifest(out: Path, change: Any) -> None:
    raw = json.loads((out / MANIFEST_NAME).read_text())
    change(raw)
    (out / MANIFEST_NAME).write_text(json.dumps(raw))


def _assert_clean(out: Path) -> None:
    """No staging, work area, lock file or temporary file left behind."""
    leftovers = [p.name for p in out.rglob("*") if p.name.startswith(".molmo-export")
                 or p.name.endswith(".partial")]
    assert not leftovers, leftovers


# --- ownership -------------------------------------------------------------------------------

@pytest.mark.parametrize("planted", ["../elsewhere/file", "/ABS/file", "onnx/../../elsewhere/file"])
def test_planted_manifest_with_outside_paths_deletes_nothing(tmp_path: Path, planted: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "file").write_text("precious")
    out = write_version(tmp_path / "out", 1)
    planted = planted.replace("/ABS", str(tmp_path))
    from molmo_runtime.manifest import file_record

    record = file_record(tmp_path, "elsewhere/file")  # even with its true size and hash
    _set_manifest(out, lambda raw: raw["files"].__setitem__(planted, record))
    before = snapshot(tmp_path)
    for force in (False, True):
        with pytest.raises(ArtifactError, match="manifest entry files"):
            write_version(out, 2, force=force)
        assert snapshot(tmp_path) == before


def test_planted_manifest_cannot_claim_files_whose_hash_differs(tmp_path: Path) -> None:
    out = write_version(tmp_path / "out", 1)
    (out / "mydata.bin").write_text("the user's")
    _set_manifest(out, lambda raw: raw["files"].__setitem__(
        "mydata.bin", {"bytes": 10, "sha256": "0" * 64}))  # listed, so "stale" in version 2
    write_version(out, 2)
    assert (out / "mydata.bin").read_text() == "the user's"
    # a listed artifact file the user replaced is not overwritten either
    (out / "processor.json").write_text('{"mine": true}')
    with pytest.raises(MolmoError, match="did not write.*processor.json.*Nothing was written"):
        write_version(out, 3)
    assert json.loads((out / "processor.json").read_text()) == {"mine": True}
    _assert_clean(out)


def test_force_writes_beside_user_files_and_refuses_name_clashes(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(MolmoError, match="--force"):
        write_version(out, 1)
    assert snapshot(out) == {"notes.txt": b"keep me"}
    write_version(out, 1, force=True)
    assert (out / "notes.txt").read_text() == "keep me"
    load_manifest(out, verify="full")
    _assert_clean(out)

    for clash in ("processor.json", "manifest.json", "tokenizer/tokenizer.json",
                  "onnx/decoder.onnx"):
        folder = tmp_path / f"clash-{clash.replace('/', '_')}"
        (folder / clash).parent.mkdir(parents=True)
        (folder / clash).write_text("the user's own")
        before = snapshot(folder)
        with pytest.raises(MolmoError, match=f"did not write.*{clash}.*Nothing was written"):
            write_version(folder, 1, force=True)
        assert snapshot(folder) == before, clash


def test_force_never_writes_through_a_users_symlink(tmp_path: Path) -> None:
    target = tmp_path / "their_models"
    target.mkdir()
    (target / "readme").write_text("theirs")
    out = tmp_path / "out"
    out.mkdir()
    (out / "onnx").symlink_to(target)
    with pytest.raises(MolmoError, match="did not write.*: onnx"):
        write_version(out, 1, force=True)
    assert snapshot(target) == {"readme": b"theirs"}
    assert snapshot(out) == {"onnx": f"-> {target}"}


def test_rewrite_replaces_its_own_files_and_removes_stale_ones(tmp_path: Path) -> None:
    out = write_version(tmp_path / "out", 1)
    (out / "notes.txt").write_text("keep")
    write_version(out, 2)
    m = load_manifest(out, verify="full")
    assert m.raw["fake_version"] == 2 and not (out / "extra" / "v1.bin").exists()
    assert (out / "notes.txt").read_text() == "keep"
    _assert_clean(out)


# --- one writer at a time --------------------------------------------------------------------

HOLDER = ("import sys, time\n"
          "from molmo_export.export.artifact_dir import OutputLock\n"
          "OutputLock(sys.argv[1]).__enter__()\n"
          "print('locked', flush=True)\n"
          "time.sleep(120)\n")


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    out = write_version(tmp_path / "out", 1)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = snapshot(out)
        with pytest.raises(MolmoError, match=f"pid {holder.pid}"):
            write_version(out, 2)
        proc = subprocess.run([sys.executable, "-m", "molmo_export.cli", "--model", "demo",
                               "--target", "onnx", "--out", str(out), "--no-progress"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0], proc.stderr
        assert snapshot(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    write_version(out, 2)  # the kernel released the dead holder's lock
    assert load_manifest(out, verify="full").raw["fake_version"] == 2
    _assert_clean(out)


def test_two_threads_cannot_write_one_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    errors: list[BaseException] = []
    held, release = threading.Event(), threading.Event()

    def first() -> None:
        with OutputLock(out):
            held.set()
            release.wait(30)

    t = threading.Thread(target=first)
    t.start()
    held.wait(30)
    try:
        write_version(out, 1)
    except MolmoError as e:
        errors.append(e)
    release.set()
    t.join()
    assert errors and f"pid {os.getpid()}" in str(errors[0])
    assert not out.exists()  # created by the lock, left empty: removed


def test_concurrent_writers_one_wins_the_other_fails_cleanly(tmp_path: Path) -> None:
    """A second writer started while the first is in its commit fails at once; the artifact is
    the first one's, complete."""
    out = tmp_path / "out"
    child = WRITER + ("import time\n"
                      "def slow(step):\n"
                      "    print(step, flush=True); time.sleep(float(sys.argv[3]))\n"
                      "ad._boundary = slow\n"
                      "try:\n"
                      "    write(Path(sys.argv[1]), sys.argv[2])\n"
                      "except Exception as e:\n"
                      "    print(e); sys.exit(2)\n")

    def start(version: int, pause: float) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-c", child, str(out),
                                 str(_template(version)), str(pause)],
                                cwd=REPO, stdout=subprocess.PIPE, text=True)

    first = start(1, 0.2)
    assert first.stdout is not None and first.stdout.readline().strip() == "staged"
    second = start(2, 0.0)
    second_out = second.communicate(timeout=120)[0]
    assert second.returncode == 2 and f"(pid {first.pid})" in second_out, second_out
    assert first.wait(120) == 0
    assert load_manifest(out, verify="full").raw["fake_version"] == 1
    _assert_clean(out)


# --- crash safety at every step of a commit ---------------------------------------------------

CHILD = WRITER + """
stop_at, seen = int(sys.argv[3]), []
def hook(step):
    seen.append(step)
    if len(seen) == stop_at:
        os._exit(17)
ad._boundary = hook
write(Path(sys.argv[1]), sys.argv[2])
print(len(seen))
"""


def _child(out: Path, version: int, stop_at: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHILD, str(out), str(_template(version)),
                           str(stop_at)], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_writer_stopped_at_every_commit_step_is_completed_by_a_plain_rerun(
        tmp_path: Path) -> None:
    base = write_version(tmp_path / "base", 1)
    (base / "notes.txt").write_text("the user's")
    probe = tmp_path / "probe"
    shutil.copytree(base, probe)
    done = _child(probe, 2, 0)
    assert done.returncode == 0, done.stderr
    steps = int(done.stdout.strip())
    assert steps >= 12  # start, journal, manifest removal, ~10 renames, deletion, manifest, ...
    for k in range(1, steps + 1):
        out = tmp_path / f"stop{k}"
        shutil.copytree(base, out)
        stopped = _child(out, 2, k)
        assert stopped.returncode == 17, (k, stopped.stderr)
        # in between: the previous complete artifact, the new complete one, or no manifest
        if (out / MANIFEST_NAME).exists():
            assert load_manifest(out, verify="full").raw["fake_version"] in (1, 2), k
        else:
            with pytest.raises(ArtifactError, match="missing"):
                load_manifest(out)
        write_version(out, 2)  # a plain rerun: no --force
        m = load_manifest(out, verify="full")
        assert m.raw["fake_version"] == 2, k
        assert not (out / "extra" / "v1.bin").exists(), k
        assert (out / "notes.txt").read_text() == "the user's", k
        _assert_clean(out)


def test_the_work_area_and_staging_left_by_a_dead_writer_are_removed(tmp_path: Path) -> None:
    out = write_version(tmp_path / "out", 1)
    (out / WORK / "fp32").mkdir(parents=True)
    (out / WORK / "fp32" / "big.onnx").write_bytes(b"x" * 100)
    (out / STAGING / "onnx").mkdir(parents=True)
    (out / STAGING / "onnx" / "half.onnx").write_bytes(b"y")
    (out / LOCK).write_text("12345\n")  # a dead writer's lock file: not held by anyone
    assert load_manifest(out, verify="full").raw["fake_version"] == 1  # still the old one
    write_version(out, 2)
    assert load_manifest(out, verify="full").raw["fake_version"] == 2
    _assert_clean(out)


# --- quantized exports write only --out ------------------------------------------------------

@pytest.fixture
def fake_pipeline(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """export_artifact with the fp32 export and the quantization replaced by fake writers (the
    real ones are tested in tests/calibration); `state["fail"]` makes the quality gate fail."""
    import molmo_calibration
    import molmo_export.export
    import molmo_export.export.onnx_export as onnx_export

    state: dict[str, Any] = {"fail": False}

    def fp32(model: str, out: Path, **kw: Any) -> Path:
        state["fp32"] = Path(out)
        return write_version(Path(out), 1, force=kw.get("force", False))

    def quantize(src: Path, out: Path, **kw: Any) -> None:
        state["src_opened"] = load_manifest(src, verify="full").raw["fake_version"]
        if state["fail"]:
            raise MolmoError("below the quality thresholds. Nothing was written")
        write_version(Path(out), 2, force=kw.get("force", False))

    monkeypatch.setattr(onnx_export, "export_onnx_artifact", fp32)
    monkeypatch.setattr(molmo_calibration, "quantize_artifact", quantize)
    # the fake artifacts hold no decoder to fuse (the fused decoder: test_fused_decoder.py)
    monkeypatch.setattr(molmo_export.export, "_fuse", lambda *a, **k: None)
    return state


def _export(out: Path, **kw: Any) -> Path:
    from molmo_export.export import export_artifact

    return export_artifact("demo-random", "ort-int8", out, progress=False, log=lambda s: None,
                           **kw)


def test_quantized_export_stages_fp32_inside_out_and_removes_it(
        tmp_path: Path, fake_pipeline: dict[str, Any]) -> None:
    out = _export(tmp_path / "int8")
    assert fake_pipeline["fp32"] == out / WORK / "fp32" and fake_pipeline["src_opened"] == 1
    assert load_manifest(out, verify="full").raw["fake_version"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]  # no <out>-fp32 beside it
    _assert_clean(out)


def test_keep_fp32_keeps_the_intermediate_where_asked(
        tmp_path: Path, fake_pipeline: dict[str, Any]) -> None:
    out = _export(tmp_path / "int8", keep_fp32=tmp_path / "fp32")
    assert load_manifest(tmp_path / "fp32", verify="full").raw["fake_version"] == 1
    assert load_manifest(out, verify="full").raw["fake_version"] == 2
    _assert_clean(out)
    _assert_clean(tmp_path / "fp32")
    from molmo_export.export import export_artifact

    with pytest.raises(MolmoError, match="--keep-fp32"):
        export_artifact("demo-random", "ort-fp32", tmp_path / "x", keep_fp32=tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_failed_gate_leaves_out_as_it_was(tmp_path: Path,
                                            fake_pipeline: dict[str, Any]) -> None:
    fake_pipeline["fail"] = True
    with pytest.raises(MolmoError, match="Nothing was written"):
        _export(tmp_path / "new")
    assert not (tmp_path / "new").exists()  # no empty --out left behind
    previous = write_version(tmp_path / "previous", 1)
    before = snapshot(previous)
    with pytest.raises(MolmoError, match="Nothing was written"):
        _export(previous)
    assert snapshot(previous) == before


# --- failed verification is recorded ------------------------------------------------------------

@pytest.mark.slow
def test_an_export_that_fails_verification_is_marked_and_refused(tmp_path: Path) -> None:
    """NaN weights: the export exits 2, the manifest says verification.passed = false, the runtime
    refuses the artifact unless the caller opts in."""
    from safetensors.numpy import load_file, save_file

    from molmo_export.demo import materialize_preset

    ckpt = tmp_path / "nan-ckpt"
    shutil.copytree(materialize_preset("demo-random"), ckpt)
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    tensors = load_file(str(shard))
    name = next(k for k in sorted(tensors) if tensors[k].ndim == 2)
    tensors[name] = tensors[name].copy()
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    out = tmp_path / "art"
    # --max-crops 2: verification checks 1..3 crops instead of 1..13 (the failure is the point)
    proc = subprocess.run([sys.executable, "-m", "molmo_export.cli", "--model", str(ckpt),
                           "--target", "onnx", "--out", str(out), "--no-progress",
                           "--max-seq-len", "1024", "--max-crops", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "marked as failed" in proc.stderr and "--allow-unverified" in proc.stderr
    raw = json.loads((out / MANIFEST_NAME).read_text())
    assert raw["verification"]["passed"] is False
    assert "verification failed" in raw["verification"]["summary"]
    with pytest.raises(ArtifactError, match="failed its verification"):
        load_manifest(out)
    load_manifest(out, verify="full", allow_unverified=True)
    run = [sys.executable, "-m", "molmo_runtime.cli", str(out), "--prompt", "hi",
           "--max-new-tokens", "2"]
    refused = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--allow-unverified" in refused.stderr
    opted_in = subprocess.run([*run, "--allow-unverified"], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
    assert opted_in.returncode == 0, opted_in.stderr[-2000:]
    _assert_clean(out)
