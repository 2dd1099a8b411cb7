"""Decode's read bandwidth against the machine's, measured in alternation (not CI).

    python benchmarks/decode_bandwidth.py /big/7b-int4 --context 64 --pairs 100

On a VM whose neighbours take a share of the memory bandwidth that changes by the second, a
decode run and a bandwidth probe taken minutes (or even seconds) apart see different machines.
Here each decode step is paired with a probe right after it: numpy's matrix-vector product
over `--probe-mb` of float32 (what `molmo-bench`'s best probe method does, on 2 MiB pages as
numpy advises its large arrays; the decoder's weights are on 2 MiB pages too, see
molmo_runtime/huge_pages.py). Per pair: (decoder weight bytes / step time) / (probe bytes /
probe time); the median over pairs is the fraction, with its quartiles. A short pause after
each step lets ONNX Runtime's spinning threads stop before the probe runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from molmo_bench.bandwidth import decoder_weight_bytes  # noqa: E402

from molmo_runtime.backends.ort import OrtBackend  # noqa: E402
from molmo_runtime.graph_io import DECODER  # noqa: E402
from molmo_runtime.manifest import load_manifest  # noqa: E402

PAUSE_S = 0.05


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--probe-mb", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    m = load_manifest(args.artifact, "size")
    weight_bytes, _ = decoder_weight_bytes(m.directory, m.graphs[DECODER].file)
    backend = OrtBackend(m, providers=["CPUExecutionProvider"], threads=args.threads,
                         graphs=(DECODER,))
    pages = backend.huge_pages.summary()  # waits for the collapse
    matrix = np.ones((args.probe_mb * 2**20 // 4 // 4096, 4096), np.float32)
    vector = np.ones(4096, np.float32)
    rng = np.random.default_rng(0)
    d, ctx = m.dims.d_model, args.context
    backend.start(1)
    backend.decode(rng.standard_normal((1, ctx, d), np.float32), np.ones((1, ctx), np.int64),
                   np.arange(ctx, dtype=np.int64)[None])
    decode_gbs, probe_gbs = [], []
    for i in range(args.pairs + 1):
        s = ctx + i
        x = rng.standard_normal((1, 1, d), np.float32)
        t0 = time.perf_counter()
        backend.decode(x, np.ones((1, s + 1), np.int64), np.array([[s]], np.int64))
        t1 = time.perf_counter()
        time.sleep(PAUSE_S)
        t2 = time.perf_counter()
        matrix @ vector
        t3 = time.perf_counter()
        if i:  # the first step after the prefill is a warm-up
            decode_gbs.append(weight_bytes / (t1 - t0) / 1e9)
            probe_gbs.append(matrix.nbytes / (t3 - t2) / 1e9)
    fractions = np.array(decode_gbs) / np.array(probe_gbs)
    q1, med, q3 = (float(x) for x in np.percentile(fractions, [25, 50, 75]))
    print(json.dumps({
        "artifact": str(Path(args.artifact).resolve()), "context": ctx, "pairs": args.pairs,
        "threads": args.threads, "weight_gb": weight_bytes / 1e9, "huge_pages": pages,
        "decode_gb_per_s_median": float(np.median(decode_gbs)),
        "probe_gb_per_s_median": float(np.median(probe_gbs)),
        "probe_gb_per_s_max": float(np.max(probe_gbs)),
        "fraction_median": med, "fraction_quartiles": [q1, q3],
        "fraction_of_medians": float(np.median(decode_gbs) / np.median(probe_gbs)),
        "fraction_vs_best_probe": float(np.median(decode_gbs) / np.max(probe_gbs)),
        "load_avg": os.getloadavg(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
