"""Which ONNX Runtime thread pools keep spinning after a run (molmo_runtime.backends.ort.
session_options): the vision encoder's and connector's stop when their run ends, since the next
thing to run is another session; the decoder's keeps spinning between decode steps."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from molmo_runtime.backends.ort import OrtBackend, session_options
from molmo_runtime.graph_io import CONNECTOR, VISION_ENCODER
from molmo_runtime.manifest import load_manifest

STOP_KEY = "session.force_spinning_stop"
# CPU time the whole process may use while it sleeps 0.1 s after a run. A spinning pool uses a
# core for ~30 ms of it (measured on the demo: 0.032 s); with the pool stopped it was 0.0001 s.
IDLE_CPU_S = 0.005


def test_only_the_decoder_keeps_spinning() -> None:
    assert session_options(ort, 2, None, keep_spinning=False).get_session_config_entry(
        STOP_KEY) == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        session_options(ort, 2, None, keep_spinning=True).get_session_config_entry(STOP_KEY)


def _cpu_while_sleeping_after(run: object) -> float:
    """Median over 3 calls of the process's CPU time during a 0.1 s sleep right after `run`."""
    used = []
    for _ in range(3):
        run()  # type: ignore[operator]
        start = time.process_time()
        time.sleep(0.1)
        used.append(time.process_time() - start)
    return float(np.median(used))


def test_encoder_pools_are_idle_after_their_run(demo_artifact: Path) -> None:
    manifest = load_manifest(demo_artifact)
    backend = OrtBackend(manifest, providers=["CPUExecutionProvider"], threads=2,
                         graphs=(VISION_ENCODER, CONNECTOR))
    dims = [d if isinstance(d, int) else 1
            for d in manifest.graphs[VISION_ENCODER].inputs[0].dims]
    images = np.random.default_rng(0).random(dims, np.float32)
    features = backend.vision(images)  # the first run sets up what later runs reuse
    masks = np.ones((features.shape[0], manifest.graphs[CONNECTOR].inputs[1].dims[1]),
                    np.float32)
    backend.connector(features, masks)
    assert _cpu_while_sleeping_after(lambda: backend.vision(images)) < IDLE_CPU_S
    assert _cpu_while_sleeping_after(lambda: backend.connector(features, masks)) < IDLE_CPU_S
