"""TensorRT engines for Molmo artifacts: availability check, profiles, fp16 graphs, builder.

Torch-free and importable without TensorRT: tensorrt (and onnx, for the fp16 graphs) are
imported inside the functions that need them.

    from molmo_export.trt import require_tensorrt, build_engines
    require_tensorrt("trt-fp16")                 # one-line error when no GPU / TensorRT here
    build_engines("out/demo", "trt-fp16")        # engines/<graph>.plan + manifest["engines"]
    lint_file("out/demo/onnx/decoder.onnx", "10.3")  # what TensorRT 10.3's ONNX parser refuses
"""

from molmo_export.trt.availability import TRT_TARGETS, require_tensorrt, tensorrt_missing
from molmo_export.trt.builder import BuildSettings, EngineBuildError, build_engines
from molmo_export.trt.parser_lint import ParserLintError, lint_file, require_parseable
from molmo_export.trt.profiles import NamedProfile, ProfileSettings, all_profiles, graph_profiles

__all__ = ["TRT_TARGETS", "BuildSettings", "EngineBuildError", "NamedProfile", "ParserLintError",
           "ProfileSettings", "all_profiles", "build_engines", "graph_profiles", "lint_file",
           "require_parseable", "require_tensorrt", "tensorrt_missing"]
