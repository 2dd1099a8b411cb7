"""Every numerical bound the project checks results against, with why it is what it is.

Tests, `molmo-verify` and the export's verification phase read this one table; nothing else
holds a tolerance. A row bounds one compared quantity:

    max |got - reference|  <=  atol + rtol * max |reference|          (metric "max_abs")

or, for the rows with another `metric`, the number named there (`bound()` applies the same
formula, with `scale` what the row says). Torch-free: the runtime and calibration import it.

Where the bounds come from
--------------------------
float32 (FP32_ULP = 2**-23 = 1.19e-7, the spacing of float32 values relative to their magnitude):
two correct float32 computations of the same network differ only in the order in which sums are
rounded (GEMM blocking, SIMD width: SSE / AVX2 / AVX-512 / AMX, thread count, ONNX Runtime's MLAS
vs PyTorch's oneDNN/MKL). Measured, as the largest |error| / max |golden| over every stage and
golden case (`python -m tests.export.parity_spread`, 2026-12-02, 2-vCPU AMD EPYC with AVX2 and no
AVX-512, torch 2.13.0 CPU):
    1 thread / 2 threads (ATen AVX2 kernels)                 1.10e-6   (identical to each other)
    ATen "default" kernels, MKL SSE4.2, oneDNN SSE4.1, 1 thread  1.24e-6
    Intel Xeon AVX-512/AMX (issue 13)                        1.2e-6    (router_logits 1.99e-5 at 17)
    independent from-spec re-implementation (golden README)   7.6e-7
so the fp32 rows allow FP32_REORDER = 1e-5 relative to max |reference| (84 ulps: 8x the worst
spread seen). Nothing is claimed bit-exact unless it is exact on every CPU: only the image
preprocessing is (explicit per-tap float32 rounding in numpy, see "preprocess/*"); vit_pre_ln is
exact with AVX2 kernels and 1.8e-7 off with the default ones.

What a real bug looks like, for scale (`parity_spread --mutations`, same machine; worst stage
downstream of the bug, relative to max |x|): a norm epsilon 10x too large (1e-6 -> 1e-5 in the
decoder, 1e-5 -> 1e-4 in the ViT) 1.9e-4 .. 3.0e-4; one RMSNorm weight 1% off 2.8e-3; RoPE theta
x2 0.17. The subtlest of these is 17x above the bound, which is 8x above the measured spread.

fp16 (TensorRT): 11 significant bits, FP16_ULP = 2**-10 relative (4.9e-4 per rounding), ~10-20
roundings on the way to an output -> 1e-2 relative; "broken" (an fp32 island removed) is >= 0.2.

INT8 / INT4 quantized artifacts are not compared element-wise with fp32: their rows are the
quality metrics of molmo_calibration (cosine, KL, top-1 agreement where fp32's own top-1/top-2
margin exceeds the quantization error, see "quant/*").
"""

from __future__ import annotations

from dataclasses import dataclass

FP32_ULP = 2.0 ** -23  # relative spacing of float32 values (machine epsilon)
FP16_ULP = 2.0 ** -10
FP32_REORDER = 1e-5  # 84 ulps of the largest value: >= 8x every measured reordering spread


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float  # times `scale` (max |reference| for max_abs rows)
    reason: str
    metric: str = "max_abs"

    def bound(self, scale: float = 0.0) -> float:
        return self.atol + self.rtol * scale

    def check(self, error: float, scale: float = 0.0) -> bool:
        """error <= bound(scale), and never True for NaN."""
        return bool(error <= self.bound(scale))


def _fp32(reason: str, atol: float = 0.0) -> Tolerance:
    return Tolerance(atol, FP32_REORDER, reason)


