"""Time Molmo's image preprocessing (numpy, molmo_runtime) on the 13-crop golden case.

    python benchmarks/preprocess_bench.py [--runs 50] [--image PATH] [--max-crops 12]

Times ``MolmoImageProcessor`` from an already decoded uint8 [H, W, 3] array to all output arrays
(images, image_masks, image_input_idx) and the whole ``MolmoProcessor`` call (plus prompt
tokens) when the golden tokenizer is present. If torch is importable, the same resize work
(the high-res canvas and the global crop, ``interpolate(bilinear, antialias=True)`` on the
float32 image, as the official processor does through torchvision) is timed right after, and
the ratio is printed. Runs without torch too. The load average is printed: other jobs on the
machine slow every number down.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("MOLMO_GOLDEN", REPO.parent / "shared" / "golden"))


def _stats(ms: list[float]) -> str:
    return (f"median {statistics.median(ms):7.2f} ms   min {min(ms):7.2f}   max {max(ms):7.2f}"
            f"   (n={len(ms)})")


def _time(fn: Callable[[], object], cpu: list[float] | None = None) -> float:
    """Wall milliseconds of fn(); with ``cpu``, also append this thread's CPU milliseconds
    (for single-threaded code: the time it would take on an otherwise idle core)."""
    c0, t0 = time.thread_time(), time.perf_counter()
    fn()
    wall = (time.perf_counter() - t0) * 1e3
    if cpu is not None:
        cpu.append((time.thread_time() - c0) * 1e3)
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", type=Path,
                    default=GOLDEN / "preprocess" / "images" / "hubble_deep_field.jpg")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-crops", type=int, default=12)
    ap.add_argument("--resize-method", default="torch-bilinear",
                    choices=["torch-bilinear", "tensorflow"])
    ap.add_argument("--no-torch", action="store_true", help="skip the torch reference")
    args = ap.parse_args(argv)

    from molmo_runtime.image_io import load_image
    from molmo_runtime.image_processing import MolmoImageProcessor

    if not args.image.is_file():
        print(f"image not found: {args.image} (set MOLMO_GOLDEN or pass --image)")
        return 2
    pixels = load_image(args.image)  # decoded once: the timings start from the array
    proc = MolmoImageProcessor(max_crops=args.max_crops, resize_method=args.resize_method)
    plan = proc.plan(*pixels.shape[:2])
    load = os.getloadavg() if hasattr(os, "getloadavg") else None  # others' jobs slow us too
    print(f"image {args.image.name}: {pixels.shape[0]}x{pixels.shape[1]} -> tiling "
          f"{plan.tiling[0]}x{plan.tiling[1]}, {plan.n_crops} crops, {plan.n_image_tokens} "
          f"image tokens; resize {args.resize_method}")
    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
          f"python {platform.python_version()} numpy {np.__version__}"
          + (f"; load average {load[0]:.2f}" if load else ""))

    t0 = time.perf_counter()
    MolmoImageProcessor(max_crops=args.max_crops, resize_method=args.resize_method)(pixels)
    print(f"first call (cold tap tables and buffers): {(time.perf_counter() - t0) * 1e3:.2f} ms")

    processor = None
    tok_dir = GOLDEN / "tokenizer"
    if tok_dir.is_dir():
        from molmo_runtime.processing import MolmoProcessor

        processor = MolmoProcessor(MolmoProcessor.from_pretrained(tok_dir).tokenizer, proc)

    torch_fn = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("torch not installed: no side-by-side reference")
        else:
            f = torch.nn.functional
            (ch, cw), (gh, gw) = plan.resized, plan.global_resized
            tensor = torch.from_numpy(np.array(pixels))  # decoded already (writable copy)

            def torch_fn() -> None:
                # as the official code: uint8 CHW -> float32 / 255 -> antialiased bilinear
                x = tensor.permute(2, 0, 1).to(torch.float32)[None] / 255
                for size in ((ch, cw), (gh, gw)):
                    f.interpolate(x, size=size, mode="bilinear", antialias=True,
                                  align_corners=False).clamp_(0, 1)

    for _ in range(args.warmup):
        proc(pixels)
    ours, ours_cpu = [], []
    for _ in range(args.runs):
        ours.append(_time(lambda: proc(pixels), ours_cpu))
    print(f"molmo_runtime MolmoImageProcessor (array -> all outputs): {_stats(ours)}")
    print(f"  same runs, CPU time of the (single) thread:             {_stats(ours_cpu)}")
    if processor is not None:
        full = [_time(lambda: processor(images=pixels, text="Describe this image."))
                for _ in range(args.runs)]
        print(f"molmo_runtime MolmoProcessor (+ prompt tokens, input_ids): {_stats(full)}")
    if torch_fn is not None:
        import torch

        for _ in range(args.warmup):
            torch_fn()
        ref = [_time(torch_fn) for _ in range(args.runs)]
        print(f"torch {torch.__version__} resize only ({torch.get_num_threads()} threads, "
              f"canvas + global crop): {_stats(ref)}")
        print(f"ratio ours(full preprocessing) / torch(resize only), medians: "
              f"{statistics.median(ours) / statistics.median(ref):.2f}")
    if load is not None and hasattr(os, "getloadavg"):
        print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus")
    return 0


if __name__ == "__main__":
    sys.exit(main())
