"""python -m molmo_calibration SRC OUT --target ort-int8: quantize an existing fp32 artifact.

A thin view over quantize_artifact (molmo-export --target ort-int8 does export + this in one go).
"""

from __future__ import annotations

import argparse
import sys

from molmo_calibration.recipes import TARGETS
from molmo_runtime.cli_common import add_debug_flag, non_negative_int, positive_int, run_main


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("python -m molmo_calibration", lambda: _quantize(args), debug=args.debug)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m molmo_calibration", description=__doc__)
    p.add_argument("src", help="fp32 artifact directory (molmo-export --target onnx)")
    p.add_argument("out", help="directory to write the quantized artifact to")
    p.add_argument("--target", required=True, choices=TARGETS,
                   help="quantized target to write (required)")
    p.add_argument("--calibration-set", default="default",
                   help="bundled set name or a folder with images + prompts.jsonl "
                        "(default: default)")
    p.add_argument("--allow-degraded", action="store_true",
                   help="write the artifact (with a warning) even below the quality "
                        "thresholds (default: off)")
    p.add_argument("--max-samples", type=positive_int, default=None,
                   help="use at most this many samples of the set (calibration + held-out; "
                        "default: all)")
    p.add_argument("--new-tokens", type=positive_int, default=16,
                   help="greedy tokens per held-out sample in the quality report (default: 16)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="ONNX Runtime intra-op threads (default: physical cores)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty OUT that holds no artifact (files kept; "
                        "default: off)")
    p.add_argument("--task-questions", type=non_negative_int, default=None,
                   help="held-out shapes-task questions for the task gate (default: 600 for a "
                        "model trained on the shapes task, e.g. the demo preset; 0 skips it)")
    p.add_argument("--quiet", action="store_true", help="no progress lines (default: off)")
    add_debug_flag(p)
    return p


def _quantize(args: argparse.Namespace) -> int:
    from molmo_calibration.quantize import quantize_artifact

    quantize_artifact(args.src, args.out, args.target, args.calibration_set,
                      allow_degraded=args.allow_degraded, progress=not args.quiet,
                      max_samples=args.max_samples, new_tokens=args.new_tokens,
                      threads=args.threads, force=args.force,
                      task_questions=args.task_questions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
