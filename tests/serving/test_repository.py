"""molmo-triton-repo without a server: what the model folder holds, what it refuses."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from molmo_runtime.errors import ArtifactError, InputError
from molmo_runtime.manifest import load_manifest
from molmo_triton.cli import main_repo
from molmo_triton.layout import ARTIFACT_DIRNAME, MARKER
from molmo_triton.repository import ModelOptions, model_config, write_model
from molmo_triton.tensors import INPUTS, OUTPUTS


def test_model_folder_holds_a_verified_copy_of_the_listed_files_only(
        demo_artifact: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(demo_artifact, art)
    (art / "notes.txt").write_text("a file the manifest does not list")
    model = write_model(art, tmp_path / "repo")
    copy = model / "1" / ARTIFACT_DIRNAME
    listed = {"manifest.json", *load_manifest(art).files}
    got = {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()}
    assert got == listed
    load_manifest(copy, verify="full")
    assert (model / "1" / "model.py").read_text().count("TritonPythonModel") >= 2
    assert (model / MARKER).is_file()
    # an absolute path to the source artifact appears nowhere: the folder can be moved
    assert str(art.resolve()) not in (model / "config.pbtxt").read_text()


def test_link_shares_the_bytes(demo_artifact: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(demo_artifact, art)
    model = write_model(art, tmp_path / "repo", link=True)
    onnx = next((art / "onnx").glob("*.onnx"))
    assert os.path.samefile(onnx, model / "1" / ARTIFACT_DIRNAME / "onnx" / onnx.name)


def test_tampered_artifact_is_refused_and_nothing_is_written(
        demo_artifact: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(demo_artifact, art)
    with open(art / "embed_tokens.npy", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ArtifactError):
        write_model(art, tmp_path / "repo")
    assert list((tmp_path / "repo").iterdir()) == []  # no half-written model folder


def test_existing_folders_are_replaced_only_when_ours_and_forced(
        demo_artifact: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "other").mkdir(parents=True)
    (repo / "other" / "keep.txt").write_text("user's")
    with pytest.raises(InputError, match="not written by molmo-triton-repo"):
        write_model(demo_artifact, repo, ModelOptions(name="other"), force=True)
    assert (repo / "other" / "keep.txt").read_text() == "user's"
    write_model(demo_artifact, repo, link=True)
    with pytest.raises(InputError, match="--force"):
        write_model(demo_artifact, repo, ModelOptions(instances=2), link=True)
    write_model(demo_artifact, repo, ModelOptions(instances=2), force=True, link=True)
    assert "count: 2" in (repo / "molmo" / "config.pbtxt").read_text()
    assert sorted(p.name for p in repo.iterdir()) == ["molmo", "other"]  # no temporaries


def test_config_says_what_the_options_say() -> None:
    text = model_config(ModelOptions(instances=3, kind="gpu", max_batch_size=8,
                                     max_queue_delay_us=500, threads=2,
                                     execution_env="$$TRITON_MODEL_DIRECTORY/env.tar.gz"), "x")
    for line in ('name: "molmo"', 'backend: "python"', "max_batch_size: 8",
                 "count: 3 kind: KIND_GPU", "max_queue_delay_microseconds: 500",
                 'key: "THREADS" value: { string_value: "2" }',
                 'key: "EXECUTION_ENV_PATH" value: { string_value: '
                 '"$$TRITON_MODEL_DIRECTORY/env.tar.gz" }'):
        assert line in text, line
    for spec in (*INPUTS, *OUTPUTS):
        assert f'name: "{spec.name}" data_type: TYPE_{spec.triton_type}' in text
    assert "decoupled" not in text and "dynamic_batching" not in model_config(ModelOptions(), "x")
    assert "decoupled: true" in model_config(ModelOptions(decoupled=True), "x")


@pytest.mark.parametrize("options, message", [
    (ModelOptions(name="../up"), "model name"),
    (ModelOptions(instances=0), "instances"),
    (ModelOptions(kind="tpu"), "kind"),
    (ModelOptions(decoupled=True, max_batch_size=4), "unbatched"),
    (ModelOptions(threads=0), "threads"),
])
def test_bad_options_are_refused(options: ModelOptions, message: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=message):
        write_model(tmp_path / "unused", tmp_path / "repo", options)


def test_cli_writes_a_model_and_reports_errors(demo_artifact: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    assert main_repo([str(demo_artifact), "--out", str(repo), "--stream", "--link"]) == 0
    assert "decoupled: true" in (repo / "molmo" / "config.pbtxt").read_text()
    assert main_repo([str(demo_artifact), "--out", str(repo)]) == 2
    assert "already exists" in capsys.readouterr().err
