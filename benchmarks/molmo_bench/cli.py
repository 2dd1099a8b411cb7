"""`molmo-bench ARTIFACT`: time to first token by stage, decode speed and latency percentiles,
decode step latency against the context, peak memory and the memory-bandwidth bound, optionally
against the PyTorch reference on the same weights and inputs.

    bandwidth + GEMM probe ─► open pipeline [+ torch reference in a child process]
      ─► warm-ups ─► N timed generations, each followed by a bandwidth probe ─► decode steps
         per context
         (with torch: the two stacks alternate step by step)
      ─► peak RSS ─► close ─► probes again ─► limits, speedups ─► JSON + markdown + PNG
"""

from __future__ import annotations

import argparse
import datetime
import gc
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from molmo_bench.idle import settle
from molmo_runtime.cli_common import (
    add_debug_flag,
    non_negative_int,
    positive_int,
    run_main,
)
from molmo_runtime.errors import InputError, require


def _contexts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. "
                                         "64,256,1024") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: context lengths must be positive")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="molmo-bench",
        description="Benchmark an artifact written by molmo-export: TTFT split into "
                    "preprocess / vision encoder / connector / prefill, decode tokens/s and "
                    "per-token p50/p90/p99, decode step latency per context length, peak "
                    "memory, and decode as a fraction of this machine's memory bandwidth.")
    p.add_argument("artifact", metavar="OUT", help="artifact directory (molmo-export --out)")
    p.add_argument("--backend", choices=("auto", "ort", "trt"), default="auto",
                   help="runtime backend (default: trt if the artifact has engines, else ort)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", default=None,
                     help="real image through the processor (preprocessing is timed; "
                          "default: none, synthetic inputs)")
    src.add_argument("--synthetic", action="store_true",
                     help="random pixels and prompt ids in the processor's layout (default)")
    p.add_argument("--prompt", default="Describe this image.",
                   help="prompt text with --image (default: 'Describe this image.')")
    p.add_argument("--crops", type=positive_int, default=None,
                   help="crops of the synthetic image, incl. the low-res overview (default 5)")
    p.add_argument("--prompt-tokens", type=positive_int, default=None,
                   help="text tokens after the synthetic image tokens (default 32)")
    p.add_argument("--new-tokens", type=positive_int, default=64,
                   help="tokens generated per run (greedy, EOS does not stop it; default 64)")
    p.add_argument("--runs", type=positive_int, default=3, help="timed generations (default 3)")
    p.add_argument("--warmup", type=non_negative_int, default=1,
                   help="untimed generations first (default 1)")
    p.add_argument("--contexts", type=_contexts, default=(64, 256, 1024),
                   help="context lengths for decode step latency (default 64,256,1024)")
    p.add_argument("--context-steps", type=positive_int, default=16,
                   help="timed decode steps per context length (default 16)")
    p.add_argument("--step-pairs", type=non_negative_int, default=32,
                   help="decode steps (at the first --contexts length) each followed by a "
                        "bandwidth probe in this process, for the step-by-step bandwidth "
                        "fraction; CPU backends only, 0 skips it (default 32)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for ORT and torch (default: physical cores)")
    p.add_argument("--compare-torch", action="store_true",
                   help="also run the PyTorch reference (fp32, same weights and inputs) and "
                        "report speedups; needs the export extra (default: off)")
    p.add_argument("--sequential", action="store_true",
                   help="with --compare-torch: run torch after the runtime is closed instead of "
                        "interleaving their steps (needs memory for one model at a time; "
                        "interleaving is fairer on a busy machine; default: off)")
    p.add_argument("--torch-model", default=None,
                   help="checkpoint for --compare-torch (default: the source recorded in the "
                        "artifact's manifest)")
    p.add_argument("--bandwidth-mb", type=positive_int, default=1024,
                   help="array size of the memory-bandwidth probe (default 1024 MiB)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the synthetic inputs (default 0)")
    p.add_argument("--eval", type=non_negative_int, default=0, metavar="N",
                   help="also answer N held-out shapes-task questions (models trained on the "
                        "task, e.g. the demo preset) and report the task accuracy (default 0)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write the results as JSON (default: not written)")
    p.add_argument("--markdown", default=None, metavar="FILE",
                   help="write the markdown table (it is always printed; default: not written)")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help="write a PNG: TTFT stage bars, decode latency vs context (default: "
                        "not written)")
    p.add_argument("--quiet", action="store_true", help="no progress lines (default: off)")
    add_debug_flag(p)
    return p


# The torch reference runs in a child process, whose thread pools settle() cannot see: after its
# step, a fixed pause (the one both stacks had before settle()) lets them stop spinning.
CHILD_PAUSE_S = 0.2


