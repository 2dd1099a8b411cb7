"""Streaming export: graphs traced without weights, initializers filled from the checkpoint.

    model built under FakeTensorMode (shapes only, no memory)
      ─► torch.onnx.export(dynamo, optimize=False) per graph: the graph template
      ─► Transpose nodes on a weight become WeightRef(param, perm) initializers (what the
         optimizer's constant folding does with real weights: the same graph results)
      ─► onnxscript's optimizer (weights are opaque to it: nothing large is folded)
      ─► molmo_calibration.streaming.write_graph: every WeightRef read from the checkpoint one
         tensor at a time (molmo_export.weights), converted (fp32 / fp16) or quantized on the
         way, appended to <graph>.onnx.data

Peak memory: the largest tensor (a few copies of it) plus the graph protos, whatever the model's
size; the checkpoint is read in place.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from molmo_export.config import MolmoConfig
from molmo_export.export.graphs import ConnectorGraph, DecoderGraph, VisionEncoderGraph
from molmo_export.export.onnx_graph import trace
from molmo_export.weights import CheckpointWeights
from molmo_runtime.errors import MolmoError
from molmo_runtime.manifest import Manifest

if TYPE_CHECKING:
    from molmo_calibration.report import QualityReport
    from molmo_calibration.streaming import RowBlocks
from molmo_runtime.graph_io import (
    CONNECTOR,
    DECODER,
    VISION_ENCODER,
    GraphSpec,
    all_graph_specs,
    decoder_spec,
)

ADAPTERS = {VISION_ENCODER: VisionEncoderGraph, CONNECTOR: ConnectorGraph, DECODER: DecoderGraph}
# Marks an initializer whose bytes come from the checkpoint (external_data "location").
WEIGHT_LOCATION = "molmo-checkpoint:"
SMALL_WEIGHT = 1024  # elements: onnx_ir's DeduplicateInitializersPass reads up to this size
# Weights over BLOCKED_ABOVE fp32 bytes are read in row blocks of about BLOCK_BYTES: the LM
# head and embeddings (2.2 GB at 7B, 5 GB at 72B) and the largest MLP weights. A weight read
# whole costs ~6x its size at peak (int8 quantization, measured in tests/scale/test_row_blocks),
# a blocked one ~11 blocks plus its scales: at 72B ~1.5 GB and ~0.9 GB instead of ~28 GB.
BLOCKED_ABOVE = 256 * 2**20
BLOCK_BYTES = 64 * 2**20


def fake_model(cfg: MolmoConfig) -> torch.nn.Module:
    """The reference model with fake parameters: right shapes and dtypes, no storage."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from molmo_export.model import MolmoForConditionalGeneration

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = MolmoForConditionalGeneration(cfg)
    return model.eval().requires_grad_(False)


def trace_template(model: torch.nn.Module, graph: str, spec: GraphSpec, opset: int,
                   read: Callable[[str], np.ndarray | None]) -> Any:
    """One graph of `model` (fake weights) as an onnx.ModelProto whose weight initializers are
    external references WEIGHT_LOCATION + "<param>" [+ "|<perm>"] (see weight_ref).

    Weights of at most SMALL_WEIGHT elements are read (`read`, checkpoint_reader) and kept in the
    proto: the optimizer inspects such small constants (deduplication), as it does in the
    in-memory export, so both see the same graph."""
    import onnx_ir as ir

    adapter = ADAPTERS[graph](model)
    full_name = {id(p): n for n, p in model.named_parameters()}
    params = {n: full_name[id(p)] for n, p in adapter.named_parameters()}
    program = trace(adapter, spec, opset, optimize=False)
    g = program.model.graph

    def placeholder(name: str, param: str, perm: tuple[int, ...] | None,
                    dtype: Any, shape: Any) -> Any:
        """Bytes that live in the checkpoint: an external reference the writer resolves (and
        that the optimizer never folds: nothing it would fold reads a weight any more)."""
        location = WEIGHT_LOCATION + param + ("" if perm is None else
                                              "|" + ",".join(map(str, perm)))
        if int(np.prod([int(d) for d in shape])) <= SMALL_WEIGHT:
            return ir.tensor(read(location), name=name)
        nbytes = dtype.itemsize * int(np.prod([int(d) for d in shape]))
        return ir.ExternalTensor(location, offset=0, length=nbytes, dtype=dtype, shape=shape,
                                 name=name)

    for name, value in list(g.initializers.items()):
        if name not in params:
            continue
        for node, _ in list(value.uses()):
            if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
                continue
            perm = tuple(node.attributes["perm"].as_ints()) if "perm" in node.attributes else \
                tuple(reversed(range(len(value.shape))))
            shape = ir.Shape([value.shape[i] for i in perm])
            folded_name = f"{name}|{','.join(map(str, perm))}"
            folded = ir.Value(name=folded_name, shape=shape, type=ir.TensorType(value.dtype),
                              const_value=placeholder(folded_name, params[name], perm,
                                                      value.dtype, shape))
            g.register_initializer(folded)
            node.outputs[0].replace_all_uses_with(folded)
            g.remove(node, safe=True)
        value.const_value = placeholder(name, params[name], None, value.dtype, value.shape)
        if not value.uses():
            g.initializers.pop(name)
    # The constant folder logs a warning for every weight it cannot read: here all of them
    # are checkpoint references by design, so those lines would only bury the progress bar.
    folder_log = logging.getLogger("onnxscript.optimizer")
    level = folder_log.level
    folder_log.setLevel(logging.ERROR)
    try:
        program.optimize()
    finally:
        folder_log.setLevel(level)
    return ir.to_proto(program.model)


