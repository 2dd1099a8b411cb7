"""`molmo-eval ARTIFACT`: task accuracy of an artifact on the shapes held-out set (no torch)."""

from __future__ import annotations

import argparse
import json
import sys

from molmo_calibration.shapes.task import HELDOUT_SEED
from molmo_runtime.errors import MolmoError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="molmo-eval",
        description="Score an artifact of the trained demo model (or any model trained on the "
                    "shapes task) on the held-out shapes questions: pointing (the point falls on "
                    "the named shape; for 'all', every shape matched once), counting, colour, "
                    "and the fraction of well-formed answers.")
    p.add_argument("artifact", help="artifact directory (molmo-export --out)")
    p.add_argument("--questions", type=int, default=600, help="held-out questions (default 600)")
    p.add_argument("--seed", type=int, default=HELDOUT_SEED,
                   help=f"held-out set seed (default {HELDOUT_SEED}; training never uses it)")
    p.add_argument("--backend", choices=("auto", "ort", "trt"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads")
    p.add_argument("--fp16", action="store_true",
                   help="evaluate the fp16 graphs TensorRT builds from (converted from this fp32 "
                        "artifact into a temporary folder) in ONNX Runtime")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the scores as JSON")
    args = p.parse_args(argv)
    if args.questions < 1:
        p.error("--questions must be at least 1")
    try:
        from molmo_calibration.shapes.evaluate import evaluate_artifact, evaluate_pipeline

        if args.fp16:
            import tempfile

            from molmo_calibration.shapes.fp16 import fp16_pipeline

            with tempfile.TemporaryDirectory(prefix="molmo-eval-fp16-") as work:
                pipe = fp16_pipeline(args.artifact, work, args.threads)
                scores = evaluate_pipeline(pipe, args.questions, args.seed)
        else:
            scores = evaluate_artifact(args.artifact, args.questions, args.seed, args.backend,
                                       args.threads)
    except MolmoError as e:
        print(f"molmo-eval: error: {e}", file=sys.stderr)
        return 2
    print(scores.to_markdown(title=str(args.artifact) + (" (fp16 graphs, ORT)" if args.fp16
                                                          else "")))
    print(f"({scores.questions} questions, held-out seed {scores.seed}, "
          f"{scores.seconds:.0f} s)", file=sys.stderr)
    if args.json:
        from molmo_runtime.fileio import write_json_atomic

        write_json_atomic(args.json, scores.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
