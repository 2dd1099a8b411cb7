"""Build TensorRT engines (one per graph) from an artifact's ONNX files. Torch-free.

Engines are built on the device that will run them (a Jetson has TensorRT but no reason to have
PyTorch), from the ONNX graphs of an exported artifact:

    fp32 ONNX ──fp16_onnx──► fp16 ONNX with fp32 islands (tmp) ──engine_from_onnx──► plan (tmp)
    (trt-int8: the calibrated QDQ graphs onnx/qdq/<graph>.onnx take the place of the fp32 ONNX)
    all plans built ──► engines/<graph>.plan + manifest["engines"][graph] (build record)

Steps are small functions named for the data they make (like Polygraphy's loaders). Polygraphy
itself is not used: the raw TensorRT API is a dozen calls, it is type-checked against the
published stubs, and a Jetson needs nothing beyond JetPack's tensorrt wheel to run this.

Networks are strongly typed (precision comes from the ONNX types, see fp16.py); int8 is explicit
quantization from Q/DQ nodes (TensorRT's implicit-INT8 calibrators are deprecated in 10.x and
removed in 11). TensorRT 10 vs 11: names that changed or may disappear are looked up with
getattr (STRONGLY_TYPED flag, tactic sources), and nothing weakly typed (BuilderFlag.FP16/INT8)
is used.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from molmo_export.trt.availability import TRT_TARGETS, require_tensorrt
from molmo_export.trt.build_record import make_build_record
from molmo_export.trt.parser_lint import lint_version, require_parseable
from molmo_export.trt.profiles import NamedProfile, ProfileSettings, apply_profiles, graph_profiles
from molmo_runtime.errors import ArtifactError, InputError, MolmoError
from molmo_runtime.fileio import atomic_open, sha256_file
from molmo_runtime.graph_io import DECODER, GraphSpec
from molmo_runtime.manifest import Manifest, file_record, load_manifest, write_manifest
from molmo_runtime.trt_env import MachineInfo, collect_machine_info

if TYPE_CHECKING:
    import tensorrt as trt

    from molmo_export.trt.fp16 import Fp16Report

Target = Literal["trt-fp16", "trt-int8"]
Progress = Callable[[str], None]
ENGINE_DIR = "engines"


class EngineBuildError(MolmoError):
    """TensorRT could not parse a graph or build an engine."""


@dataclass(frozen=True)
class BuildSettings:
    workspace_gb: float | None = None  # None: TensorRT's default (the device's memory)
    builder_optimization_level: int | None = None  # 0..5; None: TensorRT's default (3)
    timing_cache: Path | None = None  # read when present, written back after each build
    tactic_sources: tuple[str, ...] | None = None  # TacticSource names; None: TensorRT default
    fp32_residual: bool = True  # residual-stream Adds in fp32 (Qwen2's large activations)
    profiles: ProfileSettings = field(default_factory=ProfileSettings)
    verbose: bool = False

    def __post_init__(self) -> None:
        """Refuse impossible settings before any work (the CLI builds this from its flags)."""
        if self.workspace_gb is not None and not 0 < self.workspace_gb <= 1024:
            raise InputError(f"workspace_gb={self.workspace_gb}: need a size in GiB, > 0")
        level = self.builder_optimization_level
        if level is not None and level not in range(6):
            raise InputError(f"builder_optimization_level={level}: TensorRT takes 0..5 "
                             "(3 is its default; 5 searches longest)")
        if self.timing_cache is not None:
            cache = Path(self.timing_cache)
            if cache.is_dir() or not cache.parent.is_dir():
                raise InputError(f"timing cache {cache}: need a file path in an existing "
                                 "folder (read when present, written after each build)")

    def record(self) -> dict[str, Any]:
        """As stored in the build record (JSON types)."""
        d = asdict(self)
        d["timing_cache"] = str(self.timing_cache) if self.timing_cache else None
        d["tactic_sources"] = list(self.tactic_sources) if self.tactic_sources else None
        return d


def engine_path(graph: str) -> str:
    return f"{ENGINE_DIR}/{graph}.plan"


# -- sources ---------------------------------------------------------------------------------------

def source_graphs(manifest: Manifest, target: str) -> dict[str, str]:
    """Graph name -> ONNX file (relative to the artifact) an engine is built from."""
    plain = {name: spec.file for name, spec in manifest.graphs.items()}
    if target == "trt-fp16":
        return plain
    qdq = manifest.raw.get("graphs_qdq")
    if not qdq:
        raise InputError(
            f"--target {target} builds from calibrated QDQ graphs, and {manifest.directory} has "
            "none (manifest['graphs_qdq'] is absent): run the INT8 calibration step "
            "(molmo_calibration) on this artifact first; it writes onnx/qdq/<graph>.onnx")
    out = dict(plain)  # a graph without a QDQ variant is built fp16 (e.g. a weight-only decoder)
    for name, entry in qdq.items():
        out[name] = entry["file"] if isinstance(entry, Mapping) else str(entry)
    return out


def source_sha256(manifest: Manifest, relpath: str) -> str:
    rec = manifest.files.get(relpath)
    if rec is not None:
        return str(rec["sha256"])
    path = manifest.path(relpath)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; re-export the artifact or re-run calibration")
    return sha256_file(path)


# -- steps -----------------------------------------------------------------------------------------

def fp16_onnx(src: Path, dst: Path, spec: GraphSpec, fp32_residual: bool) -> Fp16Report:
    """The strongly typed fp16 graph; the decoder's KV cache I/O becomes fp16 too."""
    from molmo_export.trt.fp16 import Fp16Policy, convert_file_to_fp16, kv_cache_policy

    if spec.name == DECODER:
        names = [t.name for t in (*spec.inputs, *spec.outputs)]
        policy = kv_cache_policy(names, fp32_residual=fp32_residual)
    else:
        policy = Fp16Policy(fp32_residual=fp32_residual)
    return convert_file_to_fp16(src, dst, policy)


