"""`molmo-run`: answer a prompt about an image with an exported artifact (no torch)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from molmo_runtime.cli_common import (
    add_debug_flag,
    non_negative_float,
    non_negative_int,
    positive_int,
    probability,
    run_main,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="molmo-run",
                                description="Answer a prompt about an image with a Molmo "
                                            "artifact written by molmo-export.")
    p.add_argument("artifact", help="artifact directory (molmo-export --out)")
    p.add_argument("--image", default=None,
                   help="image file (default: none, a text-only prompt)")
    p.add_argument("--prompt", required=True, help="the question or instruction (required)")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=200,
                   help="most tokens to generate (default: 200)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="sampling temperature; 0 = greedy (default: 0)")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="sample among the k most likely tokens; needs --temperature > 0 "
                        "(default: all tokens)")
    p.add_argument("--top-p", type=probability, default=None,
                   help="sample among the most likely tokens whose probability reaches p, "
                        "0 < p <= 1; needs --temperature > 0 (default: 1, all tokens)")
    p.add_argument("--seed", type=non_negative_int, default=None,
                   help="seed of the sampler, for reproducible sampling; needs --temperature > 0 "
                        "(default: a fresh random seed)")
    p.add_argument("--stop", action="append", default=[],
                   help="stop string: the answer ends before it (repeatable; default: none)")
    p.add_argument("--backend", choices=("auto", "ort", "trt"), default="auto",
                   help="runtime backend (default: auto = trt if the artifact has TensorRT "
                        "engines, else ort)")
    p.add_argument("--stream", action="store_true",
                   help="print the answer as it is decoded (default: off); with --json, one "
                        "JSON object per line: text pieces, then the result")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object (default: off)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="open an artifact whose export verification failed, for debugging; its "
                        "answers may be wrong (default: off, such an artifact is refused)")
    p.add_argument("--draw", metavar="OUT.png", default=None,
                   help="also write the image with the answer's points drawn on it (a new "
                        "file; default: off)")
    add_debug_flag(p)
    return p


def result_dict(result: Any) -> dict[str, Any]:
    return {"text": result.text, "token_ids": result.token_ids,
            "points": [vars(pt) for pt in result.points],
            "finish_reason": result.finish_reason, "timings": result.timings.to_dict()}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sampling_only = [name for name, value in (("--top-k", args.top_k), ("--top-p", args.top_p),
                                              ("--seed", args.seed)) if value is not None]
    if sampling_only and args.temperature == 0:
        parser.error(f"{'/'.join(sampling_only)} only apply when sampling: add --temperature T "
                     "(T > 0; e.g. 0.7), or drop them for greedy decoding")
    if args.draw and not args.image:
        parser.error("--draw needs --image")
    return run_main("molmo-run", lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    from molmo_runtime.pipeline import MolmoPipeline

    pipe = MolmoPipeline.from_dir(args.artifact, backend=args.backend,
                                  allow_unverified=args.allow_unverified)
    if pipe.manifest.unmeasured_quality:
        print(f"molmo-run: note: {pipe.manifest.unmeasured_quality}", file=sys.stderr)
    kwargs: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, stop=args.stop, seed=args.seed)
    if args.stream:
        stream = pipe.stream(args.image, args.prompt, **kwargs)
        for piece in stream:
            if args.json:  # JSON lines: one event per piece, the result last
                print(json.dumps({"event": "text", "text": piece}), flush=True)
            else:
                print(piece, end="", flush=True)
        result = stream.result
        _draw(args, result)
        if args.json:
            print(json.dumps({"event": "result", **result_dict(result)}), flush=True)
            return 0
        print()
    else:
        result = pipe.generate(args.image, args.prompt, **kwargs)
        _draw(args, result)
        if args.json:
            print(json.dumps(result_dict(result), indent=2))
            return 0
        print(result.text)
    for pt in result.points:
        print(f"point: x={pt.x:.1f} y={pt.y:.1f} px  {pt.label}")
    print(f"[{result.finish_reason}] {result.timings.summary()}", file=sys.stderr)
    return 0


def _draw(args: argparse.Namespace, result: Any) -> None:
    if args.draw:
        from molmo_runtime.draw import draw_points

        draw_points(args.image, result.points, args.draw)


if __name__ == "__main__":
    sys.exit(main())
