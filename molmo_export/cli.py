"""`molmo-export` and `molmo-verify`: thin views over export_artifact and verify_artifact."""

from __future__ import annotations

import argparse
import sys

from molmo_runtime.errors import MolmoError


def _export_parser() -> argparse.ArgumentParser:
    from molmo_export.export import TARGETS

    p = argparse.ArgumentParser(
        prog="molmo-export",
        description="Export a Molmo checkpoint to ONNX graphs, ONNX Runtime artifacts or "
                    "TensorRT engines.")
    p.add_argument("--model", default="demo",
                   help="checkpoint directory (config.json + *.safetensors) or a built-in "
                        "preset: demo, bench-0.5b (default: demo)")
    p.add_argument("--target", choices=TARGETS, default=None,
                   help="what to build (default: trt-fp16 where TensorRT and a GPU are present, "
                        "else ort-fp32)")
    p.add_argument("--out", default=None, help="artifact directory (default: out/<model>-<target>)")
    p.add_argument("--max-crops", type=int, default=12,
                   help="high-res crops per image, 1..12: fewer crops = fewer image tokens = "
                        "lower latency (default: 12, as the official processor)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="KV cache length the runtime preallocates (default: the model's "
                        "max_position_embeddings)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty folder that is not an artifact (never deletes "
                        "files that molmo-export did not write)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the stage-wise ORT-vs-PyTorch verification after export")
    p.add_argument("--from-onnx", action="store_true",
                   help="build TensorRT engines from the existing artifact in --out (no torch)")
    p.add_argument("--calibration-set", default="default",
                   help="calibration set for int8/int4 targets: 'default' or a folder of images "
                        "+ prompts.jsonl")
    p.add_argument("--allow-degraded", action="store_true",
                   help="warn instead of failing when quantized quality is below thresholds")
    p.add_argument("--decoder", choices=("auto", "portable"), default="auto",
                   help="ort-* targets: 'auto' uses the decoder graph made for ONNX Runtime "
                        "(fused contrib ops) where the model allows it, 'portable' the plain-op "
                        "graph (default: auto)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")
    return p


def main_export(argv: list[str] | None = None) -> int:
    args = _export_parser().parse_args(argv)
    try:
        from molmo_export.export import check_target, default_target, export_artifact

        target = args.target or default_target()
        check_target(target)  # fails here, before any work, if e.g. TensorRT is missing
        name = str(args.model).rstrip("/").split("/")[-1]
        out = args.out or f"out/{name}-{target}"
        path = export_artifact(args.model, target, out, max_crops=args.max_crops,
                               max_seq_len=args.max_seq_len, opset=args.opset, force=args.force,
                               verify=args.verify, from_onnx=args.from_onnx,
                               calibration_set=args.calibration_set,
                               allow_degraded=args.allow_degraded, progress=args.progress,
                               decoder=args.decoder)
    except MolmoError as e:
        print(f"molmo-export: error: {e}", file=sys.stderr)
        return 2
    print(f"artifact written to {path}")
    return 0


def main_verify(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="molmo-verify",
        description="Stage-wise parity of an artifact against the PyTorch reference: vision "
                    "features, connector tokens, prefill and decode logits, greedy tokens.")
    p.add_argument("artifact", help="artifact directory written by molmo-export")
    p.add_argument("--model", default=None,
                   help="checkpoint directory or preset the artifact came from (default: the "
                        "source recorded in its manifest)")
    p.add_argument("--greedy-tokens", type=int, default=8)
    args = p.parse_args(argv)
    try:
        from molmo_export.verify import verify_artifact

        verify_artifact(args.artifact, args.model, greedy_tokens=args.greedy_tokens)
    except MolmoError as e:
        print(f"molmo-verify: error: {e}", file=sys.stderr)
        return 1
    return 0
if __name__ == "__main__":
    import sys

    sys.exit(main_export())
