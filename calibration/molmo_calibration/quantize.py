"""fp32 artifact -> quantized artifact + quality report (the API the exporter CLI calls).

    load fp32 manifest ─► calibration set ─► real Molmo preprocessing ─► fp32 reference traces
      ─► quantize each graph (recipes.RECIPES[target]) ─► run the quantized chain on the
      held-out samples ─► (shapes-task models: task accuracy, fp32 vs quantized)
      ─► quality_report.{json,md} ─► thresholds ─► manifest, committed last

Everything is written into a staging folder and moved into place at the end
(molmo_export.export.artifact_dir.ArtifactWriter), so an interrupted or failed run never leaves a
folder that looks complete, and a failed quality gate leaves `out_dir` as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from molmo_calibration.calibration_set import load_calibration_set
from molmo_calibration.evaluate import (
    GraphRunner,
    KVCache,
    PreparedSample,
    Trace,
    prepare_samples,
    run_sample,
)
from molmo_calibration.ort_quant import quantize_for_ort
from molmo_calibration.qdq import quantize_qdq_int8, strip_activation_qdq
from molmo_calibration.shapes.gate import (
    DEFAULT_QUESTIONS,
    compare_task,
    is_shapes_model,
    manifest_over,
)
from molmo_calibration.smoothquant import smooth_model
from molmo_calibration.recipes import RECIPES, TASK_MAX_DROP, Method, Target, TargetRecipe
from molmo_calibration.report import (
    DecoderStats,
    QualityError,
    QualityReport,
    QualityWarning,
    SampleResult,
    StageStats,
    Thresholds,
    compare,
)
from molmo_runtime.errors import ArtifactError, InputError, require
from molmo_runtime.graph_io import CONNECTOR, DECODER, VISION_ENCODER
from molmo_runtime.manifest import MANIFEST_NAME, Manifest, load_manifest

REPORT_JSON = "quality_report.json"
REPORT_MD = "quality_report.md"
FP32_TARGETS = ("onnx", "ort-fp32")
DEFAULT_NEW_TOKENS = 16
CALIBRATION_DECODE_STEPS = 2  # decode-step inputs per sample in the decoder's calibration data

Log = Callable[[str], None]


def quantize_artifact(src_artifact_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                      target: Target, calibration_set: str | os.PathLike[str] = "default", *,
                      allow_degraded: bool = False, progress: bool = True,
                      max_samples: int | None = None, new_tokens: int = DEFAULT_NEW_TOKENS,
                      thresholds: Thresholds = Thresholds(), threads: int | None = None,
                      force: bool = False, task_questions: int | None = None,
                      log: Log = print) -> QualityReport:
    """Quantize the fp32 artifact in `src_artifact_dir` for `target` into `out_dir`.

    target: "ort-int8" | "ort-int4" (ONNX Runtime CPU) | "trt-int8-qdq" (QDQ graphs for a
    TensorRT int8 engine build, written to onnx/qdq/ beside the fp32 graphs).
    Raises QualityError (with the numbers) when the quantized model is below `thresholds`,
    unless allow_degraded (then it warns and writes the artifact, marked as degraded).
    task_questions: held-out shapes questions for the task gate (None: 600 for a model trained
    on the shapes task, none for others; 0: skip it).
    """
    from molmo_export.export.artifact_dir import OutputLock

    recipe = _recipe(target)
    with OutputLock(out_dir):  # one writer at a time, from the first step on
        src = _fp32_manifest(src_artifact_dir)
        cal_set = load_calibration_set(calibration_set)
        step = _stepper(progress, log)
        step(f"preprocessing calibration set {cal_set.name!r} ({len(cal_set.samples)} samples)")
        samples = prepare_samples(cal_set, src, max_samples)
        record = cal_set.to_record(sum(s.split == "calibration" for s in samples))
        return quantize_prepared(src, out_dir, recipe.target, samples, record,
                                 allow_degraded=allow_degraded, progress=progress,
                                 new_tokens=new_tokens, thresholds=thresholds, threads=threads,
                                 force=force, task_questions=task_questions, log=log)


def quantize_prepared(src: Manifest, out_dir: str | os.PathLike[str], target: Target,
                      samples: Sequence[PreparedSample], calibration: dict[str, Any], *,
                      allow_degraded: bool = False, progress: bool = True,
                      new_tokens: int = DEFAULT_NEW_TOKENS,
                      thresholds: Thresholds = Thresholds(), threads: int | None = None,
                      force: bool = False, task_questions: int | None = None,
                      log: Log = print) -> QualityReport:
    """quantize_artifact on samples that are already preprocessed (tests, custom pipelines)."""
    from molmo_export.export.artifact_dir import OutputLock

    # Re-entrant: quantize_artifact already holds it. Its release also removes the empty work
    # area and an --out it created, so a failed gate leaves no trace.
    with OutputLock(out_dir):
        return _quantize_prepared(src, out_dir, target, samples, calibration,
                                  allow_degraded=allow_degraded, progress=progress,
                                  new_tokens=new_tokens, thresholds=thresholds, threads=threads,
                                  force=force, task_questions=task_questions, log=log)


def _quantize_prepared(src: Manifest, out_dir: str | os.PathLike[str], target: Target,
                       samples: Sequence[PreparedSample], calibration: dict[str, Any], *,
                       allow_degraded: bool, progress: bool, new_tokens: int,
                       thresholds: Thresholds, threads: int | None, force: bool,
                       task_questions: int | None, log: Log) -> QualityReport:
    from molmo_export.export.artifact_dir import WORK, ArtifactWriter

    recipe = _recipe(target)
    cal = [s for s in samples if s.split == "calibration"]
    held = [s for s in samples if s.split == "heldout"]
    if not cal or not held:
        raise InputError("quantization needs calibration and held-out samples "
                         f"(got {len(cal)} and {len(held)})")
    if new_tokens < 1:
        raise InputError(f"new_tokens must be at least 1, got {new_tokens}")
    step = _stepper(progress, log)
    writer = ArtifactWriter(out_dir, force=force)
    (writer.out / WORK).mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="calibration-", dir=writer.out / WORK))
    try:
        job = _Job(src, recipe, writer.staging, scratch, threads, step)
        step(f"fp32 reference: {len(held)} held-out samples, {new_tokens} tokens each")
        ref = [run_sample(job.fp32, s, new_tokens) for s in held]
        files = job.quantize_encoders(cal)
        report = job.choose_decoder(files, cal, held, ref, new_tokens, thresholds, calibration)
        _copy_unchanged_files(src, recipe, writer.staging)
        if task_questions is None:
            task_questions = DEFAULT_QUESTIONS if is_shapes_model(src) else 0
        if task_questions:
            step(f"task accuracy: fp32 and {recipe.target}, {task_questions} held-out questions")
            raw = _manifest(src, recipe, report, calibration)
            if recipe.qdq_dir:  # the QDQ graphs TensorRT builds from, run in ORT
                raw["graphs"] = raw["graphs_qdq"]
            task = compare_task(src.directory, manifest_over(writer.staging, raw),
                                TASK_MAX_DROP[recipe.target], task_questions, threads)
            report = dataclasses.replace(report, task=task, failures=thresholds.failures(
                report.stages, report.decoder, task))
        write_report(report, writer.staging, log)
        apply_gate(report, allow_degraded)
        shutil.rmtree(scratch)
        writer.commit(_manifest(src, recipe, report, calibration))
    except BaseException:
        writer.abort()
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    step(f"wrote {writer.out}")
    return report


def write_report(report: QualityReport, directory: Path, log: Log) -> list[str]:
    """quality_report.{json,md} into `directory` (the markdown is logged too); their names."""
    (directory / REPORT_JSON).write_text(report.to_json())
    (directory / REPORT_MD).write_text(report.to_markdown())
    log(report.to_markdown())
    return [REPORT_JSON, REPORT_MD]


def apply_gate(report: QualityReport, allow_degraded: bool) -> None:
    """QualityError below the thresholds; with allow_degraded a QualityWarning instead."""
    if report.passed:
        return
    message = (f"{report.target} quantization is below the quality thresholds: "
               + "; ".join(report.failures))
    if not allow_degraded:
        raise QualityError(message + ". Nothing was written. Use a larger or more "
                           "representative calibration set, another target, or "
                           "--allow-degraded to keep it anyway.", report)
    warnings.warn(message + " (kept: --allow-degraded)", QualityWarning, stacklevel=3)


@dataclass
class _Job:
    src: Manifest
    recipe: TargetRecipe
    staging: Path
    scratch: Path
    threads: int | None
    step: Log

    def __post_init__(self) -> None:
        self.w8a8: dict[str, Path] = {}  # graph -> its W8A8 QDQ file, once made
        self.embed = np.load(self.src.path("embed_tokens.npy"), mmap_mode="r")
        self.fp32_files = {name: self.src.graph_path(g) for name, g in self.src.graphs.items()}
        self.fp32 = self.runner(self.fp32_files)

    def runner(self, files: dict[str, Path]) -> GraphRunner:
        return GraphRunner(files, self.src.dims, self.embed, self.threads)

    def out_file(self, graph: str) -> str:
        """Artifact-relative path of the quantized graph."""
        base = Path(self.src.graphs[graph].file).name
        return f"{self.recipe.qdq_dir}/{base}" if self.recipe.qdq_dir else \
            self.src.graphs[graph].file

    def quantize(self, graph: str, method: Method, dest: Path,
                 feeds: Sequence[dict[str, np.ndarray]] | None) -> Path:
        src = self.fp32_files[graph]
        if method == "qdq-int8":
            quantize_qdq_int8(src, dest, feeds or [])
            self.w8a8[graph] = dest
        elif method == "qdq-int8-smoothquant":
            smoothed = self.scratch / "smoothed" / dest.name
            smooth_model(src, smoothed, feeds or [])
            quantize_qdq_int8(smoothed, dest, feeds or [])
        elif method == "qdq-int8-weight-only":
            # the weights are those of the W8A8 graph; its activation Q/DQ pairs are dropped
            if graph not in self.w8a8:
                self.w8a8[graph] = self.scratch / "w8a8" / dest.name
                quantize_qdq_int8(src, self.w8a8[graph], feeds or [])
            strip_activation_qdq(self.w8a8[graph], dest)
        else:
            quantize_for_ort(src, dest, self.recipe.graphs[graph], self.src.dims.vocab_rows)
        return dest

    def quantize_encoders(self, cal: list[PreparedSample]) -> dict[str, Path]:
        """Vision encoder and connector (one method each); returns graph -> quantized file."""
        files: dict[str, Path] = {}
        with_images = _unique_images(cal)
        vision_feeds: list[dict[str, np.ndarray]] = []
        connector_feeds: list[dict[str, np.ndarray]] = []
        if self.recipe.needs_calibration_data:
            for s in with_images:
                assert s.images is not None and s.image_masks is not None
                vision_feeds.append({"images": s.images})
                connector_feeds.append({"image_features": self.fp32.vision(s.images),
                                        "image_masks": s.image_masks})
        for graph, feeds in ((VISION_ENCODER, vision_feeds), (CONNECTOR, connector_feeds)):
            method = self.recipe.graphs[graph].method
            self.step(f"quantizing {graph}: {method}")
            files[graph] = self.quantize(graph, method, self.staging / self.out_file(graph),
                                         feeds)
        return files

    def decoder_feeds(self, cal: list[PreparedSample]) -> list[dict[str, np.ndarray]]:
        """Prefill inputs and a few decode-step inputs of the calibration samples (fp32)."""
        feeds = []
        for s in cal:
            tokens = None
            if s.images is not None and s.image_masks is not None:
                tokens = self.fp32.connector(self.fp32.vision(s.images), s.image_masks)
            embeds = self.fp32.embed(s.input_ids, tokens, s.image_input_idx)
            cache = KVCache.empty(self.src.dims, embeds.shape[1] + CALIBRATION_DECODE_STEPS)
            for _ in range(CALIBRATION_DECODE_STEPS + 1):
                feed = self.fp32.decoder_feed(embeds, cache)
                feeds.append({k: v.copy() for k, v in feed.items()})  # the cache moves on
                logits = self.fp32.decode(embeds, cache)
                embeds = self.fp32.embed(np.array([int(np.argmax(logits))]), None, None)
        return feeds

    def choose_decoder(self, files: dict[str, Path], cal: list[PreparedSample],
                       held: list[PreparedSample], ref: list[Trace], new_tokens: int,
                       thresholds: Thresholds, calibration: dict[str, Any]) -> QualityReport:
        """Quantize the decoder with each candidate method and keep the first that passes
        (else the best measured); returns the report of the chosen one."""
        candidates = self.recipe.graphs[DECODER].candidates
        feeds = self.decoder_feeds(cal) if any(m.startswith("qdq-") for m in candidates) else None
        final = self.staging / self.out_file(DECODER)
        measured: list[tuple[Method, Path, dict[str, StageStats], DecoderStats,
                             list[SampleResult], list[str]]] = []
        for method in candidates:
            self.step(f"quantizing {DECODER}: {method}")
            dest = final if len(candidates) == 1 else self.scratch / method / final.name
            self.quantize(DECODER, method, dest, feeds)
            self.step(f"measuring quality ({len(held)} held-out samples)")
            runner = self.runner({**files, DECODER: dest})
            forced = [run_sample(runner, s, new_tokens, forced_ids=r.token_ids)
                      for s, r in zip(held, ref)]
            free = [run_sample(runner, s, new_tokens) for s in held]
            stages, dec, per = compare(ref, forced, free, [s.name for s in held])
            failures = thresholds.failures(stages, dec)
            measured.append((method, dest, stages, dec, per, failures))
            del runner
            if not failures:
                break
        chosen = next((m for m in measured if not m[5]),
                      max(measured, key=lambda m: (m[3].top1, -m[3].kl_mean)))
        method, dest, stages, dec, per, failures = chosen
        if dest != final:
            final.parent.mkdir(parents=True, exist_ok=True)
            for f in dest.parent.iterdir():  # the graph and its external data file, if any
                os.replace(f, final.parent / f.name)
        methods: dict[str, str] = {g: r.method for g, r in self.recipe.graphs.items()}
        methods[DECODER] = method
        return QualityReport(
            target=self.recipe.target, methods=methods, calibration=calibration,
            new_tokens=new_tokens, stages=stages, decoder=dec, thresholds=thresholds,
            failures=failures, samples=per,
            candidates={m[0]: m[3] for m in measured} if len(candidates) > 1 else {})


def _unique_images(samples: list[PreparedSample]) -> list[PreparedSample]:
    """One sample per distinct image (prompts share an image: its crops are identical)."""
    seen: set[str] = set()
    out = []
    for s in samples:
        if s.images is None or s.image_masks is None:
            continue
        key = hashlib.sha256(s.images.tobytes()).hexdigest()
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def _recipe(target: str) -> TargetRecipe:
    if target not in RECIPES:
        raise InputError(f"unknown quantization target {target!r}; choose one of "
                         f"{', '.join(RECIPES)}")
    return RECIPES[target]


def _fp32_manifest(src_dir: str | os.PathLike[str]) -> Manifest:
    src = load_manifest(src_dir)  # sizes, and hashes of file states not seen before
    if src.target not in FP32_TARGETS or src.raw.get("quantization"):
        raise ArtifactError(
            f"{src.directory} is a {src.target!r} artifact; quantize an fp32 one "
            "(molmo-export --target onnx or ort-fp32)")
    if src.decoder_flavour != "portable":  # the fused decoder is made quantized from weights
        raise ArtifactError(
            f"{src.directory} holds the decoder made for ONNX Runtime; quantize a portable "
            "artifact (molmo-export --target onnx, or --decoder portable)")
    missing = {VISION_ENCODER, CONNECTOR, DECODER} - set(src.graphs)
    if missing:
        raise ArtifactError(f"{src.directory}: manifest lists no {', '.join(sorted(missing))} "
                            "graph; re-export it")
    return src


def _copy_unchanged_files(src: Manifest, recipe: TargetRecipe, staging: Path) -> None:
    """Everything of the source except the graphs that were replaced (hard links if possible)."""
    for rel in src.files:
        if rel == MANIFEST_NAME or (recipe.qdq_dir is None and rel.startswith("onnx/")):
            continue
        dest = staging / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src.path(rel), dest)  # artifact files are replaced, never edited in place
        except OSError:
            shutil.copy2(src.path(rel), dest)


def _manifest(src: Manifest, recipe: TargetRecipe, report: QualityReport,
              calibration: dict[str, Any]) -> dict[str, Any]:
    from molmo_export.export import utc_now

    ort = require("onnxruntime", "quant", "quantization")
    raw = {k: v for k, v in src.raw.items()
           if k not in ("files", "schema_version", "format", "quality", "calibration")}
    raw.update(
        target=recipe.manifest_target,
        created_utc=utc_now(),
        precision=dict(report.methods),
        quantization={"target": recipe.target, "precision": recipe.precision,
                      "methods": dict(report.methods), "tool": "molmo_calibration",
                      "onnxruntime": ort.__version__,  # type: ignore[attr-defined]
                      "source": {"target": src.target,
                                 "exporter_version": src.raw.get("exporter_version")}},
        calibration=calibration,
        quality=report.summary())
    if recipe.qdq_dir:
        raw["graphs_qdq"] = {name: {**spec.to_dict(),
                                    "file": f"{recipe.qdq_dir}/{Path(spec.file).name}"}
                             for name, spec in src.graphs.items()}
    return raw


def _stepper(progress: bool, log: Log) -> Log:
    def step(message: str) -> None:
        if progress:
            log(f"[molmo-calibration] {message}")
    return step
