"""One MatMulNBits node of a given shape, in several (bits, block size, accuracy level)
settings, timed interleaved on this CPU: what an LM head or a layer costs per decode step.

    python benchmarks/matmulnbits_variants.py --k 896 --n 37984 \
        --variants 8:128:4,4:32:4,4:32:1 --rounds 40 --threads 1

Each round runs every variant once (batch 1, one token: the decode step's shape). On a shared
machine a call is slowed by whatever else runs at that moment, never sped up, so the minimum
over rounds is the estimate of the undisturbed time; the median and the load are printed too.
Weights are random N(0, 0.02), quantized with the exporter's quantizer (ort_decoder); each
variant's max |error| against the float32 product is printed with the result's scale.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from molmo_export.export.ort_decoder import quantize_blockwise


def session(w: np.ndarray, bits: int, block: int, accuracy: int, threads: int
            ) -> ort.InferenceSession:
    n, k = w.shape
    packed, scales = quantize_blockwise(w, bits, block)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy)
    graph = helper.make_graph(
        [node], "matmulnbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, n])],
        [onnx.numpy_helper.from_array(packed, "B"), onnx.numpy_helper.from_array(scales, "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=896)
    p.add_argument("--n", type=int, default=37984)
    p.add_argument("--variants", default="8:128:4,4:32:4,4:32:1", help="bits:block:accuracy,...")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((args.n, args.k), np.float32) * np.float32(0.02)
    x = rng.standard_normal((1, 1, args.k), np.float32)
    ref = x[0, 0] @ w.T
    sessions = {v: session(w, *map(int, v.split(":")), args.threads)
                for v in args.variants.split(",")}
    errors = {v: float(np.abs(s.run(None, {"x": x})[0][0, 0] - ref).max())
              for v, s in sessions.items()}
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {v: [] for v in sessions}
    for _ in range(args.rounds):
        for v, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"x": x})
            times[v].append((time.perf_counter() - t) * 1e3)
    print(json.dumps({
        "shape": [args.k, args.n], "threads": args.threads, "rounds": args.rounds,
        "max_abs_result": float(np.abs(ref).max()),
        "variants": {v: {"min_ms": min(t), "median_ms": float(np.median(t)),
                         "max_abs_error": errors[v]} for v, t in times.items()},
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
