"""Stage-wise parity of an artifact against the PyTorch reference (`molmo-verify`).

Each stage runs the reference (torch) and the artifact (ONNX Runtime, through the runtime's own
backend and pipeline) on inputs whose shapes differ from the export's tracing shapes, so a
dimension frozen during tracing shows up here:

    vision features     crops 1, 2, 5, 13 (one padding crop of -1 included)
    connector tokens    same crop counts, masks with 0, partial, 1 and -1 rows
    prefill logits      batch 1 and 2 (a left-padded row), prompt lengths 7..300, past 0
    decode logits + KV  past lengths 1..257 inside the preallocated cache, seq 1 and 3
    greedy tokens       the first N tokens from the artifact, each checked against the reference
                        by teacher forcing (a different token passes only at a near-tie)

Bounds: rows "verify/*" of molmo_runtime.tolerances. A quantized artifact (ort-int8, ort-int4,
trt-int8) is not held to fp32 bounds: it is checked against the quality thresholds recorded in
its own quality report, with the report's metrics, on the held-out samples of its calibration set
(quantized_check.py). Each stage prints one progress line with its time as it completes.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from molmo_export.model import MolmoForConditionalGeneration
from molmo_runtime.errors import MolmoError
from molmo_runtime.manifest import load_manifest
from molmo_runtime.tolerances import TABLE

Log = Callable[[str], None]
MIN_COSINE = 1 - TABLE["verify/cosine"].atol
GREEDY_TIE_MARGIN = TABLE["verify/greedy_tie_margin"].atol


@dataclass
class StageResult:
    stage: str
    case: str
    max_abs: float
    cosine: float
    tolerance: float
    passed: bool
    note: str = ""


def compare(stage: str, case: str, got: np.ndarray, ref: np.ndarray) -> StageResult:
    if got.shape != ref.shape:
        return StageResult(stage, case, math.inf, 0.0, 0.0, False,
                           f"shape {got.shape} != reference {ref.shape}")
    g, r = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    max_abs = float(np.abs(g - r).max()) if g.size else 0.0
    denom = float(np.linalg.norm(g) * np.linalg.norm(r))
    cosine = float(g @ r / denom) if denom > 0 else 1.0
    tol = TABLE[f"verify/{stage}"].bound(float(np.abs(r).max(initial=0.0)))
    ok = bool(np.isfinite(g).all()) and max_abs <= tol and cosine >= MIN_COSINE
    return StageResult(stage, case, max_abs, cosine, tol, ok)


def progress_line(i: int, n: int, name: str, seconds: float, checks: int, failed: int) -> str:
    status = f"{failed} FAILED" if failed else "ok"
    plural = "" if checks == 1 else "s"
    return f"[molmo-verify {i}/{n}] {name}: {checks} check{plural} {status} ({seconds:.1f} s)"


def format_table(results: list[StageResult]) -> str:
    rows = [("stage", "case", "max abs", "cosine", "tolerance", "result")]
    for r in results:
        rows.append((r.stage, r.case, f"{r.max_abs:.2e}", f"{r.cosine:.7f}", f"{r.tolerance:.1e}",
                     ("pass" if r.passed else "FAIL") + (f" ({r.note})" if r.note else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _image_inputs(num_crops: int, patches: int, patch_dim: int,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(num_crops, patches, patch_dim, generator=gen)
    masks = torch.rand(num_crops, patches, generator=gen)
    masks[0, : patches // 4] = 0.0  # all-padding patches -> pad_embed[0]
    masks[-1] = -1.0  # the official last mask row
    if num_crops >= 5:
        images[-1] = -1.0  # a batch-padding crop: features must come out zero
        masks[1, patches // 2:] = 1.0
    return images, masks


def _crop_counts(max_crops: int) -> list[int]:
    return sorted({min(c, max_crops + 1) for c in (1, 2, 5, 13)})


class Verifier:
    def __init__(self, artifact_dir: Path, ref: MolmoForConditionalGeneration) -> None:
        from molmo_runtime.backends.ort import OrtBackend

        self.manifest = load_manifest(artifact_dir, verify="full", allow_unverified=True)
        self.ref = ref.eval()
        self.backend = OrtBackend(self.manifest, providers=["CPUExecutionProvider"])
        self.dims = self.manifest.dims
        self.gen = torch.Generator().manual_seed(1234)
        self.results: list[StageResult] = []

    def run_all(self, greedy_tokens: int = 8, log: Log = print) -> list[StageResult]:
        stages: list[tuple[str, Callable[[], None]]] = [
            ("vision features + connector tokens", self.vision_and_connector),
            ("prefill logits", self.prefill), ("decode logits + KV cache", self.decode),
            (f"greedy tokens ({greedy_tokens})", lambda: self.greedy(greedy_tokens))]
        with torch.no_grad():
            for i, (name, run) in enumerate(stages, 1):
                start, before = time.perf_counter(), len(self.results)
                run()
                failed = sum(not r.passed for r in self.results[before:])
                log(progress_line(i, len(stages), name, time.perf_counter() - start,
                                  len(self.results) - before, failed))
        return self.results

    def vision_and_connector(self) -> None:
        d = self.dims
        for crops in _crop_counts(d.max_crops):
            images, masks = _image_inputs(crops, d.patches_per_crop, d.patch_dim, self.gen)
            ref_feat = self.ref.vision(images)
            got_feat = self.backend.vision(images.numpy())
            self.results.append(compare("vision_features", f"crops={crops}", got_feat,
                                        ref_feat.numpy()))
            ref_tok = self.ref.connector(ref_feat, masks)
            got_tok = self.backend.connector(ref_feat.numpy(), masks.numpy())
            self.results.append(compare("connector_tokens", f"crops={crops}", got_tok,
                                        ref_tok.numpy()))

    def _ref_decoder(self, embeds: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                     past: list[tuple[torch.Tensor, torch.Tensor]] | None
                     ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        lm = self.ref.language_model
        hidden, new_kv = lm.model(embeds, pos, mask, past)
        return lm.lm_head(hidden[:, -1]), new_kv

    def prefill(self) -> None:
        d = self.dims
        limit = d.max_seq_len
        for batch, seq, pad in ((1, 7, 0), (2, min(300, limit), 37), (2, 33, 5)):
            embeds = torch.randn(batch, seq, d.d_model, generator=self.gen)
            mask = torch.ones(batch, seq, dtype=torch.int64)
            mask[-1, :pad] = 0  # left padding on the last row
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            ref_logits, _ = self._ref_decoder(embeds, mask, pos, None)
            self.backend.start(batch)
            got = self.backend.decode(embeds.numpy(), mask.numpy(), pos.numpy())
            self.results.append(compare("prefill_logits", f"batch={batch} seq={seq} pad={pad}",
                                        got, ref_logits.numpy()))

    def decode(self) -> None:
        d = self.dims
        for batch, past_len, seq in ((1, 1, 1), (2, 30, 1), (1, 11, 3),
                                     (1, min(257, d.max_seq_len - 3), 1)):
            total = past_len + seq
            embeds = torch.randn(batch, total, d.d_model, generator=self.gen)
            mask = torch.ones(batch, total, dtype=torch.int64)
            pos = torch.arange(total).expand(batch, total)
            # the artifact: prefill the first past_len positions, then one call over `seq`
            state = self.backend.new_state(batch)  # its own KV cache, read back below
            state.decode(embeds[:, :past_len].numpy(), mask[:, :past_len].numpy(),
                         pos[:, :past_len].numpy())
            got = state.decode(embeds[:, past_len:].numpy(), mask.numpy(),
                               pos[:, past_len:].numpy())
            # the reference: the same split, its own KV handed over explicitly
            _, past = self._ref_decoder(embeds[:, :past_len], mask[:, :past_len],
                                        pos[:, :past_len], None)
            ref_logits, new_kv = self._ref_decoder(embeds[:, past_len:], mask,
                                                   pos[:, past_len:], past)
            case = f"batch={batch} past={past_len} seq={seq}"
            self.results.append(compare("decode_logits", case, got, ref_logits.numpy()))
            cache = state._cache  # [B, kv, max_seq, hd] per K/V of each layer
            assert cache is not None
            got_kv = np.stack([c[:, :, past_len:total] for c in cache])
            state.close()
            ref_kv = np.stack([t.numpy() for kv in new_kv for t in kv])
            self.results.append(compare("present_kv", case, got_kv, ref_kv))

    def greedy(self, n: int) -> None:
        from molmo_runtime.pipeline import MolmoPipeline

        d = self.dims
        tokens = self.manifest.special_tokens
        pipe = MolmoPipeline(self.manifest, self.backend, processor=None)
        crops = min(3, d.max_crops + 1)
        images, masks = _image_inputs(crops, d.patches_per_crop, d.patch_dim, self.gen)
        per_crop = d.tokens_per_crop
        prompt_len = 1 + crops * (per_crop + 2) + 8
        vocab = int(self.ref.config.text.vocab_size)
        ids = torch.randint(0, min(vocab, tokens["im_start"]), (1, prompt_len), generator=self.gen)
        ids[0, 0] = tokens["bos"]
        idx = torch.full((1, crops, per_crop), -100, dtype=torch.int32)
        pos = 1
        for c in range(crops):  # <im_start> patches... <im_end> per crop, some dropped features
            ids[0, pos] = tokens["im_start"]
            keep = per_crop - (c % 2) * 4
            ids[0, pos + 1: pos + 1 + keep] = tokens["im_patch"]
            idx[0, c, :keep] = torch.arange(pos + 1, pos + 1 + keep, dtype=torch.int32)
            ids[0, pos + 1 + keep: pos + per_crop + 2] = tokens["im_end"]
            pos += per_crop + 2
        got = pipe.generate_from_inputs(ids.numpy(), images[None].numpy(), masks[None].numpy(),
                                        idx.numpy(), max_new_tokens=n, stop_at_eos=False)[0]
        full = torch.cat([ids, torch.as_tensor(got)[None]], 1)
        logits = self.ref(input_ids=full, images=images[None], image_masks=masks[None],
                          image_input_idx=idx).logits[0, prompt_len - 1: -1]  # [n, V]
        note, ok = "", True
        for step, token in enumerate(got.tolist()):
            best = int(logits[step].argmax())
            if token != best:
                margin = float(logits[step, best] - logits[step, token])
                ok = margin < GREEDY_TIE_MARGIN
                note = f"step {step}: {token} vs reference {best}, margin {margin:.1e}"
                break
        self.results.append(StageResult("greedy_tokens", f"{n} tokens, crops={crops}",
                                        0.0, 1.0, GREEDY_TIE_MARGIN, ok,
                                        note or "all match"))


def verify_artifact(artifact_dir: str | os.PathLike[str],
                    ref: MolmoForConditionalGeneration | str | os.PathLike[str] | None = None,
                    greedy_tokens: int = 8, log: Log = print,
                    layer_streamed: bool | None = None) -> list[StageResult]:
    """Run every stage, print the table, raise MolmoError if any stage fails.

    `ref` is the reference model, or the checkpoint directory / preset it was exported from
    (defaults to the manifest's recorded source). fp32 artifacts are held to the fp32 bounds,
    quantized ones to their quality report's thresholds (see the module docstring).
    layer_streamed: check a quantized artifact against the layer-streamed reference
    (molmo_export.layer_reference) instead of the loaded model; None: where the checkpoint is
    too big to load (the size rule that makes the export stream).
    """
    artifact_dir = Path(artifact_dir)
    manifest = load_manifest(artifact_dir, "none", allow_unverified=True)
    quantized = bool(manifest.raw.get("quantization"))
    if manifest.unmeasured_quality:  # before loading a reference that may not fit either
        raise MolmoError(
            f"{artifact_dir}: nothing to verify against: {manifest.unmeasured_quality}. "
            "molmo-verify holds a quantized artifact to the thresholds of its own quality report. "
            "To measure one: export it again with this version of molmo-export (a streaming "
            "export now measures it against the layer-streamed fp32 reference; "
            "docs/scale.md, 'Quality at 7B')")
    if not isinstance(ref, MolmoForConditionalGeneration):
        from molmo_export.export import too_big_to_load
        from molmo_export.export.onnx_export import resolve_checkpoint

        source = ref if ref is not None else manifest.raw["model"]["source"]
        if quantized and (too_big_to_load(source) if layer_streamed is None
                          else layer_streamed):
            from molmo_export.quantized_check import verify_quantized
            from molmo_export.weights import CheckpointWeights

            log(f"[molmo-verify] reference: layer-streamed from {source}")
            results = verify_quantized(
                artifact_dir, CheckpointWeights(resolve_checkpoint(source)), log)
            return _report(results, log)
        log(f"[molmo-verify] loading the reference model from {source}")
        ref = MolmoForConditionalGeneration.from_pretrained(resolve_checkpoint(source))
    if quantized:
        from molmo_export.quantized_check import verify_quantized

        results = verify_quantized(artifact_dir, ref, log)
    else:
        results = Verifier(artifact_dir, ref).run_all(greedy_tokens, log)
    return _report(results, log)


def _report(results: list[StageResult], log: Log) -> list[StageResult]:
    log(format_table(results))
    failed = [r for r in results if not r.passed]
    if failed:
        raise MolmoError(f"verification failed for {len(failed)} of {len(results)} checks "
                         f"({', '.join(sorted({r.stage for r in failed}))}); see the table above")
    log(f"verification passed: {len(results)} checks")
    return results
