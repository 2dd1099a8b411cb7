"""Which quantization each target applies to each graph: one declarative table.

ORT CPU targets use what ORT's CPU kernels make fastest: dynamic INT8 (MatMulInteger) for the
encoders and weight-only MatMulNBits for the decoder (measured on bench-0.5b, 2 cores: decode
2.6x (int8) / 2.8x (int4) faster than fp32; the vision encoder's dynamic INT8 graph ran in 0.48x
of fp32's time, its static QDQ graph in 0.67x).
The TensorRT target gets QDQ graphs (explicit quantization): only the weight MatMuls are
quantized, so LayerNorm, softmax (and the attention matmuls around it) and residual adds stay in
float. Its decoder is chosen between SmoothQuant W8A8 (preferred: int8 tensor-core matmuls) and
weight-only INT8 by measured quality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from molmo_runtime.graph_io import CONNECTOR, DECODER, VISION_ENCODER

Target = Literal["ort-int8", "ort-int4", "trt-int8-qdq"]

Method = Literal[
    "int8-dynamic",  # MatMulInteger: per-channel int8 weights, activations quantized per call
    "int8-weight-only-nbits",  # MatMulNBits bits=8, blockwise symmetric, int8 compute
    "int4-weight-only-nbits",  # MatMulNBits bits=4, blockwise symmetric, int8 compute
    "qdq-int8",  # static QDQ W8A8 for TensorRT, per-channel weights, calibrated activations
    "qdq-int8-smoothquant",  # the same after SmoothQuant (activation outliers moved to weights)
    "qdq-int8-weight-only",  # DequantizeLinear on per-channel int8 weights only
]


@dataclass(frozen=True)
class GraphRecipe:
    """How one graph is quantized. `candidates` > 1: chosen by measured quality, in order of
    preference (the first that meets the thresholds wins; else the best measured)."""

    candidates: tuple[Method, ...]
    block_size: int = 0  # MatMulNBits block along K
    lm_head: Method | None = None  # the LM head's own method, where it differs

    @property
    def method(self) -> Method:
        return self.candidates[0]


@dataclass(frozen=True)
class TargetRecipe:
    target: Target
    manifest_target: str  # what the artifact's manifest calls its target
    precision: str  # short name (manifest "quantization.precision")
    graphs: dict[str, GraphRecipe]
    qdq_dir: str | None = None  # TensorRT: QDQ graphs beside the fp32 ones

    @property
    def needs_calibration_data(self) -> bool:
        return any(m.startswith("qdq-") for r in self.graphs.values() for m in r.candidates)


_VISION_ORT = GraphRecipe(("int8-dynamic",))

RECIPES: dict[str, TargetRecipe] = {
    "ort-int8": TargetRecipe("ort-int8", "ort-int8", "int8", {
        VISION_ENCODER: _VISION_ORT, CONNECTOR: _VISION_ORT,
        DECODER: GraphRecipe(("int8-weight-only-nbits",), block_size=128)}),
    # 4-bit decoder, LM head included: an 8-bit head is 1.8x the bytes and on AVX2 ~2x the time
    # of a 4-bit one, and the task and top-1 gates hold with 4 bits (docs/fused_decoder.md).
    "ort-int4": TargetRecipe("ort-int4", "ort-int4", "int4", {
        VISION_ENCODER: _VISION_ORT, CONNECTOR: _VISION_ORT,
        DECODER: GraphRecipe(("int4-weight-only-nbits",), block_size=32)}),
    "trt-int8-qdq": TargetRecipe("trt-int8-qdq", "trt-int8", "int8", {
        VISION_ENCODER: GraphRecipe(("qdq-int8",)), CONNECTOR: GraphRecipe(("qdq-int8",)),
        DECODER: GraphRecipe(("qdq-int8-smoothquant", "qdq-int8-weight-only"))},
        qdq_dir="onnx/qdq"),
}
TARGETS: tuple[str, ...] = tuple(RECIPES)

# The task gate (molmo_calibration.shapes.gate): how much held-out task accuracy (pointing,
# counting, colour, and the well-formed fraction, each) a target may lose against fp32.
#   int8 (ORT and TensorRT QDQ): 1 point. 8-bit weights/activations move logits by about a
#     hundredth of their spread; an answer only changes where the fp32 model was itself at a
#     near-tie, so more than 1 point lost means real damage.
#   int4: 5 points. 4-bit blockwise weights (16 levels) are ~16x coarser than int8's; int4 is
#     the size/speed trade-off a user picks knowingly. 5 points is what still makes the
#     demo's answers mostly the fp32 ones, and is about twice the binomial standard error of
#     a task's accuracy on its ~150-240 held-out questions, so it flags a real loss rather
#     than which near-ties flipped.
TASK_MAX_DROP: dict[str, float] = {"ort-int8": 0.01, "trt-int8-qdq": 0.01, "ort-int4": 0.05}
