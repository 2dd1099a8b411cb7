"""`molmo-export` and `molmo-verify`: thin views over export_artifact and verify_artifact."""

from __future__ import annotations

import argparse
import sys

from molmo_runtime.cli_common import add_debug_flag, non_negative_int, positive_int, run_main
from molmo_runtime.errors import MolmoError, require


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
    p.add_argument("--max-crops", type=positive_int, default=12,
                   help="high-res crops per image, 1..12: fewer crops = fewer image tokens = "
                        "lower latency (default: 12, as the official processor)")
    p.add_argument("--max-seq-len", type=positive_int, default=None,
                   help="KV cache length the runtime preallocates (default: the model's "
                        "max_position_embeddings)")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default: 18)")
    p.add_argument("--force", action="store_true",
                   help="write beside the files of a non-empty folder that is not an artifact "
                        "(refuses, naming them, if a file there has an artifact file's name; "
                        "never replaces or deletes files molmo-export did not write; "
                        "default: off)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the stage-wise ORT-vs-PyTorch verification after export "
                        "(default: verify)")
    p.add_argument("--from-onnx", action="store_true",
                   help="build TensorRT engines from the existing artifact in --out (no torch; "
                        "default: off)")
    p.add_argument("--calibration-set", default="default",
                   help="calibration set for int8/int4 targets: 'default' or a folder of images "
                        "+ prompts.jsonl (default: default)")
    p.add_argument("--allow-degraded", action="store_true",
                   help="warn instead of failing when quantized quality is below thresholds "
                        "(default: off)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                   help="weight type of the ONNX graphs: fp16 halves disk for GPU targets "
                        "(--target onnx only; default fp32, the fast type for ORT on CPU)")
    stream = p.add_mutually_exclusive_group()
    stream.add_argument("--stream", dest="stream", action="store_true", default=None,
                        help="export without loading the model: graphs traced with fake "
                             "weights, weights written from the checkpoint one tensor at a "
                             "time (default: for checkpoints over 4 GiB and for --dtype fp16)")
    stream.add_argument("--no-stream", dest="stream", action="store_false",
                        help="load the model and export in memory, also for a large "
                             "checkpoint (default: as --stream says)")
    p.add_argument("--keep-fp32", metavar="DIR", default=None,
                   help="int8/int4 targets: keep the fp32 intermediate artifact in DIR (a new "
                        "or empty folder; default: built inside --out's staging area and "
                        "removed, so only --out is written)")
    p.add_argument("--decoder", choices=("auto", "portable"), default="auto",
                   help="ort-* targets: 'auto' uses the decoder graph made for ONNX Runtime "
                        "(fused contrib ops) where the model allows it, 'portable' the plain-op "
                        "graph (default: auto)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (default: show them)")
    add_debug_flag(p)
    trt = p.add_argument_group("TensorRT engine build (--target trt-fp16 / trt-int8 only; "
                               "each is recorded in the engine's build record)")
    trt.add_argument("--max-prompt-len", type=positive_int, default=None,
                     help="most prompt positions one prefill run takes (the prefill profile's "
                          "max; default: --max-seq-len). Longer prompts are prefilled in "
                          "chunks; smaller values lower activation memory (Jetson)")
    trt.add_argument("--workspace-gb", type=float, default=None,
                     help="TensorRT builder workspace limit in GiB (default: TensorRT's, the "
                          "device memory)")
    trt.add_argument("--timing-cache", default=None,
                     help="timing cache file: read when present, written after each build "
                          "(rebuilds on the same GPU and TensorRT get much faster; default: none)")
    trt.add_argument("--builder-optimization-level", type=int, default=None,
                     help="0..5: how long TensorRT searches for fast kernels (default: 3)")
    return p


def _trt_options(args: argparse.Namespace, target: str) -> dict[str, object]:
    """The TensorRT build flags given, validated before any work."""
    options: dict[str, object] = {
        k: v for k, v in (("max_prompt_len", args.max_prompt_len),
                          ("workspace_gb", args.workspace_gb),
                          ("timing_cache", args.timing_cache),
                          ("builder_optimization_level", args.builder_optimization_level))
        if v is not None}
    if not options:
        return options
    if not target.startswith("trt-"):
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        raise MolmoError(f"{flags} apply to TensorRT targets only (--target trt-fp16 or "
                         f"trt-int8), not {target}")
    from molmo_export.trt.builder import BuildSettings
    from molmo_export.trt.profiles import ProfileSettings

    BuildSettings(workspace_gb=args.workspace_gb,  # raises InputError on impossible values
                  builder_optimization_level=args.builder_optimization_level,
                  timing_cache=args.timing_cache,
                  profiles=ProfileSettings(max_prompt_len=args.max_prompt_len))
    return options


def main_export(argv: list[str] | None = None) -> int:
    args = _export_parser().parse_args(argv)
    return run_main("molmo-export", lambda: _export(args), debug=args.debug)


def _export(args: argparse.Namespace) -> int:
    if not args.from_onnx:
        require("torch", "export", "molmo-export; only --from-onnx works without it")
    from molmo_export.export import check_target, default_target, export_artifact

    target = args.target or default_target()
    trt_options = _trt_options(args, target)
    check_target(target)  # fails here, before any work, if e.g. TensorRT is missing
    from molmo_export.demo import known_gate_failure

    warning = known_gate_failure(str(args.model), target)
    if warning:
        print(f"molmo-export: note: {warning}", file=sys.stderr, flush=True)
    name = str(args.model).rstrip("/").split("/")[-1]
    out = args.out or f"out/{name}-{target}"
    path = export_artifact(args.model, target, out, max_crops=args.max_crops,
                           max_seq_len=args.max_seq_len, opset=args.opset, force=args.force,
                           verify=args.verify, from_onnx=args.from_onnx,
                           calibration_set=args.calibration_set,
                           allow_degraded=args.allow_degraded, progress=args.progress,
                           keep_fp32=args.keep_fp32, trt_options=trt_options,
                           stream=args.stream, dtype=args.dtype, decoder=args.decoder)
    print(f"artifact written to {path}")
    return 0


def main_verify(argv: list[str] | None = None) -> int:
    args = _verify_parser().parse_args(argv)
    return run_main("molmo-verify", lambda: _verify(args), debug=args.debug)


def _verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="molmo-verify",
        description="Stage-wise parity of an artifact against the PyTorch reference: vision "
                    "features, connector tokens, prefill and decode logits, greedy tokens.")
    p.add_argument("artifact", help="artifact directory written by molmo-export")
    p.add_argument("--model", default=None,
                   help="checkpoint directory or preset the artifact came from (default: the "
                        "source recorded in its manifest)")
    p.add_argument("--greedy-tokens", type=non_negative_int, default=8,
                   help="greedy tokens compared with the reference (default: 8)")
    add_debug_flag(p)
    return p


def _verify(args: argparse.Namespace) -> int:
    require("torch", "export", "molmo-verify (it compares with the PyTorch reference)")
    from molmo_export.verify import verify_artifact

    verify_artifact(args.artifact, args.model, greedy_tokens=args.greedy_tokens)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main_export())
