"""The compute limit of TTFT: matmul FLOPs of each stage, and this machine's fp32 GEMM rate.

Vision encoder, connector and prefill multiply many rows by each weight, so (unlike decode) they
are bound by arithmetic. FLOPs here are 2 x multiply-adds of every matmul with a weight and of
the attention products, counted from the model config in the manifest; elementwise work (norms,
softmax, activations) is left out, so the fractions are slight underestimates.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def vision_flops(config: dict[str, Any], crops: int) -> float:
    v = config["vision"]
    d, inner, mlp = v["hidden_size"], v["num_heads"] * v["head_dim"], v["intermediate_size"]
    n = (v["image_size"] // v["patch_size"]) ** 2 + 1  # patches + class token
    patch_dim = v["patch_size"] ** 2 * 3
    blocks = max(i % v["num_layers"] for i in v["vit_layers"]) + 1  # the ones the graph runs
    per_block = n * (3 * d * inner + inner * d + 2 * d * mlp) + 2 * n * n * inner
    return float(2 * crops * ((n - 1) * patch_dim * d + blocks * per_block))


def connector_flops(config: dict[str, Any], crops: int) -> float:
    v, p, d = config["vision"], config["pooling"], config["text"]["hidden_size"]
    feature = v["hidden_size"] * len(v["vit_layers"])
    inner = p["num_heads"] * p["head_dim"]
    windows = crops * ((v["image_size"] // v["patch_size"]) // p["pool_h"]) ** 2  # 144 a crop
    window = p["pool_h"] * p["pool_w"]  # keys per pooled token
    pool = feature * inner * (1 + 2 * window) + inner * p["hidden_size"] + 2 * window * inner
    projector = (2 * p["hidden_size"] + d) * p["projector_hidden_size"]  # gate, up; down
    return float(2 * windows * (pool + projector))


def prefill_flops(config: dict[str, Any], tokens: int) -> float:
    t = config["text"]
    d, hd = t["hidden_size"], t["head_dim"]
    q, kv = t["num_heads"] * hd, t["num_kv_heads"] * hd
    per_layer = tokens * (d * q + 2 * d * kv + q * d + 3 * d * (t["intermediate_size"] // 2))
    per_layer += 2 * tokens * tokens * q  # QK^T and PV over the whole (masked) square
    return float(2 * (t["num_layers"] * per_layer + d * t["embedding_size"]))  # + LM head, 1 row


def stage_flops(config: dict[str, Any], crops: int, prefill_tokens: int) -> dict[str, float]:
    return {"vision": vision_flops(config, crops), "connector": connector_flops(config, crops),
            "prefill": prefill_flops(config, prefill_tokens)}


def measure_gemm_gflops(size: int = 2048, reps: int = 5) -> float:
    """Best fp32 GEMM rate of numpy's BLAS (all its threads) on [size, size] matrices."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), np.float32)
    b = rng.standard_normal((size, size), np.float32)
    a @ b  # warm-up: thread pool start, page faults
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / 1e9


def compute_fractions(stack: dict[str, Any], flops: dict[str, float], gflops: float
                      ) -> dict[str, float]:
    """Achieved GFLOP/s of each stage as a fraction of the measured GEMM rate."""
    out = {}
    for stage, f in flops.items():
        ms = stack["ttft_ms"][stage]
        if ms > 0:
            out[stage] = f / (ms / 1000.0) / 1e9 / gflops
    return out
