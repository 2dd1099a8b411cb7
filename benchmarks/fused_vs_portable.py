"""Portable against fused decoder of one model, interleaved, through the runtime's ORT backend.

    python benchmarks/fused_vs_portable.py ARTIFACT [--precisions fp32,int8,int4]
        [--contexts 64,450,1024] [--steps 16] [--rounds 3] [--prefill 600] [--json FILE]

ARTIFACT is a portable fp32 artifact (molmo-export --target onnx). Per precision the script
makes both decoders from it: the portable int8/int4 ones exactly as the ort-int8/ort-int4
targets do (molmo_calibration's recipe on the fp32 decoder), the fused ones from the checkpoint
recorded in the manifest (ort_decoder). It then checks that the two agree (fused_artifact's
check) and, for each round, times

    decode step   at each context: the cache filled to ctx, then `steps` single-token steps,
                  alternating portable / fused step by step (same inputs, same load)
    prefill       one call over `prefill` positions (the image-and-prompt prefill of TTFT),
                  each round (see measure())

and counts the nodes ONNX Runtime executes in one decode step (its profiler's node events).
Medians over rounds, with min..max, and fused/portable ratios per round (median and spread).
The machine is shared: every figure comes with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from molmo_bench.idle import settle
from molmo_runtime.backends.ort import OrtBackend
from molmo_runtime.errors import MolmoError
from molmo_runtime.graph_io import DECODER
from molmo_runtime.manifest import Manifest, load_manifest


def decoder_backend(m: Manifest, path: Path, flavour: str, threads: int | None,
                    profile: str | None = None, huge_pages: bool | None = None) -> OrtBackend:
    """The runtime's ORT backend over one decoder file (only the decoder graph is loaded);
    huge_pages None: as the runtime decides (molmo_runtime.huge_pages), waited for."""
    from molmo_export.export.fused_artifact import decoder_view

    backend = OrtBackend(decoder_view(m, path, flavour), providers=["CPUExecutionProvider"],
                         threads=threads, graphs=(DECODER,), profile_prefix=profile,
                         huge_pages=huge_pages)
    backend.huge_pages.wait()
    return backend


def make_decoders(m: Manifest, precision: str, work: Path, log: Callable[[str], None]
                  ) -> tuple[Path, Path, dict[str, Any]]:
    from molmo_calibration.ort_quant import quantize_for_ort
    from molmo_calibration.recipes import RECIPES
    from molmo_export.export.fused_artifact import compare_decoders
    from molmo_export.export.onnx_export import resolve_checkpoint
    from molmo_export.export.ort_decoder import build_fused_decoder
    from molmo_export.export.tensor_source import CheckpointTensors

    fp32 = m.path(m.graphs[DECODER].file)
    portable = fp32
    if precision != "fp32":
        portable = work / f"portable-{precision}" / "decoder.onnx"
        if not portable.exists():
            log(f"quantizing the portable decoder ({precision})")
            quantize_for_ort(fp32, portable, RECIPES[f"ort-{precision}"].graphs[DECODER],
                             m.dims.vocab_rows)
    fused = work / f"fused-{precision}" / "decoder.onnx"
    if not fused.exists():
        log(f"building the fused decoder ({precision})")
        source = CheckpointTensors(resolve_checkpoint(m.raw["model"]["source"]))
        build_fused_decoder(source, m.dims, precision, fused)
    try:
        check: dict[str, Any] = compare_decoders(portable, fused, m, precision)
    except MolmoError as e:  # timed all the same; the report says the check failed
        check = {"failed": str(e)}
    log(f"check {precision}: {check}")
    return portable, fused, check


def nodes_per_decode_step(m: Manifest, path: Path, flavour: str, ctx: int,
                          threads: int | None) -> int:
    """Nodes ORT runs in one decode step (its profiler, after its own graph optimisation)."""
    with tempfile.TemporaryDirectory() as tmp:
        b = decoder_backend(m, path, flavour, threads, profile=str(Path(tmp) / "p"))
        rng = np.random.default_rng(0)
        b.start(1)
        _fill(b, rng, m.dims.d_model, ctx)
        _step(b, rng, m.dims.d_model, ctx)
        events = json.loads(Path(b.end_profiling()).read_text())
        b.close()
    last = [e for e in events if e.get("name") == "model_run"][-1]  # the decode step
    return sum(1 for e in events if e.get("cat") == "Node"
               and e.get("name", "").endswith("_kernel_time")
               and last["ts"] <= e["ts"] <= last["ts"] + last["dur"])


def _fill(b: OrtBackend, rng: np.random.Generator, d: int, ctx: int) -> None:
    e = rng.standard_normal((1, ctx, d), np.float32)
    b.decode(e, np.ones((1, ctx), np.int64), np.arange(ctx, dtype=np.int64)[None])


def _step(b: OrtBackend, rng: np.random.Generator, d: int, total: int) -> float:
    e = rng.standard_normal((1, 1, d), np.float32)
    settle()  # the other backend's (or a probe's) threads stop spinning first
    t = time.perf_counter()
    b.decode(e, np.ones((1, total + 1), np.int64), np.array([[total]], np.int64))
    return (time.perf_counter() - t) * 1e3


def measure(pair: dict[str, OrtBackend], d: int, contexts: list[int], steps: int,
            rounds: int, prefill: int) -> list[dict[str, dict[str, float]]]:
    """Per round: the prefill of `prefill` positions (timed, one backend after the other), then
    at each context `steps` decode steps alternating between the backends step by step.
    The cache of a long context is filled once (untimed) and keeps growing over the rounds
    (by `steps` positions a round), so a 1024-token prefill is not paid per round."""
    out: list[dict[str, dict[str, float]]] = [{k: {} for k in pair} for _ in range(rounds)]
    for ctx in contexts:
        for r in range(rounds):
            if r == 0 or ctx == prefill:
                for k, b in pair.items():
                    b.start(1)
                    settle()
                    t = time.perf_counter()
                    _fill(b, np.random.default_rng(r), d, ctx)
                    if ctx == prefill:
                        out[r][k][f"prefill_ms@{prefill}"] = (time.perf_counter() - t) * 1e3
            times: dict[str, list[float]] = {k: [] for k in pair}
            rng = np.random.default_rng(100 + r)
            length = next(iter(pair.values())).cache_length
            for i in range(steps + 1):
                for k, b in pair.items():
                    ms = _step(b, rng, d, length + i)
                    if i:  # the first step after a fill is a warm-up
                        times[k].append(ms)
            for k in pair:
                out[r][k][f"decode_ms@{ctx}"] = float(np.median(times[k]))
    return out


def summarize(rounds: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    keys = list(rounds[0]["portable"])
    res: dict[str, Any] = {}
    for key in keys:
        row: dict[str, Any] = {}
        for k in ("portable", "fused"):
            v = [r[k][key] for r in rounds]
            row[k] = {"median": float(np.median(v)), "min": min(v), "max": max(v)}
        ratios = [r["fused"][key] / r["portable"][key] for r in rounds]
        row["ratio_fused_over_portable"] = {"median": float(np.median(ratios)),
                                            "min": min(ratios), "max": max(ratios)}
        res[key] = row
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--precisions", default="fp32,int8,int4")
    p.add_argument("--contexts", default="64,450,1024")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prefill", type=int, default=450,
                   help="timed prefill length; must be one of --contexts (default 450)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default=None, help="folder for the made decoders (kept, reused)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    m = load_manifest(args.artifact, "size")
    if m.decoder_flavour != "portable" or m.raw.get("quantization"):
        p.error("pass a portable fp32 artifact (molmo-export --target onnx)")
    work = Path(args.work or Path(args.artifact).with_name(Path(args.artifact).name + "-fused"))
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.prefill not in contexts:
        p.error("--prefill must be one of --contexts")
    report: dict[str, Any] = {"command": "python benchmarks/fused_vs_portable.py "
                              + " ".join(argv or __import__("sys").argv[1:]),
                              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "cpu": _cpu_name(), "threads": args.threads or "physical cores",
                              "results": {}}
    for prec in args.precisions.split(","):
        portable, fused, check = make_decoders(m, prec, work, print)
        nodes = {k: nodes_per_decode_step(m, f, fl, 64, args.threads)
                 for k, f, fl in (("portable", portable, "portable"), ("fused", fused, "ort"))}
        load_before = os.getloadavg()
        pair = {"portable": decoder_backend(m, portable, "portable", args.threads),
                "fused": decoder_backend(m, fused, "ort", args.threads)}
        rounds = measure(pair, m.dims.d_model, contexts, args.steps, args.rounds, args.prefill)
        for b in pair.values():
            b.close()
        del pair
        entry = {"check_vs_portable": check, "nodes_per_decode_step": nodes, "timings": summarize(rounds),
                 "load_avg_before": load_before, "load_avg_after": os.getloadavg()}
        report["results"][prec] = entry
        print(json.dumps({prec: entry}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
