"""python -m molmo_calibration SRC OUT --target ort-int8: quantize an existing fp32 artifact.

A thin view over quantize_artifact (molmo-export --target ort-int8 does export + this in one go).
"""

from __future__ import annotations

import argparse
import sys

from molmo_calibration.recipes import TARGETS
from molmo_runtime.errors import MolmoError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m molmo_calibration", description=__doc__)
    p.add_argument("src", help="fp32 artifact directory (molmo-export --target onnx)")
    p.add_argument("out", help="directory to write the quantized artifact to")
    p.add_argument("--target", required=True, choices=TARGETS)
    p.add_argument("--calibration-set", default="default",
                   help="bundled set name or a folder with images + prompts.jsonl")
    p.add_argument("--allow-degraded", action="store_true",
                   help="write the artifact (with a warning) even below the quality thresholds")
    p.add_argument("--max-samples", type=int, default=None,
                   help="use at most this many samples of the set (calibration + held-out)")
    p.add_argument("--new-tokens", type=int, default=16,
                   help="greedy tokens per held-out sample in the quality report")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty OUT that holds no artifact (files kept)")
    p.add_argument("--task-questions", type=int, default=None,
                   help="held-out shapes-task questions for the task gate (default: 600 for a "
                        "model trained on the shapes task, e.g. the demo preset; 0 skips it)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    from molmo_calibration.quantize import quantize_artifact

    try:
        quantize_artifact(args.src, args.out, args.target, args.calibration_set,
                          allow_degraded=args.allow_degraded, progress=not args.quiet,
                          max_samples=args.max_samples, new_tokens=args.new_tokens,
                          threads=args.threads, force=args.force,
                          task_questions=args.task_questions)
    except MolmoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
