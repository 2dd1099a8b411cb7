"""Shared test fixtures: where the golden data is, and skipping with a reason where it is absent."""

from __future__ import annotations

import fcntl
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import cpu_durations, skipped_elsewhere

REPO = Path(__file__).resolve().parents[1]
# CI puts a copy of shared/ beside the clone; MOLMO_GOLDEN overrides.
GOLDEN = Path(os.environ.get("MOLMO_GOLDEN", REPO.parent / "shared" / "golden"))


def pytest_addoption(parser: pytest.Parser) -> None:
    cpu_durations.add_option(parser)
    skipped_elsewhere.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    cpu_durations.configure(config)
    skipped_elsewhere.configure(config)


def golden_path(*parts: str) -> Path:
    """Path inside ../shared/golden; skips the calling test with a clear reason if absent."""
    p = GOLDEN.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"golden data not found at {p} (expected ../shared/golden beside the repo, "
                    "or set MOLMO_GOLDEN)")
    return p


@pytest.fixture(scope="session")
def golden() -> Path:
    return golden_path()


# Exported artifacts shared by the test sessions of `make test`: the torch environment exports
# them once, the torch-free runtime environment reuses them. A fingerprint of the exporter's
# sources guards against reusing an artifact written by older code.
ARTIFACTS = Path(os.environ.get("MOLMO_TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))


def _exporter_fingerprint() -> str:
    import hashlib

    h = hashlib.sha256()
    for root in ("molmo_export", "runtime/molmo_runtime"):
        # the sources, and the shipped demo weights (a new weights file is a new artifact)
        for f in sorted([*(REPO / root).rglob("*.py"), *(REPO / root).rglob("*.safetensors")]):
            h.update(f.relative_to(REPO).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def exported_artifact(name: str, model: str | Path, **kwargs: object) -> Path:
    """Export `model` once into ARTIFACTS/name (target onnx, no verification) and reuse it.

    Safe under pytest-xdist: a blocking flock on a sidecar file makes a second worker that needs
    the same artifact wait for the first one's export (the exporter's own lock would make it
    fail), then reuse it."""
    out = ARTIFACTS / name
    stamp = out / ".test-fingerprint"
    fingerprint = _exporter_fingerprint()

    def current() -> bool:
        return (out / "manifest.json").exists() and stamp.exists() and \
            stamp.read_text() == fingerprint

    if current():
        return out
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.skip(f"artifact {name} is not exported yet and torch is absent here: run the "
                    "torch test session first (make test-main)")
    from molmo_export.export import export_artifact

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with open(ARTIFACTS / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if current():  # exported by another worker while this one waited
            return out
        stamp.unlink(missing_ok=True)  # a stale stamp must not vouch for a half-written export
        export_artifact(model, "onnx", out, force=True, verify=False, progress=False,
                        log=lambda s: None, **kwargs)
        stamp.write_text(fingerprint)
    return out


@pytest.fixture(scope="session")
def golden_artifact() -> Path:
    return exported_artifact("golden-model", golden_path("model"), max_seq_len=1024)


@pytest.fixture(scope="session")
def demo_artifact() -> Path:
    return exported_artifact("demo", "demo", max_seq_len=2048)


# Held-out shapes questions the task gate answers per quantized demo (molmo-eval: 600).
TASK_QUESTIONS = 200


@pytest.fixture(scope="session")
def demo_quantized(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                   ) -> Callable[[str], tuple[Path, Any]]:
    """target -> (artifact, QualityReport): the demo artifact quantized once per session with the
    bundled calibration set. allow_degraded: the gate's decision is not what the tests using it
    check (int4 on random weights is below the int8-level thresholds); each asserts its metrics."""
    pytest.importorskip("molmo_runtime.processing", reason="MolmoProcessor not available")
    demo: Path = request.getfixturevalue("demo_artifact")
    from molmo_calibration import quantize_artifact
    from molmo_calibration.report import QualityWarning

    made: dict[str, tuple[Path, Any]] = {}

    def get(target: str) -> tuple[Path, Any]:
        if target not in made:
            out = tmp_path_factory.mktemp("demo-quantized") / target
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", QualityWarning)
                made[target] = (out, quantize_artifact(
                    demo, out, target, allow_degraded=True, task_questions=TASK_QUESTIONS,
                    progress=False, log=lambda s: None))
        return made[target]

    return get


@pytest.fixture(scope="session")
def demo_streamed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                  ) -> Callable[[str], Path]:
    """target -> the demo exported with `--stream` once per session (the demo artifact's
    max_seq_len). Quantized targets measure their quality against the layer-streamed reference;
    allow_degraded: int4 on the demo is below the int8-level top-1 gate (the in-memory path
    passes it on the shapes task, which needs the fp32 graphs a streaming export never has)."""
    pytest.importorskip("torch")
    from molmo_calibration.report import QualityWarning
    from molmo_export.export import export_artifact
    from molmo_runtime.manifest import load_manifest

    made: dict[str, Path] = {}

    def get(target: str) -> Path:
        if target not in made:
            dims = load_manifest(request.getfixturevalue("demo_artifact"), "none").dims
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", QualityWarning)
                made[target] = export_artifact(
                    "demo", target, tmp_path_factory.mktemp("demo-streamed") / target,
                    max_seq_len=dims.max_seq_len, stream=True, verify=False,
                    allow_degraded=True, progress=False, log=lambda s: None)
        return made[target]

    return get


@pytest.fixture(autouse=True, scope="session")
def _hash_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Artifact hash caches (molmo_runtime.hash_cache) of the test run go to a temporary folder,
    not the user's ~/.cache (subprocesses inherit it)."""
    os.environ.setdefault("MOLMO_HASH_CACHE", str(tmp_path_factory.mktemp("hash-cache")))