TABLE: dict[str, Tolerance] = {
    # --- reference model (torch fp32) vs the official implementation (../shared/golden) ------
    # tests/export/test_model_golden.py. Scales: the golden arrays' max |x|.
    "golden/vit_pre_ln": _fp32("|x| <= 4.4; 1 op after the patch GEMM; Intel AMX 1.91e-6"),
    "golden/vision_features": _fp32("|x| <= 7.2; 2 ViT layers; re-impl 1.9e-6"),
    "golden/pool_out": _fp32("|x| <= 5.2; attention pooling; re-impl 2.1e-6"),
    "golden/connector_output": _fp32("|x| <= 26; re-impl 1.5e-5 (6e-7 rel)"),
    "golden/embeddings_in": _fp32("connector output added to token embeddings"),
    "golden/llm_hidden_states": _fp32("|x| <= 25; re-impl 1.9e-5 (7.6e-7 rel)"),
    "golden/prefill_logits": _fp32("|x| <= 4.4; re-impl 6.9e-6; 1 vs 2 threads 1.2e-6"),
    "golden/step_logits": _fp32("KV-cached steps; official step 0 vs prefill 1.4e-6"),
    "golden/router_logits": _fp32("|x| <= 17; re-impl 1.3e-5; Intel AMX 1.99e-5 (1.2e-6 rel)"),
    # --- exported graphs run by ONNX Runtime (torch-free runtime) vs the golden arrays -------
    # tests/runtime/test_runtime_golden.py: MLAS kernels reorder sums once more.
    "runtime_golden/vision_features": _fp32("ORT vs official, |x| <= 7.2"),
    "runtime_golden/connector_output": _fp32("ORT vs official, |x| <= 26"),
    "runtime_golden/embeddings_in": _fp32("ORT vs official, |x| <= 26"),
    "runtime_golden/prefill_logits": _fp32("ORT vs official, |x| <= 4.4"),
    # --- molmo-verify: fp32 artifact (ORT) vs the torch reference on unusual shapes ----------
    # Any model, so an atol floor for tensors whose max is near 0 (padding crops, tiny logits):
    # 1e-4 absolute is 100x the largest reordering error seen on golden-size values.
    "verify/vision_features": _fp32("ORT vs torch, crops 1..13", atol=2e-5),
    "verify/connector_tokens": _fp32("ORT vs torch, partial and -1 masks", atol=2e-5),
    "verify/prefill_logits": _fp32("ORT vs torch, batch 2 left-padded, 300 tokens", atol=1e-4),
    "verify/decode_logits": _fp32("ORT vs torch, past 1..257 in the preallocated cache",
                                  atol=1e-4),
    "verify/present_kv": _fp32("ORT vs torch, new keys/values", atol=1e-4),
    "verify/cosine": Tolerance(1e-5, 0.0, "1 - cosine of every fp32 stage: reorderings give "
                               "< 1e-9; a wrong element anywhere gives > 1e-4", "one_minus_cosine"),
    "verify/greedy_tie_margin": Tolerance(1e-4, 0.0, "a greedy token may differ only where the "
                                          "reference's top-1/top-2 logit margin is below this "
                                          "(= the logits atol)", "logit_margin"),
    # --- the reference model against itself with other shapes -------------------------------
    "self/kv_cache": Tolerance(2e-5, 0.0, "torch fp32: chunked prefill / cached decode vs full "
                               "recompute; other GEMM shapes, a few ulp at |logits| ~ 5"),
    "self/hf_decoders": Tolerance(1e-5, 0.0, "our 7B-O / MolmoE decoders vs transformers' Olmo2 "
                                  "/ OLMoE: eager vs fused attention, |hidden| ~ 5"),
    # --- image preprocessing (numpy) ---------------------------------------------------------
    "preprocess/golden_images": Tolerance(0.0, 0.0, "integer-exact recipe: same rounding and FMA "
                                          "order as the official SIMD kernel, on any CPU "
                                          "(numpy float64 emulation), golden README 4.5"),
    "preprocess/torch_generic_build": Tolerance(8 * FP32_ULP, 0.0, "torch built without "
                                                "AVX2/AVX-512 does not fuse: <= 1 ulp of [0, 1] "
                                                "values observed (9.5e-7), x8"),
    # --- fp16 (the fp16 ONNX graphs TensorRT builds from; engine rows: "trt-*" below) -------
    "fp16/graph_output": Tolerance(0.0, 1e-2, "fp16 rewrite vs fp32, relative to max|fp32|: "
                                   "~20 roundings of FP16_ULP"),
    "fp16/broken": Tolerance(0.0, 0.2, "an fp32 island removed: what 'broken' means (20x)"),
    "fp16/cosine": Tolerance(1e-3, 0.0, "1 - cosine of an fp16 engine's stage vs fp32: ~2u "
                             "of fp16 per element", "one_minus_cosine"),
    # --- quantized artifacts (molmo_calibration quality report; molmo-verify on int8/int4) ----
    # Scale: max |fp32 prefill logits| of the held-out samples. Measured on the random demo
    # (median over positions of max |dlogit| / scale), 2-vCPU AMD EPYC, AVX2 without VNNI:
    # ort-int8 5.6%, trt-int8-qdq 4.2%; broken ones: ort-int8 with full 8-bit weights (int16
    # saturation of the AVX2 kernel) 16.7%, ort-int4 26.9%.
    "quant/int8_logit_error": Tolerance(0.0, 0.10, "median of max|dlogit| <= 10% of the logit "
                                        "scale: 1.8x the worst correct int8 measured, below "
                                        "saturated int8 (16.7%) and int4 (26.9%)", "logit_error"),
    "quant/int8_kl_mean": Tolerance(0.0, 0.5 * 0.10 ** 2, "KL(fp32||int8) in nats ~ 1/2 "
                                    "Var_p(dlogit) <= 1/2 (logit error bound)^2 (second-order "
                                    "expansion); times scale^2. Measured 9e-4..1.9e-3 at scale "
                                    "3.2 (bound 0.051)", "kl_mean"),
    # ===== rows added by the trt / fused helpers (TensorRT path, chunked prefill) =====
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


def get(key: str) -> Tolerance:
    """TABLE[key], with the known keys listed when it is missing."""
    try:
        return TABLE[key]
    except KeyError:
        raise KeyError(f"no tolerance {key!r}; known: {', '.join(sorted(TABLE))}") from None
