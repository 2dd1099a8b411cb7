"""Run the golden tiny Molmo's cases through an exported artifact with the torch-free runtime.

Used by test_runtime_golden.py in a fresh subprocess, so the check also proves that the runtime
path never imports torch. Prints one JSON object: per case, the measured differences (with the golden scale) and the
generated ids; and the torch modules seen in sys.modules (must be none).

    python -m tests.runtime.golden_check ARTIFACT_DIR GOLDEN_DIR [MODEL_SUBDIR]

MODEL_SUBDIR is model (7B-D structure, default), model_7b_o or model_moe.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from molmo_runtime.pipeline import MolmoPipeline, Timings, _Clock



def _max_abs(a: np.ndarray, b: np.ndarray) -> list[float]:
    """[max |a - b|, max |b|]: the error and the golden scale it is bounded against."""
    return [float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()),
            float(np.abs(b).max())]


def _case_inputs(golden: Path, model: str, case: str
                 ) -> tuple[dict[str, np.ndarray], np.lib.npyio.NpzFile]:
    g = np.load(golden / model / f"golden_{case}.npz")
    batch = {"input_ids": g["input_ids"][None]}
    if "image_input_idx" in g.files:
        images = np.load(golden / "preprocess" / f"{case}.npz")["images"]
        batch.update(images=images[None], image_masks=g["image_masks"][None],
                     image_input_idx=g["image_input_idx"][None])
    return batch, g


def _batch2_inputs(golden: Path) -> tuple[dict[str, np.ndarray], np.lib.npyio.NpzFile]:
    g = np.load(golden / "model" / "golden_batch2_padded.npz")
    crops = g["image_masks"].shape[1]
    images = np.full((2, crops, 576, 588), -1.0, np.float32)  # whole padding crops of -1
    for row, case in enumerate(("chelsea", "tiny_80x50")):
        im = np.load(golden / "preprocess" / f"{case}.npz")["images"]
        images[row, : len(im)] = im
    return {"input_ids": g["input_ids"], "images": images, "image_masks": g["image_masks"],
            "image_input_idx": g["image_input_idx"]}, g


def main(artifact: str, golden_dir: str, model: str = "model") -> dict[str, object]:
    golden = Path(golden_dir)
    pipe = MolmoPipeline.from_dir(artifact, backend="ort")
    report: dict[str, object] = {}
    cases = sorted(p.stem[len("golden_"):] for p in (golden / model).glob("golden_*.npz"))
    for case in cases:
        if case == "batch2_padded":
            continue
        batch, g = _case_inputs(golden, model, case)
        res: dict[str, object] = {}
        if "images" in batch:
            feats = pipe.backend.vision(batch["images"][0])
            res["vision_features"] = _max_abs(feats, g["vision_features"])
            tokens = pipe.backend.connector(feats, batch["image_masks"][0])
            res["connector_output"] = _max_abs(tokens, g["connector_output"])
        embeds, mask, pos = pipe._prefill_inputs(batch, Timings(), _Clock())
        if "embeddings_in" in g.files:
            res["embeddings_in"] = _max_abs(embeds[0], g["embeddings_in"])
        pipe.backend.start(1)
        logits = pipe.backend.decode(embeds, mask, pos)
        res["prefill_logits"] = _max_abs(logits[0], g["prefill_logits"][-1])
        ids = pipe.generate_from_inputs(**batch, max_new_tokens=20, stop_at_eos=False)
        res["generated_ids"] = ids[0].tolist()
        res["golden_ids"] = g["generated_ids"].tolist()
        report[case] = res
    if "batch2_padded" in cases:
        batch, g = _batch2_inputs(golden)
        embeds, mask, pos = pipe._prefill_inputs(batch, Timings(), _Clock())
        pipe.backend.start(2)
        logits = pipe.backend.decode(embeds, mask, pos)
        ids = pipe.generate_from_inputs(**batch, max_new_tokens=20, stop_at_eos=False)
        report["batch2_padded"] = {
            "prefill_logits": _max_abs(logits, g["prefill_last_valid_logits"]),
            "generated_ids": ids.tolist(), "golden_ids": g["generated_ids"].tolist()}
    report["torch_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "torch")
    return report


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
