"""MolmoPipeline and molmo-run end to end on the demo artifact (image file -> text, points,
timings), in the torch-free environment too."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from molmo_runtime.errors import ArtifactError, InputError
from molmo_runtime.pipeline import MolmoPipeline
from tests.conftest import REPO

PHOTO = REPO / "runtime" / "molmo_runtime" / "assets" / "demo.jpg"
SHAPES = REPO / "runtime" / "molmo_runtime" / "assets" / "shapes.png"
# The bundled shapes image (assets/LICENSE.md says how it was drawn): the red circle's centre
# and radius in pixels.
RED_CIRCLE = (98.9, 81.7, 16.0)


@pytest.fixture(scope="module")
def pipe(demo_artifact: Path) -> MolmoPipeline:
    return MolmoPipeline.from_dir(demo_artifact, backend="ort")


def test_generate_from_a_photo(pipe: MolmoPipeline) -> None:
    result = pipe.generate(PHOTO, "Point to the cat.", max_new_tokens=12)
    assert len(result.token_ids) == 12 or result.finish_reason == "eos"
    t = result.timings
    assert t.vision_ms > 0 and t.connector_ms > 0 and t.prefill_ms > 0
    # BOS + image block + text, as the processor counts them without pixels
    assert t.prompt_tokens == pipe.processor.num_prompt_tokens("Point to the cat.", (300, 451))
    assert len(t.decode_ms) == len(result.token_ids) - 1


def test_stream_yields_the_same_text_as_generate(pipe: MolmoPipeline) -> None:
    streamed = "".join(pipe.stream(PHOTO, "Describe this image.", max_new_tokens=16))
    assert streamed == pipe.generate(PHOTO, "Describe this image.", max_new_tokens=16).text


def test_seeded_sampling_is_reproducible(pipe: MolmoPipeline) -> None:
    run = lambda seed: pipe.generate(None, "Tell me a story.", max_new_tokens=16,  # noqa: E731
                                     temperature=1.0, top_k=50, seed=seed).token_ids
    assert run(11) == run(11)
    assert len({tuple(run(s)) for s in range(4)}) > 1


def test_stop_string_ends_generation(pipe: MolmoPipeline) -> None:
    full = pipe.generate(None, "Count to ten.", max_new_tokens=24)
    if len(full.text) < 6:
        pytest.skip("the demo model's greedy answer is too short to cut")
    stop = full.text[3:5]
    cut = pipe.generate(None, "Count to ten.", max_new_tokens=24, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]


def test_prompt_over_the_limit_is_refused_before_vision(pipe: MolmoPipeline) -> None:
    limit = pipe.manifest.max_seq_len
    with pytest.raises(InputError, match=f"max_seq_len {limit}"):
        pipe.generate(PHOTO, "Describe this image.", max_new_tokens=limit)


def test_unreadable_image_is_a_clear_error(pipe: MolmoPipeline, tmp_path: Path) -> None:
    bad = tmp_path / "photo.jpg"
    bad.write_text("not an image")
    with pytest.raises(InputError, match="photo.jpg"):
        pipe.generate(bad, "Describe this image.")


def test_tampered_artifact_is_refused(demo_artifact: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(demo_artifact, art)
    table = np.load(art / "embed_tokens.npy")
    table[5, 0] += 1.0
    np.save(art / "embed_tokens.npy", table)
    with pytest.raises(ArtifactError, match="embed_tokens.npy"):
        MolmoPipeline.from_dir(art)


def test_molmo_run_cli_prints_json(demo_artifact: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "molmo_runtime.cli", str(demo_artifact),
                           "--image", str(PHOTO), "--prompt", "Point to the cat.",
                           "--max-new-tokens", "8", "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"text", "token_ids", "points", "finish_reason", "timings"}
    assert out["timings"]["ttft_ms"] > 0


def test_trained_demo_points_at_the_red_circle(demo_artifact: Path, tmp_path: Path) -> None:
    """What `make demo` shows: the answer, its point in pixels on the red circle, the picture."""
    out = tmp_path / "points.png"
    proc = subprocess.run([sys.executable, "-m", "molmo_runtime.cli", str(demo_artifact),
                           "--image", str(SHAPES), "--prompt", "Point to the red circle.",
                           "--max-new-tokens", "64", "--draw", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text, point_line = proc.stdout.splitlines()[:2]
    assert text.strip().startswith("<point ") and 'alt="red circle"' in text
    x, y = (float(v.split("=")[1]) for v in point_line.split()[1:3])
    assert out.stat().st_size > 0
    cx, cy, r = RED_CIRCLE
    assert (x - cx) ** 2 + (y - cy) ** 2 < r**2, f"({x:.1f}, {y:.1f}) is off the red circle"


def test_molmo_run_cli_error_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "molmo_runtime.cli", str(tmp_path),
                           "--prompt", "hi"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.startswith("molmo-run: error:") and "manifest.json" in proc.stderr
