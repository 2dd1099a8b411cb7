"""Resident memory of one artifact's decoder session, weight-file pages kept vs given back
(molmo_runtime/mapped_files.py). Not CI.

    python benchmarks/session_memory.py /big/7b-int4 [--steps 4] [--threads 2] [--rounds 3]

Each variant runs in a fresh process (ru_maxrss is a process's high-water mark): open the decoder
session alone, run a prefill of 16 positions and `--steps` decode steps, and report the resident
memory (anonymous / mapped file) after opening and after the steps, and the peak. Prints one JSON
line per variant and a table; also checks that both variants computed the same logits. Then,
with `--rounds` > 0, both variants open in one process and their decode steps are timed
alternating step by step (fused_vs_portable.measure: 20 steps a round at context 64), to show
what giving the pages back costs a step; twice, each variant opened first once (the one opened
second may find fewer free 2 MiB pages for its weights), each in a fresh process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
from typing import Any


def rollup() -> dict[str, int]:
    """Rss and Anonymous of this process, bytes (/proc/self/smaps_rollup)."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f.read().splitlines()[1:]:
            key, value = line.split(":", 1)
            if key in ("Rss", "Anonymous"):
                out[key] = int(value.split()[0]) * 1024
    return out


def child(artifact: str, page_out: bool, steps: int, threads: int) -> dict[str, object]:
    import numpy as np

    from molmo_runtime.backends.ort import OrtBackend
    from molmo_runtime.graph_io import DECODER
    from molmo_runtime.manifest import load_manifest

    manifest = load_manifest(artifact, "size")
    backend = OrtBackend(manifest, threads=threads, graphs=(DECODER,), page_out=page_out,
                         huge_pages=False)  # the collapse would copy while we measure
    opened = rollup()
    rng = np.random.default_rng(0)
    backend.start(1)
    length = 16
    embeds = rng.standard_normal((1, length, manifest.dims.d_model), np.float32)
    logits = backend.decode(embeds, np.ones((1, length), np.int64),
                            np.arange(length, dtype=np.int64)[None])
    digest = hashlib.sha256(logits.tobytes())
    for step in range(steps):
        pos = length + step
        logits = backend.decode(embeds[:, :1], np.ones((1, pos + 1), np.int64),
                                np.array([[pos]], np.int64))
        digest.update(logits.tobytes())
    after = rollup()
    return {"page_out": backend.page_outs[DECODER].summary(),
            "opened_rss": opened["Rss"], "opened_file": opened["Rss"] - opened["Anonymous"],
            "after_rss": after["Rss"], "after_file": after["Rss"] - after["Anonymous"],
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "logits_sha256": digest.hexdigest()}


def interleaved_steps(artifact: str, threads: int, rounds: int, given_first: bool
                      ) -> dict[str, object]:
    """Median decode step (ms) of each variant and of the per-round ratio given / kept."""
    import numpy as np
    from fused_vs_portable import measure

    from molmo_runtime.backends.ort import OrtBackend
    from molmo_runtime.graph_io import DECODER
    from molmo_runtime.manifest import load_manifest

    manifest = load_manifest(artifact, "size")
    order = (("given", True), ("kept", False)) if given_first else \
        (("kept", False), ("given", True))
    pair = {name: OrtBackend(manifest, threads=threads, graphs=(DECODER,), page_out=page_out)
            for name, page_out in order}
    # as the runtime runs: weights on 2 MiB pages where the kernel has free ones (the second
    # backend may get fewer: say which)
    pages = {k: b.huge_pages.summary() for k, b in pair.items()}
    out = measure(pair, manifest.dims.d_model, [64], 20, rounds, prefill=64)
    steps = {k: [r[k]["decode_ms@64"] for r in out] for k in pair}
    ratios = [g / k for g, k in zip(steps["given"], steps["kept"])]
    return {"opened_first": order[0][0], "huge_pages": pages,
            "kept_ms": float(np.median(steps["kept"])), "given_ms": float(np.median(steps["given"])),
            "ratio_median": float(np.median(ratios)), "ratio_min": min(ratios),
            "ratio_max": max(ratios)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["0", "1", "kept", "given"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child in ("0", "1"):
        print(json.dumps(child(args.artifact, args.child == "1", args.steps, args.threads)))
        return 0
    if args.child is not None:
        print(json.dumps(interleaved_steps(args.artifact, args.threads, args.rounds,
                                           args.child == "given")))
        return 0

    def in_child(mode: str) -> dict[str, Any]:
        out = subprocess.run([sys.executable, __file__, args.artifact, "--steps", str(args.steps),
                              "--threads", str(args.threads), "--rounds", str(args.rounds),
                              "--child", mode], check=True, capture_output=True, text=True).stdout
        return dict(json.loads(out.strip().splitlines()[-1]))

    rows = {}
    for page_out in ("0", "1"):
        rows[page_out] = in_child(page_out)
        print(json.dumps({"artifact": args.artifact, "machine": platform.processor() or
                          platform.machine(), "load": os.getloadavg(), **rows[page_out]}))
    gib = 2**30
    print(f"{'':24} {'kept':>10} {'given back':>11}")
    for key in ("opened_rss", "opened_file", "after_rss", "after_file", "peak_rss"):
        print(f"{key + ' (GiB)':24} {rows['0'][key] / gib:10.2f} {rows['1'][key] / gib:11.2f}")
    same = rows["0"]["logits_sha256"] == rows["1"]["logits_sha256"]
    print(f"same logits: {same}")
    for first in (("kept", "given") if args.rounds > 0 else ()):  # each opened first once
        steps = in_child(first)
        print(json.dumps({"interleaved_steps": steps, "load": os.getloadavg()}))
        print(f"decode step at context 64, median of {args.rounds} rounds, {steps['opened_first']} "
              f"opened first: kept {steps['kept_ms']:.1f} ms, given back {steps['given_ms']:.1f} "
              f"ms, ratio {steps['ratio_median']:.3f} ({steps['ratio_min']:.3f}-"
              f"{steps['ratio_max']:.3f})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
