"""write_model: an artifact directory -> one model of a Triton model repository.

    REPO/NAME/config.pbtxt           inputs/outputs (tensors.py), instances, batching, parameters
    REPO/NAME/1/model.py             re-exports molmo_triton.backend_model.TritonPythonModel
    REPO/NAME/1/artifact/...         a verified copy of the artifact (manifest + listed files)

The repository holds a copy of the artifact, not a path to it: a repository is what gets
mounted into a container, synced to object storage or shipped to a Jetson, and a reference to
an absolute path on the machine that wrote it would break on every one of those moves (and
would let the artifact change under a running server). The copy keeps the artifact contract:
only the files its manifest lists are copied, each checked against its sha256, and the model
verifies them again when Triton loads it. `link=True` hard-links instead of copying where the
file system allows (same bytes, no second copy on disk; the load-time check still holds).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from molmo_runtime.errors import ArtifactError, InputError
from molmo_runtime.manifest import MANIFEST_NAME, load_manifest
from molmo_triton.layout import ARTIFACT_DIRNAME, MARKER, MODEL_PY, VERSION
from molmo_triton.tensors import INPUTS, OUTPUTS, TensorSpec

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class ModelOptions:
    """What config.pbtxt says about serving; every field is a flag of molmo-triton-repo."""

    name: str = "molmo"
    instances: int = 1               # Triton model instances (one stub process + pipeline each)
    kind: str = "cpu"                # "cpu" | "gpu": KIND_CPU / KIND_GPU
    max_batch_size: int = 0          # > 0 enables Triton's dynamic batcher
    max_queue_delay_us: int = 0      # how long the batcher waits to fill a batch
    decoupled: bool = False          # stream tokens: one response per piece of text
    threads: int | None = None       # ONNX Runtime intra-op threads per instance
    default_max_new_tokens: int = 200
    execution_env: str | None = None  # EXECUTION_ENV_PATH: venv/conda dir or conda-pack tarball

    def check(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise InputError(f"model name {self.name!r}: use letters, digits, '_', '.', '-'")
        if self.instances < 1:
            raise InputError(f"instances must be >= 1, got {self.instances}")
        if self.kind not in ("cpu", "gpu"):
            raise InputError(f"kind must be 'cpu' or 'gpu', got {self.kind!r}")
        if self.max_batch_size < 0 or self.max_queue_delay_us < 0:
            raise InputError("max_batch_size and max_queue_delay_us must be >= 0")
        if self.decoupled and self.max_batch_size > 0:
            raise InputError("a streaming (decoupled) model is served unbatched: "
                             "use max_batch_size 0 with decoupled")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be >= 1, got {self.threads}")
        if self.default_max_new_tokens < 1:
            raise InputError("default_max_new_tokens must be >= 1")


def _tensor_block(spec: TensorSpec) -> str:
    dims = "-1" if spec.variable else "1"
    optional = " optional: true" if spec.optional else ""
    return (f'  {{ name: "{spec.name}" data_type: TYPE_{spec.triton_type} '
            f"dims: [ {dims} ]{optional} }}")


def model_config(options: ModelOptions, source: str) -> str:
    """The text of config.pbtxt."""
    params = {"DEFAULT_MAX_NEW_TOKENS": str(options.default_max_new_tokens)}
    if options.threads is not None:
        params["THREADS"] = str(options.threads)
    if options.execution_env:
        params["EXECUTION_ENV_PATH"] = options.execution_env
    lines = [f"# Written by molmo-triton-repo from {source}.",
             f'name: "{options.name}"', 'backend: "python"',
             f"max_batch_size: {options.max_batch_size}",
             "input [", ",\n".join(_tensor_block(s) for s in INPUTS), "]",
             "output [", ",\n".join(_tensor_block(s) for s in OUTPUTS), "]",
             f"instance_group [ {{ count: {options.instances} "
             f"kind: KIND_{options.kind.upper()} }} ]"]
    if options.max_batch_size > 0:
        lines.append("dynamic_batching { max_queue_delay_microseconds: "
                     f"{options.max_queue_delay_us} }}")
    if options.decoupled:
        lines.append("model_transaction_policy { decoupled: true }")
    lines += [f'parameters {{ key: "{k}" value: {{ string_value: "{_escape(v)}" }} }}'
              for k, v in params.items()]
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _copy_artifact(src: Path, dst: Path, link: bool) -> None:
    """Copy manifest.json and every file it lists (nothing else) from src to dst."""
    manifest = load_manifest(src, verify="full")  # refuse a broken artifact before copying
    root = src.resolve()
    for rel in [MANIFEST_NAME, *manifest.files]:
        source = (src / rel).resolve()
        if not source.is_relative_to(root):
            raise ArtifactError(f"{src / MANIFEST_NAME} names {rel!r}, outside the artifact")
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(source, target)
                continue
            except OSError:
                pass  # another file system: copy instead
        shutil.copyfile(source, target)
    load_manifest(dst, verify="full")


def write_model(artifact_dir: str | os.PathLike[str], repository: str | os.PathLike[str],
                options: ModelOptions = ModelOptions(), *, force: bool = False,
                link: bool = False) -> Path:
    """Write REPOSITORY/NAME for the artifact; returns the model folder.

    The folder is built beside its final place and renamed into it, so a reader never sees a
    half-written model. An existing REPOSITORY/NAME is replaced only with `force` and only if
    this module wrote it (it holds the marker file); anything else there is left alone.
    """
    options.check()
    artifact = Path(artifact_dir)
    repo = Path(repository)
    final = repo / options.name
    if final.exists() and not (force and (final / MARKER).is_file()):
        why = ("it was not written by molmo-triton-repo" if (force and final.exists())
               else "pass force=True (--force) to replace it")
        raise InputError(f"{final} already exists: {why}")
    repo.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{options.name}.", suffix=".partial", dir=repo))
    try:
        version = tmp / VERSION
        _copy_artifact(artifact, version / ARTIFACT_DIRNAME, link)
        source = f"{artifact.resolve().name} (target {load_manifest(artifact, 'none').target})"
        (tmp / "config.pbtxt").write_text(model_config(options, source))
        (version / "model.py").write_text(MODEL_PY)
        (tmp / MARKER).write_text("written by molmo-triton-repo; --force may replace it\n")
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{options.name}.", suffix=".old", dir=repo))
            os.replace(final, old / options.name)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final