def _network_flags(trt_mod: Any) -> int:
    flag = getattr(trt_mod.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    # TensorRT versions where every network is strongly typed may drop the flag.
    return 0 if flag is None else 1 << int(flag)


def _parse_errors(parser: trt.OnnxParser) -> str:
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        lines.append(str(err))
    return "\n  ".join(lines) or "(no parser message)"


def _tactic_mask(names: Sequence[str]) -> int:
    import tensorrt as trt

    mask = 0
    for n in names:
        source = getattr(trt.TacticSource, n.upper(), None)
        if source is None:
            known = ", ".join(trt.TacticSource.__members__)
            raise InputError(f"unknown tactic source {n!r}; this TensorRT knows: {known}")
        mask |= 1 << int(source)
    return mask


def _load_timing_cache(config: trt.IBuilderConfig, path: Path | None,
                       progress: Progress) -> trt.ITimingCache:
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        progress(f"timing cache {path} is from another TensorRT/GPU; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, True)
    return cache


def _save_timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
    serialized = config.get_timing_cache().serialize()
    with atomic_open(path, "wb") as f:
        f.write(serialized)


def engine_from_onnx(onnx_path: Path, plan_path: Path, profiles: list[NamedProfile],
                     settings: BuildSettings, progress: Progress) -> int:
    """Parse an ONNX file (external data beside it), build and write the plan; returns its size."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.VERBOSE if settings.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineBuildError(f"TensorRT {trt.__version__} could not parse {onnx_path.name}:\n  "
                               + _parse_errors(parser))
    config = builder.create_builder_config()
    if settings.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE,
                                     int(settings.workspace_gb * (1 << 30)))
    if settings.builder_optimization_level is not None:
        config.builder_optimization_level = settings.builder_optimization_level
    if settings.tactic_sources is not None:
        config.set_tactic_sources(_tactic_mask(settings.tactic_sources))
    _load_timing_cache(config, settings.timing_cache, progress)
    apply_profiles(builder, config, profiles)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT {trt.__version__} failed to build an engine from {onnx_path.name} "
            "(see the TensorRT log above; a larger workspace_gb, or a smaller max_prompt_len or "
            "export --max-seq-len, may help)")
    if settings.timing_cache is not None:
        _save_timing_cache(config, settings.timing_cache)
    with atomic_open(plan_path, "wb") as f:
        f.write(serialized)
    return int(serialized.nbytes)


# -- the whole build -------------------------------------------------------------------------------

def _say(progress: Progress | bool | None) -> Progress:
    """progress: a callable taking each message, True (print them) or False/None (silent)."""
    if callable(progress):
        return progress
    return (lambda msg: print(f"molmo-export: {msg}", flush=True)) if progress else (
        lambda _msg: None)


def build_engines(
    artifact_dir: str | os.PathLike[str],
    target: Target,
    *,
    workspace_gb: float | None = None,
    timing_cache: str | os.PathLike[str] | None = None,
    builder_optimization_level: int | None = None,
    tactic_sources: Sequence[str] | None = None,
    max_batch: int = 1,
    max_prompt_len: int | None = None,
    graphs: Sequence[str] | None = None,
    progress: Progress | bool | None = None,
    machine: MachineInfo | None = None,
) -> dict[str, dict[str, Any]]:
    """Build engines/<graph>.plan for every graph and record them in the manifest.

    Stops before reading anything when TensorRT cannot run here (one-line MissingDependencyError).
    Plans are built into a temporary folder inside the artifact and moved into engines/ only when
    every requested graph has built, then manifest.json is rewritten (atomically) with their file
    records and build records. Returns manifest["engines"].
    """
    if target not in TRT_TARGETS:
        raise InputError(f"unknown TensorRT target {target!r}; choose one of {TRT_TARGETS}")
    require_tensorrt(target)
    say = _say(progress)
    settings = BuildSettings(
        workspace_gb=workspace_gb, builder_optimization_level=builder_optimization_level,
        timing_cache=Path(timing_cache) if timing_cache is not None else None,
        tactic_sources=tuple(tactic_sources) if tactic_sources is not None else None,
        profiles=ProfileSettings(max_batch=max_batch, max_prompt_len=max_prompt_len))
    from molmo_export.export.artifact_dir import OutputLock

    with OutputLock(artifact_dir):  # one writer at a time (re-entrant within an export)
        return _build_locked(artifact_dir, target, settings, graphs, machine, say)


def _build_locked(artifact_dir: str | os.PathLike[str], target: str, settings: BuildSettings,
                  graphs: Sequence[str] | None, machine: MachineInfo | None,
                  say: Callable[[str], None]) -> dict[str, Any]:
    manifest = load_manifest(artifact_dir, verify="full")
    specs = manifest.graphs
    wanted = list(graphs) if graphs is not None else list(specs)
    unknown = [g for g in wanted if g not in specs]
    if unknown:
        raise InputError(f"unknown graph(s) {unknown}; the artifact has {list(specs)}")
    sources = source_graphs(manifest, target)
    machine = machine or collect_machine_info()
    # Before any conversion: every source graph (QDQ ones for trt-int8) against this
    # TensorRT's parser, failing with the nodes it would refuse.
    parser = lint_version(machine.trt_version)
    require_parseable({g: manifest.path(sources[g]) for g in wanted}, parser)
    directory = Path(artifact_dir)
    records: dict[str, dict[str, Any]] = {}
    tmp = Path(tempfile.mkdtemp(prefix=".trt-build-", dir=directory))
    try:
        built: dict[str, Path] = {}
        for name in wanted:
            spec, src = specs[name], sources[name]
            profiles = graph_profiles(spec, manifest.dims, settings.profiles)
            say(f"{name}: fp16 graph from {src}")
            report = fp16_onnx(manifest.path(src), tmp / f"{name}.onnx", spec,
                               settings.fp32_residual)
            require_parseable({f"{name} (fp16)": tmp / f"{name}.onnx"}, parser)
            say(f"{name}: building the TensorRT engine "
                f"({', '.join(p.name for p in profiles)} profile(s))")
            plan = tmp / f"{name}.plan"
            engine_from_onnx(tmp / f"{name}.onnx", plan, profiles, settings, say)
            built[name] = plan
            records[name] = {"source": src, "profiles": profiles, "precision": {
                **report.summary(), "int8_qdq": src != specs[name].file}}
        (directory / ENGINE_DIR).mkdir(exist_ok=True)
        raw = dict(manifest.raw)
        files = dict(raw.get("files", {}))
        engines = dict(raw.get("engines", {}))
        for name, plan in built.items():
            rel = engine_path(name)
            os.replace(plan, directory / rel)
            files[rel] = file_record(directory, rel)
            info = records[name]
            engines[name] = make_build_record(
                plan_file=rel, plan_record=files[rel], target=target,
                source_onnx=info["source"], source_sha256=source_sha256(manifest, info["source"]),
                machine=machine, profiles=info["profiles"], flags=settings.record(),
                precision=info["precision"])
        raw["files"], raw["engines"] = files, engines
        write_manifest(directory, raw)
        say(f"wrote {len(built)} engine(s) to {directory / ENGINE_DIR}")
        return engines
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
