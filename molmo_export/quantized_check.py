"""`molmo-verify` for quantized artifacts (ort-int8, ort-int4, trt-int8).

A quantized graph is meant to differ from fp32 by far more than fp32 rounding, so the fp32 bounds
do not apply. Instead this re-measures the quality gate the export applied: the same metrics
(molmo_calibration.report.compare), on the held-out samples of the calibration set recorded in
the manifest, against the thresholds stored in the artifact's quality report. The only change is
the fp32 side: the PyTorch reference stands in for the fp32 ONNX graphs (which a quantized export
does not keep). The two agree within the "verify/decode_logits" bound, so a top-1 agreement is
counted only where the reference's top-1/top-2 margin exceeds twice that bound; below it the fp32
top-1 itself is undefined to fp32 precision.

Where the model is too big to load (a CheckpointWeights is passed instead of the model), the
reference is the layer-streamed one (molmo_export.layer_reference), teacher-forced on the
quantized model's own greedy tokens, as the streaming export measured it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from molmo_calibration.calibration_set import load_calibration_set
from molmo_calibration import evaluate
from molmo_calibration.evaluate import GraphRunner, KVCache, prepare_samples, run_sample
from molmo_calibration.report import Thresholds, compare
from molmo_export.layer_reference import quantized_graph_files, streamed_traces
from molmo_export.model import MolmoForConditionalGeneration
from molmo_export.verify import StageResult
from molmo_export.weights import CheckpointWeights
from molmo_runtime.errors import ArtifactError
from molmo_runtime.graph_io import GraphDims
from molmo_runtime.manifest import Manifest, load_manifest
from molmo_runtime.tolerances import TABLE

Log = Callable[[str], None]


class TorchRunner:
    """The PyTorch reference behind molmo_calibration's GraphRunner interface."""

    def __init__(self, ref: MolmoForConditionalGeneration, dims: GraphDims) -> None:
        self.ref, self.dims = ref, dims

    def vision(self, images: np.ndarray) -> np.ndarray:
        return self.ref.vision(torch.from_numpy(images)).numpy()

    def connector(self, features: np.ndarray, masks: np.ndarray) -> np.ndarray:
        return self.ref.connector(torch.from_numpy(features), torch.from_numpy(masks)).numpy()

    def embed(self, input_ids: np.ndarray, image_tokens: np.ndarray | None,
              image_input_idx: np.ndarray | None) -> np.ndarray:
        x = self.ref.language_model.model.embed(torch.from_numpy(input_ids)[None])
        if image_tokens is not None and image_input_idx is not None:
            x = self.ref.add_image_tokens(x, torch.from_numpy(image_tokens)[None],
                                          torch.from_numpy(image_input_idx)[None])
        return x.numpy()

    def decode(self, embeds: np.ndarray, cache: KVCache) -> np.ndarray:
        """As GraphRunner.decode: `seq` new positions after cache.length, K/V appended."""
        past_len, seq = cache.length, embeds.shape[1]
        past = [(torch.from_numpy(k[:, :, :past_len]), torch.from_numpy(v[:, :, :past_len]))
                for k, v in zip(cache.keys, cache.values)] if past_len else None
        pos = torch.arange(past_len, past_len + seq)[None]
        mask = torch.ones(1, past_len + seq, dtype=torch.int64)
        lm = self.ref.language_model
        hidden, new_kv = lm.model(torch.from_numpy(embeds), pos, mask, past)
        for i, (k, v) in enumerate(new_kv):
            cache.keys[i][:, :, past_len:past_len + seq] = k.numpy()
            cache.values[i][:, :, past_len:past_len + seq] = v.numpy()
        cache.length += seq
        return lm.lm_head(hidden[:, -1])[0].numpy()