def _start_torch(args: argparse.Namespace, inputs: Any, settings: Any, threads: int,
                 log: Any) -> Any:
    from molmo_bench.torch_ref import TorchWorker

    log("loading the PyTorch reference (child process)")
    return TorchWorker(args.artifact, args.torch_model, inputs, settings, threads, args.quiet)


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import numpy as np
    from molmo_runtime.graph_io import DECODER
    from molmo_runtime.manifest import load_manifest
    from molmo_runtime.pipeline import MolmoPipeline

    from molmo_bench.bandwidth import (
        Bandwidth,
        StepProbe,
        decoder_weight_bytes,
        measure_in_subprocess,
    )
    from molmo_bench.flops import stage_flops
    from molmo_bench.inputs import image_inputs, synthetic_inputs
    from molmo_bench.machine import load_average, machine_info, physical_cores
    from molmo_bench.measure import BenchSettings, StackBench, decode_steps_at_context, plan
    from molmo_bench.report import busy_warnings, speedups, with_limits

    def log(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    if args.compare_torch:  # before the probes: one line at once in a runtime-only install
        require("torch", "export", "--compare-torch")
    if args.image is not None and (args.crops is not None or args.prompt_tokens is not None):
        raise InputError("--crops and --prompt-tokens shape the --synthetic inputs; with --image "
                         "the processor decides them (export with --max-crops to cap the crops)")
    threads = args.threads or physical_cores()
    machine = machine_info()
    machine["load_average_start"] = load_average()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    manifest = load_manifest(args.artifact, verify="size")
    if args.image is not None:
        inputs = image_inputs(args.image, args.prompt)
        sequence_tokens = None
    else:
        inputs = synthetic_inputs(manifest, args.crops or 5, args.prompt_tokens or 32, args.seed)
        assert inputs.arrays is not None
        sequence_tokens = int(inputs.arrays["input_ids"].shape[0])
    settings = BenchSettings(new_tokens=args.new_tokens, runs=args.runs, warmup=args.warmup,
                             contexts=args.contexts, context_steps=args.context_steps,
                             seed=args.seed)
    settings.check(manifest.max_seq_len, sequence_tokens)

    log(f"memory bandwidth and GEMM probes ({args.bandwidth_mb} MiB, child process)")
    bandwidth, gemm_gflops = measure_in_subprocess(threads, args.bandwidth_mb)

    interleave = args.compare_torch and not args.sequential
    worker = None
    if interleave:
        worker = _start_torch(args, inputs, settings, threads, log)
    try:
        log(f"opening {args.artifact} ({args.backend} backend, {threads} threads)")
        start = time.perf_counter()
        pipe = MolmoPipeline.from_dir(args.artifact, backend=args.backend, threads=threads,
                                      verify="none")  # sizes were checked above
        load_s = time.perf_counter() - start
        backend_name = pipe.backend.name
        # measured with the decoder's weights where they will stay (huge_pages.py), not while
        # the background collapse is still copying them
        huge = getattr(pipe.backend, "huge_pages", None)
        huge_pages = huge.summary() if huge is not None else None  # summary() waits
        if huge_pages:
            log(huge_pages)
        page_outs = {name: p.summary()
                     for name, p in getattr(pipe.backend, "page_outs", {}).items()}
        for summary in page_outs.values():
            log(summary)
        log(f"{backend_name}: {settings.warmup} warm-up(s), {settings.runs} runs of "
            f"{settings.new_tokens} tokens, contexts {','.join(map(str, settings.contexts))}"
            + (", interleaved step by step with the PyTorch reference" if interleave else ""))
        runtime_bench = StackBench(backend_name, pipe, inputs, settings, log=log)
        paired: list[Bandwidth] = []
        for kind, index in plan(settings):
            runtime_bench.step(kind, index)
            if kind == "run":  # the bandwidth this run had, as near in time as can be
                paired.append(measure_in_subprocess(threads, args.bandwidth_mb)[0])
                log(f"[{backend_name}] bandwidth probe after run {index + 1}: "
                    f"{paired[-1].read_gb_per_s:.1f} GB/s")
            if worker is not None:  # each stack starts with the other's threads idle
                settle()
                worker.step(kind, index)
                time.sleep(CHILD_PAUSE_S)
        runtime = runtime_bench.result()  # peak RSS taken: the probe's array comes after
        step_pairs, step_probes = None, None
        on_cpu = getattr(pipe.backend, "providers", [""])[0] == "CPUExecutionProvider"
        if args.step_pairs and on_cpu:
            log(f"[{backend_name}] {args.step_pairs} decode steps at context "
                f"{settings.contexts[0]}, each followed by a bandwidth probe")
            probe = StepProbe(args.bandwidth_mb)
            steps_ms = decode_steps_at_context(pipe, settings.contexts[0], args.step_pairs, 1,
                                               np.random.default_rng(settings.seed), probe)
            step_pairs = {"context": settings.contexts[0], "step_ms": steps_ms,
                          "probe_gb_per_s": probe.gb_per_s}
            step_probes = probe.best()
            del probe
        task = None
        if args.eval:
            from molmo_calibration.shapes.evaluate import evaluate_pipeline

            log(f"task accuracy: {args.eval} held-out shapes questions")
            task = evaluate_pipeline(pipe, args.eval).to_dict()
        pipe.backend.close()
        del pipe, runtime_bench  # free the sessions and their threads before anything else runs
        gc.collect()
        if args.compare_torch and worker is None:  # --sequential: torch after ORT is gone
            worker = _start_torch(args, inputs, settings, threads, log)
            for kind, index in plan(settings):
                worker.step(kind, index)
        torch_result = worker.result() if worker is not None else None
    finally:
        if worker is not None:
            worker.close()
    decoder_file = manifest.graphs[DECODER].file
    machine["load_average_end"] = load_average()
    log("memory bandwidth and GEMM probes, again (the best of both runs is the limit)")
    bandwidth_after, gflops_after = measure_in_subprocess(threads, args.bandwidth_mb)
    bandwidth, gemm_gflops = bandwidth.merge(bandwidth_after), max(gemm_gflops, gflops_after)
    for probe in [*paired, *([step_probes] if step_probes else [])]:
        bandwidth = bandwidth.merge(probe)
    weight_bytes, weight_method = decoder_weight_bytes(manifest.directory, decoder_file)
    flops = stage_flops(manifest.model_config, runtime["crops"], runtime["prefill_tokens"])
    runtime = with_limits(runtime, weight_bytes, bandwidth.read_gb_per_s, flops, gemm_gflops,
                          [p.read_gb_per_s for p in paired], step_pairs)
    if torch_result is not None:
        torch_result = with_limits(torch_result, torch_result["weight_bytes"],
                                   bandwidth.read_gb_per_s, flops, gemm_gflops)

    report: dict[str, Any] = {
        "tool": {"name": "molmo-bench", "version": machine["libraries"].get("molmo-export")},
        "date_utc": date,
        "command": "molmo-bench " + shlex.join(argv),
        "artifact": {"path": str(Path(args.artifact).resolve()),
                     "model": manifest.raw["model"]["name"], "target": manifest.target,
                     "precision": manifest.raw.get("precision"),
                     "max_seq_len": manifest.max_seq_len, "max_crops": manifest.max_crops},
        "backend": backend_name,
        "threads": threads,
        "open_s": load_s,
        "huge_pages": huge_pages,
        "page_out": page_outs,
        "inputs": inputs.describe(),
        "settings": {"interleaved": interleave, "new_tokens": settings.new_tokens,
                     "runs": settings.runs, "warmup": settings.warmup,
                     "contexts": list(settings.contexts),
                     "context_steps": settings.context_steps, "seed": settings.seed},
        "machine": machine,
        "warnings": busy_warnings(machine),
        **runtime,
        "weight_bytes_method": (weight_method + "; the embedding gather (one row per token) "
                                "and the KV cache reads are not counted"),
        "bandwidth": bandwidth.to_dict(),
        "compute": {"gemm_gflops": gemm_gflops,
                    "stage_gflop": {k: v / 1e9 for k, v in flops.items()},
                    "method": ("numpy (BLAS) fp32 [2048, 2048] GEMM, best repetition of two "
                               "probes; stage FLOPs = 2 x multiply-adds of every weight matmul "
                               "and attention product, from the model config (elementwise work "
                               "not counted)")},
        "notes": [
            ("ttft_ms stages are the pipeline's own Timings (vision includes the token-embedding "
             "gather, prefill includes adding the image tokens); total is wall clock from the "
             "start of preprocessing to the first token out of the generation loop"),
            ("decode per-token latency is the wall time between consecutive tokens (embedding "
             "gather + decoder step + greedy sampling); tokens_per_s = tokens / their total time"),
            ("decode_step_ms_by_context is the median of single backend.decode calls after a "
             "prefill of that many positions"),
            ("peak_rss_mb is the process peak (ru_maxrss) after all measurements of that stack; "
             "the torch reference runs in its own process"),
            ("with --compare-torch the two stacks run their steps (warm-up, each run, each "
             "context) alternately unless --sequential, so machine load hits both alike"),
        ],
    }
    if torch_result is not None:
        report["torch"] = torch_result
        report["speedup"] = speedups(runtime, torch_result)
    if task is not None:
        report["task"] = task
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return run_main("molmo-bench", lambda: _main(args, argv), debug=args.debug)


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    report = run(args, argv)
    from molmo_runtime.fileio import atomic_open, write_json_atomic

    from molmo_bench.report import markdown

    table = markdown(report)
    print(table)
    if args.json:
        write_json_atomic(args.json, report)
    if args.markdown:
        with atomic_open(args.markdown, "w") as f:
            f.write(table)
    if args.plot:
        from molmo_bench.plot import write_plot

        write_plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
