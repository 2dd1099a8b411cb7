"""Fixtures: a toy fp32 artifact (no torch) with preprocessed samples, and each quantized target
made from it once per session."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from molmo_calibration.evaluate import PreparedSample
from molmo_calibration.quantize import quantize_prepared
from molmo_calibration.report import QualityReport, QualityWarning
from molmo_runtime.manifest import load_manifest
from tests.calibration.toy_model import ToySizes, write_toy_artifact

TOY = ToySizes()
SYNTHETIC_SET = {"set": "synthetic", "set_sha256": "0" * 64, "samples": 6}


def synthetic_sample(seed: int, split: str, crops: int = 2, prompt: int = 120) -> PreparedSample:
    """Shaped like MolmoProcessor output: image tokens placed after a short prefix."""
    rng = np.random.default_rng(seed)
    idx = np.full((crops, 144), -1, np.int32)
    n_tokens = crops * 144 - 40  # some pooled tokens dropped (negative index), as in Molmo
    idx.reshape(-1)[:n_tokens] = 5 + np.arange(n_tokens)
    ids = rng.integers(0, TOY.vocab, 5 + n_tokens + prompt).astype(np.int64)
    masks = np.ones((crops, 576), np.float32)
    masks[-1, 400:] = 0.0  # a partly padded crop
    return PreparedSample(f"synthetic-{seed}", split, ids,  # type: ignore[arg-type]
                          rng.uniform(-1, 1, (crops, 576, 588)).astype(np.float32), idx, masks)


@pytest.fixture(scope="session")
def toy_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_artifact(tmp_path_factory.mktemp("toy") / "fp32")


@pytest.fixture(scope="session")
def toy_samples() -> list[PreparedSample]:
    return ([synthetic_sample(i, "calibration", crops=1 + i % 3) for i in range(6)]
            + [synthetic_sample(100 + i, "heldout", crops=1 + i % 2) for i in range(3)])


@pytest.fixture(scope="session")
def quantized(toy_artifact: Path, toy_samples: list[PreparedSample],
              tmp_path_factory: pytest.TempPathFactory
              ) -> Callable[[str], tuple[Path, QualityReport]]:
    """target -> (artifact dir, report), each made once. allow_degraded: these fixtures test the
    mechanics; where a random toy lands against the product thresholds is tested on its own
    (test_quality_gate.py) and on the demo model (test_demo_artifact.py)."""
    made: dict[str, tuple[Path, QualityReport]] = {}

    def get(target: str) -> tuple[Path, QualityReport]:
        if target not in made:
            out = tmp_path_factory.mktemp(target) / "artifact"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", QualityWarning)
                report = quantize_prepared(load_manifest(toy_artifact), out, target,  # type: ignore[arg-type]
                                           toy_samples, SYNTHETIC_SET, allow_degraded=True,
                                           progress=False, log=lambda s: None)
            made[target] = (out, report)
        return made[target]

    return get
