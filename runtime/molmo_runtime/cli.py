"""`molmo-run`: answer a prompt about an image with an exported artifact (no torch)."""

from __future__ import annotations

import argparse
import json
import sys

from molmo_runtime.errors import MolmoError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="molmo-run",
                                description="Answer a prompt about an image with a Molmo "
                                            "artifact written by molmo-export.")
    p.add_argument("artifact", help="artifact directory (molmo-export --out)")
    p.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--backend", choices=("auto", "ort", "trt"), default="auto")
    p.add_argument("--stream", action="store_true", help="print the answer as it is decoded")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--draw", metavar="OUT.png", default=None,
                   help="write the image with the answer's points drawn on it")
    args = p.parse_args(argv)
    if args.draw and not args.image:
        p.error("--draw needs --image")
    try:
        from molmo_runtime.pipeline import MolmoPipeline

        pipe = MolmoPipeline.from_dir(args.artifact, backend=args.backend)
        kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, stop=args.stop, seed=args.seed)
        if args.stream and not args.json:
            for piece in pipe.stream(args.image, args.prompt, **kwargs):
                print(piece, end="", flush=True)
            print()
            result = pipe.last_result
        else:
            result = pipe.generate(args.image, args.prompt, **kwargs)
        if args.draw:
            from molmo_runtime.draw import draw_points

            draw_points(args.image, result.points, args.draw)
    except MolmoError as e:
        print(f"molmo-run: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids,
                          "points": [vars(pt) for pt in result.points],
                          "finish_reason": result.finish_reason,
                          "timings": result.timings.to_dict()}, indent=2))
        return 0
    if not args.stream:
        print(result.text)
    for pt in result.points:
        print(f"point: x={pt.x:.1f} y={pt.y:.1f} px  {pt.label}")
    print(f"[{result.finish_reason}] {result.timings.summary()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
