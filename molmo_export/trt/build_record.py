"""The build record stored with each engine in manifest["engines"][graph].

    {file, sha256, bytes,                       the plan, as in manifest["files"]
     target, source_onnx, source_onnx_sha256,   what it was built from
     trt_version, cuda_runtime_version, cuda_driver_version, gpu_name, compute_capability, l4t,
     profiles: [{name, shapes: {input: [min, opt, max]}}], flags: {...build settings...},
     precision: {fp16 conversion summary}, built_utc}

Matching a record against a machine lives in the runtime (`molmo_runtime.trt_env`), because the
runtime refuses mismatched engines without the exporter installed; it is re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from molmo_export.trt.profiles import NamedProfile
from molmo_runtime.trt_env import (
    MachineInfo,
    check_build_record,
    collect_machine_info,
    require_matching_engines,
)

__all__ = ["MachineInfo", "check_build_record", "collect_machine_info", "make_build_record",
           "require_matching_engines"]


def make_build_record(*, plan_file: str, plan_record: Mapping[str, Any], target: str,
                      source_onnx: str, source_sha256: str, machine: MachineInfo,
                      profiles: list[NamedProfile], flags: Mapping[str, Any],
                      precision: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "file": plan_file,
        "sha256": plan_record["sha256"],
        "bytes": plan_record["bytes"],
        "target": target,
        "source_onnx": source_onnx,
        "source_onnx_sha256": source_sha256,
        **machine.to_dict(),
        "profiles": [p.to_dict() for p in profiles],
        "flags": dict(flags),
        "precision": dict(precision),
        "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