def weight_ref(location: str) -> tuple[str, tuple[int, ...] | None] | None:
    """(param, perm) of a template initializer's external location, None for other files."""
    if not location.startswith(WEIGHT_LOCATION):
        return None
    param, _, perm = location[len(WEIGHT_LOCATION):].partition("|")
    return param, tuple(int(i) for i in perm.split(",")) if perm else None


def checkpoint_reader(weights: CheckpointWeights) -> Callable[[str], np.ndarray | None]:
    """location -> float32 array (transposed as the template asks), None if not ours."""

    def read(location: str) -> np.ndarray | None:
        ref = weight_ref(location)
        if ref is None:
            return None
        param, perm = ref
        tensor = weights.get(param, dtype=None)  # the checkpoint's dtype (bf16: half the bytes)
        if perm is not None:
            tensor = tensor.permute(perm)
        out = tensor.to(torch.float32, memory_format=torch.contiguous_format)
        del tensor
        return out.numpy()

    return read


def checkpoint_blocks(weights: CheckpointWeights, above: int = BLOCKED_ABOVE,
                      block_bytes: int = BLOCK_BYTES) -> Callable[[str], RowBlocks | None]:
    """location -> RowBlocks for the 2-D weights over `above` bytes (fp32) that the checkpoint
    can read by rows (write_graph then never holds them whole), None for the others."""
    from molmo_calibration.streaming import RowBlocks

    def blocks(location: str) -> RowBlocks | None:
        ref = weight_ref(location)
        if ref is None:
            return None
        param, perm = ref
        shape = weights.shapes[param]
        if len(shape) != 2 or perm not in (None, (1, 0)) or weights.nbytes(param) <= above \
                or weights.rows(param, 0, 1, torch.float32) is None:
            return None
        rows, cols = shape

        def read(r0: int, r1: int) -> np.ndarray:
            return weights.rows(param, r0, r1, torch.float32).numpy()  # type: ignore[union-attr]

        return RowBlocks(rows, cols, perm is not None, read,
                         block_rows=max(1, block_bytes // (cols * 4)))

    return blocks


def save_embeddings_by_rows(weights: CheckpointWeights, path: Path,
                            block_bytes: int = BLOCK_BYTES) -> None:
    """embed_tokens.npy (float32 [rows, D], what onnx_export.save_embeddings writes) from row
    blocks of the checkpoint: 5 GB at 72B, never in memory at once."""
    from molmo_runtime.fileio import atomic_path

    name = "language_model.model.embed_tokens.weight"
    rows, cols = weights.shapes[name]
    step = max(1, block_bytes // (cols * 4))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                "fortran_order": False, "shape": (rows, cols)})
        for r0 in range(0, rows, step):
            block = weights.rows(name, r0, min(r0 + step, rows), torch.float32)
            if block is None:
                raise MolmoError(f"{name} cannot be read by rows from {weights.directory}")
            f.write(memoryview(block.numpy().reshape(-1).view(np.uint8)))


def checkpoint_bytes(directory: Path) -> int:
    from molmo_export.checkpoint import weight_files

    return sum(f.stat().st_size for f in weight_files(directory))


def export_streaming_artifact(model: str | os.PathLike[str], out: str | os.PathLike[str], *,
                              target: str = "onnx", dtype: str = "fp32", max_crops: int = 12,
                              max_seq_len: int | None = None, opset: int | None = None,
                              force: bool = False, verify: bool = False, progress: bool = True,
                              fused: bool = True,
                              calibration_set: str | os.PathLike[str] = "default",
                              allow_degraded: bool = False,
                              log: Callable[[str], None] = print) -> Path:
    """Checkpoint -> artifact for `target` ("onnx", "ort-fp32", "ort-int8", "ort-int4") without
    ever holding the model: see the module docstring.

    Quantized targets are quantized on the way (MatMulNBits decoder from the checkpoint; the
    encoders, small at every Molmo size, through ORT's quantize_dynamic from an fp32 scratch
    copy), so no fp32 copy of the decoder is ever written. With `fused` the ort-* targets get
    the decoder made for ONNX Runtime (ort_decoder, written from the checkpoint tensor by tensor,
    big weights in row blocks) where the model allows it; it is not compared with a portable
    graph here (that needs both in memory): the same builder is checked against the portable
    graph at small scale (tests/export/test_fused_decoder.py). Their quality is measured before
    the commit against the layer-streamed PyTorch fp32 reference (molmo_export.layer_reference:
    one decoder layer in memory at a time), on the held-out samples of `calibration_set`, and
    gated as the in-memory path gates it (QualityError unless allow_degraded). Without a
    tokenizer the prompts cannot be tokenized: such an artifact says "quality":
    {"measured": false}.
    """
    import onnxruntime
    from tqdm.auto import tqdm

    from molmo_calibration.ort_quant import quantize_dynamic_int8
    from molmo_calibration.quantize import apply_gate, write_report
    from molmo_calibration.recipes import RECIPES
    from molmo_calibration.streaming import NBits, write_graph
    from molmo_export.export import FUSED_TARGETS, QUANTIZED_TARGETS
    from molmo_export.export.fused_artifact import PRECISION_KEY
    from molmo_export.export.ort_decoder import build_fused_decoder, unsupported_reason
    from molmo_export.export.tensor_source import CheckpointTensors
    from molmo_export.export.artifact_dir import ArtifactWriter
    from molmo_export.export.onnx_export import (
        EMBED_FILE,
        _verify_staged,
        artifact_manifest,
        check_max_crops,
        checked_max_seq_len,
        graph_dims,
        raise_if_verification_failed,
        resolve_checkpoint,
        write_processor_files,
    )
    from molmo_export.export.onnx_graph import DEFAULT_OPSET, check_graph_file
    from molmo_export.layer_reference import REFERENCE

    if target not in ("onnx", "ort-fp32", *QUANTIZED_TARGETS) or target == "trt-int8":
        raise MolmoError(f"--stream builds onnx, ort-fp32, ort-int8 and ort-int4 artifacts, not "
                         f"{target}")
    if dtype != "fp32" and target != "onnx":
        raise MolmoError(f"--dtype {dtype} is for --target onnx (GPU builds); ONNX Runtime CPU "
                         "targets keep fp32 weights (fp16 runs slower there)")
    check_max_crops(max_crops)
    opset = opset or DEFAULT_OPSET
    checkpoint = resolve_checkpoint(model)
    weights = CheckpointWeights(checkpoint)
    config = weights.config
    max_seq_len = checked_max_seq_len(config, max_seq_len)
    dims = graph_dims(config, max_crops, max_seq_len)
    specs = all_graph_specs(dims)
    recipe = RECIPES[QUANTIZED_TARGETS[target]] if target in QUANTIZED_TARGETS else None
    flavour: dict[str, Any] = {}
    if fused and target in FUSED_TARGETS:
        reason = unsupported_reason(config.text)
        flavour = {"decoder_flavour": "portable", "decoder_flavour_note": reason} if reason else {
            "decoder_flavour": "ort", "decoder_check": {
                "skipped": "streaming export: the builder is checked against the portable "
                           "graph at small scale"}}
        if not reason:
            specs[DECODER] = decoder_spec(dims, "ort")
    read = checkpoint_reader(weights)
    blocks = checkpoint_blocks(weights)
    fake = fake_model(config)
    writer = ArtifactWriter(out, force=force)
    precision: dict[str, str] = {}
    steps = tqdm(total=len(specs) + 1, desc="molmo-export (streaming)", unit="graph",
                 disable=not progress)
    try:
        for graph, spec in specs.items():
            steps.set_postfix_str(graph)
            dest = writer.path(spec.file)
            method = recipe.graphs[graph] if recipe else None
            fused_decoder = graph == DECODER and flavour.get("decoder_flavour") == "ort"
            template = None if fused_decoder else trace_template(fake, graph, spec, opset, read)
            if template is None:  # written node by node from the checkpoint, no trace
                method_name = method.method if method else "fp32"
                build_fused_decoder(CheckpointTensors(checkpoint), dims,
                                    PRECISION_KEY[method_name], dest)
                precision[graph] = method_name
            elif method is None:
                write_graph(template, dest, read=read, dtype=dtype, blocks=blocks)
                precision[graph] = dtype
            elif method.method == "int8-dynamic":
                scratch = writer.path(f".scratch/{graph}.onnx")
                write_graph(template, scratch, read=read, blocks=blocks)
                del template
                quantize_dynamic_int8(scratch, dest)
                shutil.rmtree(scratch.parent)
                precision[graph] = method.method
            else:
                bits = {"int8-weight-only-nbits": 8, "int4-weight-only-nbits": 4}[method.method]
                head = {None: None, "int8-weight-only-nbits": 8,
                        "int4-weight-only-nbits": 4}[method.lm_head]
                write_graph(template, dest, read=read, blocks=blocks,
                            nbits=NBits(bits, method.block_size, head, dims.vocab_rows))
                precision[graph] = method.method
            check_graph_file(dest, spec, checker=not fused_decoder)
            steps.update()
        steps.set_postfix_str("embeddings, tokenizer")
        save_embeddings_by_rows(weights, writer.path(EMBED_FILE))
        has_tokenizer = write_processor_files(checkpoint, writer.staging, max_crops, log)
        manifest = artifact_manifest(config, str(model), target if recipe is None else "onnx",
                                     precision, opset, dims, specs, max_crops, max_seq_len,
                                     has_tokenizer, writer.staged_files())
        manifest["streaming"] = {"weights_dtype": dtype, "checkpoint": str(checkpoint)}
        manifest.update(flavour)
        if recipe is not None:
            manifest.update(
                target=recipe.manifest_target,
                quantization={"target": recipe.target, "precision": recipe.precision,
                              "methods": dict(precision), "tool": "molmo_calibration.streaming",
                              "onnxruntime": onnxruntime.__version__,
                              "source": {"target": "checkpoint"}},
                calibration=None,
                quality={"measured": False,
                         "reason": "the checkpoint has no tokenizer: the calibration prompts "
                                   "cannot be run"})
        staged = writer.stage_manifest(manifest)
        if recipe is not None and has_tokenizer:
            steps.set_postfix_str("quality")
            report = measure_streamed_quality(Manifest(writer.staging, staged), weights,
                                              recipe.target, precision, calibration_set, log)
            writer.record_staged(write_report(report, writer.staging, log))
            apply_gate(report, allow_degraded)
            manifest.update(calibration=report.calibration, quality={
                **report.summary(), "measured": True, "reference": REFERENCE})
        elif recipe is not None:
            log(f"note: the quality of this {target} artifact was not measured: "
                f"{manifest['quality']['reason']}")
        if verify and recipe is None and dtype == "fp32":
            manifest["verification"] = _verify_staged(writer.staging, checkpoint, True, log)
        else:
            manifest["verification"] = {
                "passed": None, "summary": "skipped (streaming export: the PyTorch reference is "
                                           "not loaded)"}
        writer.commit(manifest)
        steps.update()
    except BaseException:
        writer.abort()
        raise
    finally:
        steps.close()
    raise_if_verification_failed(manifest, out)
    return Path(out)


def measure_streamed_quality(manifest: Manifest, weights: CheckpointWeights, target: str,
                             methods: dict[str, str], calibration_set: str | os.PathLike[str],
                             log: Callable[[str], None]) -> QualityReport:
    """The in-memory path's quality report (same set, held-out samples, new tokens, thresholds
    and metrics) with the layer-streamed reference in place of the fp32 graphs. The quantized
    model generates freely and the reference is teacher-forced on its tokens, so the "forced"
    and free traces are the same run. Not measured: the shapes task (it runs the fp32 graphs)."""
    from molmo_calibration.calibration_set import load_calibration_set
    from molmo_calibration.evaluate import prepare_samples
    from molmo_calibration.quantize import DEFAULT_NEW_TOKENS
    from molmo_calibration.report import QualityReport, Thresholds, compare
    from molmo_export.layer_reference import REFERENCE, streamed_traces

    cal_set = load_calibration_set(calibration_set)
    samples = prepare_samples(cal_set, manifest)
    held = [s for s in samples if s.split == "heldout"]
    log(f"measuring quality: {len(held)} held-out samples of {cal_set.name!r}, "
        f"{DEFAULT_NEW_TOKENS} tokens each, against the layer-streamed fp32 reference")
    start = time.perf_counter()
    ref, free = streamed_traces(manifest, held, DEFAULT_NEW_TOKENS, weights, log,
                                scratch=manifest.directory)  # the staging folder: ours
    stages, decoder, per = compare(ref, free, free, [s.name for s in held])
    thresholds = Thresholds()
    log(f"quality measured in {time.perf_counter() - start:.1f} s")
    return QualityReport(
        target=target, methods=dict(methods),
        calibration=cal_set.to_record(sum(s.split == "calibration" for s in samples)),
        new_tokens=DEFAULT_NEW_TOKENS, stages=stages, decoder=decoder, thresholds=thresholds,
        failures=thresholds.failures(stages, decoder), samples=per, reference=REFERENCE)
