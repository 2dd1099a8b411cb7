"""Where a decode step's time goes: ONNX Runtime's profiler over an artifact's decoder.

    python benchmarks/decode_profile.py ARTIFACT [--context 64] [--steps 8] [--threads N]
        [--json FILE]

Runs the artifact's decoder alone through the runtime's ORT backend (the same session options
as molmo-run): a prefill of `context` random embeddings, then `steps` single-token steps, each
profiled. Prints per op type the milliseconds per step, the nodes per step and, for the weight
matmuls (MatMul / MatMulNBits with a weight initializer), the bytes of weights they read per
step and the rate they read them at, beside the step's wall time. With a bandwidth figure
(`--bandwidth-gbs`, e.g. molmo-bench's probe) it also says how close each part runs to it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fused_vs_portable import _fill, _step  # the same fill and timed step as the benchmarks
from molmo_runtime.backends.ort import OrtBackend
from molmo_runtime.graph_io import DECODER
from molmo_runtime.manifest import load_manifest

WEIGHT_OPS = ("MatMul", "MatMulNBits")


def weight_bytes(path: Path) -> dict[str, int]:
    """Node name -> bytes of the initializers it reads (external data counted by its length)."""
    model = onnx.load(str(path), load_external_data=False)
    size: dict[str, int] = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        size[t.name] = int(ext["length"]) if "length" in ext else len(t.raw_data)
    return {n.name: sum(size.get(i, 0) for i in n.input) for n in model.graph.node
            if n.op_type in WEIGHT_OPS and any(i in size for i in n.input)}


def profile(artifact: str, context: int, steps: int, threads: int | None) -> dict[str, Any]:
    m = load_manifest(artifact, "size")
    path = m.path(m.graphs[DECODER].file)
    nbytes = weight_bytes(path)
    with tempfile.TemporaryDirectory() as tmp:
        b = OrtBackend(m, providers=["CPUExecutionProvider"], threads=threads,
                       graphs=(DECODER,), profile_prefix=str(Path(tmp) / "p"))
        rng = np.random.default_rng(0)
        b.start(1)
        _fill(b, rng, m.dims.d_model, context)
        wall = [_step(b, rng, m.dims.d_model, s) for s in range(context, context + steps)]
        events = json.loads(Path(b.end_profiling()).read_text())
        b.close()
    runs = [e for e in events if e.get("name") == "model_run"][-steps:]
    start = runs[0]["ts"]
    ms: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    read: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") \
                or e["ts"] < start:
            continue
        op = e["args"].get("op_name", "?")
        ms[op] += e["dur"] / 1e3 / steps
        count[op] += 1
        read[op] += nbytes.get(e["name"][: -len("_kernel_time")], 0)
    ops = {op: {"ms_per_step": round(ms[op], 3), "nodes_per_step": count[op] // steps,
                "weight_bytes_per_step": read[op] // steps,
                "weight_gbs": round(read[op] / steps / (ms[op] / 1e3) / 1e9, 2)
                if read[op] else None}
           for op in sorted(ms, key=lambda o: -ms[o])}
    return {"artifact": artifact, "context": context, "steps": steps, "threads": threads,
            "step_wall_ms_median": round(float(np.median(wall)), 2),
            "model_run_ms_median": round(float(np.median([r["dur"] for r in runs])) / 1e3, 2),
            "kernel_ms_per_step": round(sum(ms.values()), 2),
            "weight_bytes_per_step": sum(read.values()) // steps, "ops": ops,
            "load_avg": os.getloadavg()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--context", type=int, default=64, help="positions in the cache (default 64)")
    p.add_argument("--steps", type=int, default=8, help="profiled decode steps (default 8)")
    p.add_argument("--threads", type=int, default=None, help="ORT threads (default: ORT's)")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="the machine's read bandwidth, for the fractions (default: none)")
    p.add_argument("--json", default=None, help="write the result here (default: not written)")
    a = p.parse_args()
    r = profile(a.artifact, a.context, a.steps, a.threads)
    step = r["model_run_ms_median"]
    print(f"decode step at context {a.context}: {r['step_wall_ms_median']} ms wall, "
          f"{step} ms in ORT's run, {r['kernel_ms_per_step']} ms in kernels; weights "
          f"{r['weight_bytes_per_step'] / 1e9:.3f} GB a step")
    if a.bandwidth_gbs:
        bound = r["weight_bytes_per_step"] / 1e9 / a.bandwidth_gbs * 1e3
        print(f"reading them at {a.bandwidth_gbs} GB/s takes {bound:.1f} ms: "
              f"{bound / step:.2f} of the step")
    print(f"{'op':<36}{'ms/step':>10}{'share':>8}{'nodes':>7}{'weights GB/s':>14}")
    for op, v in r["ops"].items():
        gbs = "" if v["weight_gbs"] is None else f"{v['weight_gbs']:.2f}"
        print(f"{op:<36}{v['ms_per_step']:>10.2f}{v['ms_per_step'] / step:>8.1%}"
              f"{v['nodes_per_step']:>7}{gbs:>14}")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
