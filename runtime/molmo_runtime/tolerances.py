"""Every numerical tolerance the tests use, with the reason for each. Torch-free.

A bound is `atol + rtol * max|reference|` over the compared tensor. Keys are "<area>/<what>".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    reason: str

    def bound(self, reference_max: float) -> float:
        return self.atol + self.rtol * reference_max


TABLE: dict[str, Tolerance] = {
    # -- TensorRT path (trt helper): fp16 engines simulated on a CPU ---------------------------
    # fp16 keeps 11 significant bits: one rounding is off by at most u = 2^-11 = 4.9e-4
    # (relative). A graph output is the end of a chain of roundings (the demo/golden graphs
    # have ~10-30 on the longest path, most of them damped by norms), so ~20u = 1e-2 of the
    # output's scale bounds it with the islands in place, while a broken island (an overflow,
    # a wrong cast) moves values by O(1) relative or makes them non-finite.
    "trt-fp16/vision_features": Tolerance(0.0, 1e-2, "fp16 graph with fp32 islands, true fp16 "
                                          "arithmetic (reference evaluator) vs fp32: ~20u"),
    "trt-fp16/connector_tokens": Tolerance(0.0, 1e-2, "as vision_features"),
    "trt-fp16/logits": Tolerance(0.0, 1e-2, "as vision_features (decoder logits, KV cache in "
                                 "fp16)"),
    # The runner simulated with the exported graphs (tests/gpu/fake_trt): ONNX Runtime runs the
    # fp16 graph (many nodes internally in fp32), so it lies within the true-fp16 bound above.
    "trt-sim/real_graphs": Tolerance(0.0, 1e-2, "fp16 engine graph (ORT) vs fp32 ORT backend: "
                                     "the fp16 bound, ~20u"),
    # Real TensorRT fp16 engines vs fp32 ONNX Runtime (tests/gpu; not yet run on a GPU).
    # TensorRT fuses ops and accumulates GEMMs in fp32, so it should do no worse than the
    # true-fp16 reference evaluator above (measured there on the demo graphs: ~1e-3 relative);
    # these leave ~10x headroom, and a real bug (mask, position, cache offset, binding) moves
    # values by O(1) relative. Decode reads the fp16 KV cache: twice the prefill bound.
    "trt-gpu/vision_features": Tolerance(1e-3, 1e-2, "fp16 engine vs fp32 ORT, ~20u"),
    "trt-gpu/connector_tokens": Tolerance(1e-3, 1e-2, "fp16 engine vs fp32 ORT, ~20u"),
    "trt-gpu/prefill_logits": Tolerance(1e-3, 1e-2, "fp16 engine vs fp32 ORT, ~20u"),
    "trt-gpu/decode_logits": Tolerance(1e-3, 2e-2, "plus the fp16 KV cache: twice prefill"),
    # Same engine, another path: a CUDA-graph replay runs the eager step's kernels on a mask
    # padded with exact zeros; chunked prefill sums attention in pieces. Differences are fp16
    # summation order only: a few u of max |logit|.
    "trt-gpu/graph_vs_eager": Tolerance(1e-3, 2e-3, "same kernels, padded mask: ~4u"),
    "trt-gpu/chunked_prefill": Tolerance(1e-3, 5e-3, "fp16 attention summed in chunks: ~10u"),
    # Chunked prefill vs one call, fp32 ORT: the same maths, attention summed in another order
    # (chunks see the cache in pieces; GEMMs of other shapes pick other kernels). fp32 rounding
    # u = 6e-8 per op over O(100) accumulations at ~1 scale: 1e-5 of max |logit| is > 100u.
    "prefill/chunked_vs_one_call": Tolerance(1e-6, 1e-5, "fp32, same maths in another "
                                             "summation order (>100u)"),
    # -- fused ONNX Runtime decoder (fused helper, issue 18): the fused graph against the
    # portable graph it replaces, same weights and inputs (molmo_export/export/fused_artifact.py)
    "fused/logits_vs_portable_fp32": Tolerance(
        1e-4, 1e-5, "fp32 both; only kernels and summation order differ (contrib attention, "
        "fused norms); the same bound as ORT-vs-PyTorch fp32 logits (molmo-verify)"),
    # int8/int4: identical quantized weights (same ORT block quantizer, same blocks). What
    # differs is float rounding of the activations, and MatMulNBits (accuracy_level 4) rounds
    # them to int8 per block: a rounding-level change flips some int8 levels, a step change
    # that deeper layers amplify. Measured on bench-0.5b (24 random-weight layers, 2026-12-02):
    # the portable int4 graph alone moves by 0.145 = 2.9% of max|logits| (4.96) when its input
    # moves by 1e-6 relative; fused vs portable differed by 0.104 (fp32: 7.9e-6). The bound is
    # ~1.7x that self-sensitivity; a real bug (position, mask, weight layout) moves logits by
    # O(100%).
    "fused/logits_vs_portable_int8": Tolerance(
        1e-3, 5e-2, "int8 activation rounding flips amplified over the layers: ~1.7x the "
        "quantized graph's own response to a 1e-6 input change (bench-0.5b)"),
    "fused/logits_vs_portable_int4": Tolerance(
        1e-3, 5e-2, "as int8 (same activation path; the int4 weights are identical)"),
}