def verify_quantized(artifact_dir: Path, ref: MolmoForConditionalGeneration | CheckpointWeights,
                     log: Log = print) -> list[StageResult]:
    manifest = load_manifest(artifact_dir, verify="full", allow_unverified=True)
    report_file = manifest.path(manifest.raw.get("quality", {}).get("report",
                                                                    "quality_report.json"))
    if not report_file.is_file():
        raise ArtifactError(f"{artifact_dir} is quantized but has no quality report "
                            f"({report_file.name}); re-export it")
    recorded = json.loads(report_file.read_text())
    thresholds = Thresholds(**recorded["thresholds"])
    new_tokens = int(recorded["new_tokens"])
    calibration = manifest.raw.get("calibration", {})
    cs = load_calibration_set(calibration.get("set", "default"))
    if calibration.get("set_sha256") not in (None, cs.sha256):
        log(f"[molmo-verify] note: calibration set {calibration['set']!r} changed since export")
    held = [s for s in prepare_samples(cs, artifact_dir) if s.split == "heldout"]
    if isinstance(ref, CheckpointWeights):
        ref_traces, free = streamed_traces(manifest, held, new_tokens, ref, log)
        forced = free  # the reference was teacher-forced on the quantized model's tokens
    else:
        ref_traces, forced, free = _whole_model_traces(manifest, held, new_tokens, ref, log)
    stages, decoder, _ = compare(ref_traces, forced, free, [s.name for s in held])
    target = manifest.raw["quantization"]["target"]
    case = f"{target}, {len(held)} held-out samples"
    results = []
    vision = stages.get("vision_features")
    if vision is not None:
        results.append(StageResult(
            "vision_features", case, vision.max_abs, vision.cosine_min, thresholds.vision_cosine,
            vision.cosine_min >= thresholds.vision_cosine,
            f"worst-sample cosine >= {thresholds.vision_cosine}"))
    for name in ("image_tokens", "prefill_logits"):
        if name in stages:
            st = stages[name]
            results.append(StageResult(name, case, st.max_abs, st.cosine_min, 0.0, True,
                                       "reported, no threshold"))
    top1, counted = well_conditioned_top1(ref_traces, forced)
    results.append(StageResult(
        "decoder_top1", f"{case}, {counted} of {decoder.positions} positions", 0.0, top1,
        thresholds.decoder_top1, top1 >= thresholds.decoder_top1,
        f"top-1 agreement {top1:.2%} >= {thresholds.decoder_top1:.0%} (all positions "
        f"{decoder.top1:.2%}; gate recorded {recorded['decoder']['top1']:.2%}); "
        f"KL mean {decoder.kl_mean:.2g} nats"))
    return results


def _whole_model_traces(manifest: Manifest, held: list[evaluate.PreparedSample],
                        new_tokens: int, ref: MolmoForConditionalGeneration, log: Log
                        ) -> tuple[list[evaluate.Trace], ...]:
    """The reference's greedy traces, the quantized graphs teacher-forced on them, and free."""
    test = GraphRunner(quantized_graph_files(manifest), manifest.dims,
                       np.load(manifest.path("embed_tokens.npy"), mmap_mode="r"))
    reference = TorchRunner(ref.eval(), manifest.dims)
    ref_traces, forced, free = [], [], []
    with torch.no_grad():
        for i, sample in enumerate(held, 1):
            start = time.perf_counter()
            ref_traces.append(run_sample(reference, sample, new_tokens))  # type: ignore[arg-type]
            forced.append(run_sample(test, sample, new_tokens, ref_traces[-1].token_ids))
            free.append(run_sample(test, sample, new_tokens))
            log(f"[molmo-verify {i}/{len(held)}] held-out sample {sample.name}: "
                f"{new_tokens} tokens ({time.perf_counter() - start:.1f} s)")
    return ref_traces, forced, free


def well_conditioned_top1(ref: list, test: list) -> tuple[float, int]:
    """Top-1 agreement over positions where the reference's top-1/top-2 margin exceeds twice the
    fp32 reference-vs-ONNX bound, and how many positions that is."""
    ref_rows = np.concatenate([r.step_logits for r in ref])
    test_rows = np.concatenate([t.step_logits for t in test])
    top2 = np.sort(ref_rows, axis=-1)[:, -2:]
    tol = TABLE["verify/decode_logits"]
    noise = np.array([2 * tol.bound(float(np.abs(row).max())) for row in ref_rows])
    keep = (top2[:, 1] - top2[:, 0]) > noise
    agree = ref_rows.argmax(-1) == test_rows.argmax(-1)
    return (float(agree[keep].mean()) if keep.any() else 1.0), int(keep.sum())
