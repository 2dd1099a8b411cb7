"""molmo-bench on the demo artifact: every output key present and sane, the plot a real PNG,
--compare-torch adding the torch column and speedups, clear errors for bad settings, and the
pieces (percentiles, synthetic layout, weight bytes, bandwidth arithmetic) checked on their own.

Timings themselves cannot be asserted (shared CI machines); what is asserted is structure,
ordering (p50 <= p90 <= p99), positivity and internal consistency (ratios match their parts).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from molmo_bench.bandwidth import Bandwidth, measure_read_bandwidth, onnx_weight_bytes
from molmo_bench.cli import main
from molmo_bench.idle import settle
from molmo_bench.inputs import synthetic_inputs, text_id_bound
from molmo_bench.measure import percentiles
from molmo_bench.report import speedups, with_limits
from molmo_runtime.manifest import load_manifest

TINY = ["--synthetic", "--crops", "2", "--prompt-tokens", "8", "--runs", "2", "--warmup", "1",
        "--new-tokens", "8", "--contexts", "16,64", "--context-steps", "4",
        "--bandwidth-mb", "64", "--quiet"]
STAGES = ("preprocess", "vision", "connector", "prefill")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_stack(stack: dict[str, Any], contexts: tuple[str, ...]) -> None:
    """The fields every stack (runtime or torch) reports."""
    ttft = stack["ttft_ms"]
    assert set(ttft) == {*STAGES, "total"}
    assert ttft["preprocess"] >= 0  # synthetic inputs: nothing to preprocess
    for stage in ("vision", "connector", "prefill", "total"):
        assert ttft[stage] > 0, stage
    # total is measured around the loop, so it covers the stages (each run; medians may shift
    # by the run-to-run noise, hence the per-run check)
    for run in stack["ttft_runs_ms"]:
        assert run["total"] >= sum(run[s] for s in STAGES) * 0.999
    d = stack["decode"]
    assert d["tokens"] == 2 * (8 - 1)  # 2 runs x (8 new tokens - the first one)
    assert d["tokens_per_s"] > 0
    assert 0 < d["p50_ms"] <= d["p90_ms"] <= d["p99_ms"] <= d["max_ms"]
    # tokens/s is tokens over their total time, i.e. 1000 / mean latency
    assert d["tokens_per_s"] == pytest.approx(1000.0 / d["mean_ms"], rel=1e-9)
    assert d["tokens_per_s_p50"] == pytest.approx(1000.0 / d["p50_ms"], rel=1e-9)
    assert tuple(stack["decode_step_ms_by_context"]) == contexts
    assert all(ms > 0 for ms in stack["decode_step_ms_by_context"].values())
    steps = stack["decode_step_by_context"]
    assert all(v["min_ms"] <= v["p50_ms"] <= v["p90_ms"] for v in steps.values())
    assert stack["context_growth"] == pytest.approx(
        steps[contexts[-1]]["p50_ms"] / steps[contexts[0]]["p50_ms"])
    assert stack["peak_rss_mb"] > 50  # an interpreter with numpy alone is above this
    assert stack["weight_bytes"] > 0
    assert stack["bandwidth_fraction"] > 0


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) < 200_000
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 150


def test_bench_cli_on_demo_is_torch_free(demo_artifact: Path, tmp_path: Path) -> None:
    """Without --compare-torch the benchmark never imports torch (run in a fresh interpreter)."""
    out_json, out_png, out_md = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "r.md"
    argv = [str(demo_artifact), *TINY, "--json", str(out_json), "--plot", str(out_png),
            "--markdown", str(out_md)]
    code = ("import sys; from molmo_bench.cli import main; rc = main(sys.argv[1:]); "
            "sys.exit(rc or (3 if 'torch' in sys.modules else 0))")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode != 3, "molmo-bench imported torch without --compare-torch"
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out_json.read_text())
    check_stack(report, ("16", "64"))
    assert "torch" not in report and "speedup" not in report
    bw = report["bandwidth"]
    assert bw["read_gb_per_s"] > 0.1 and bw["read_gb_per_s"] == max(bw["by_method"].values())
    assert {"sum_1_threads", "blas_gemv"} <= set(bw["by_method"])
    assert report["bandwidth_fraction"] == pytest.approx(
        report["weight_bytes"] * report["decode"]["tokens_per_s"] / (bw["read_gb_per_s"] * 1e9))
    paired = report["bandwidth_fraction_paired"]  # one probe after each of the 2 runs
    assert len(paired["runs"]) == len(paired["probes_gb_per_s"]) == 2
    assert max(paired["probes_gb_per_s"]) <= bw["read_gb_per_s"]  # the best counts them too
    steps = report["bandwidth_fraction_steps"]  # 32 decode steps (the default), each + a probe
    assert steps["context"] == 16 and steps["pairs"] == 32
    assert len(steps["step_ms"]) == len(steps["probes_gb_per_s"]) == 32
    assert max(steps["probes_gb_per_s"]) <= bw["read_gb_per_s"]
    step_gbs = report["weight_bytes"] / (np.asarray(steps["step_ms"]) / 1e3) / 1e9
    fractions = step_gbs / np.asarray(steps["probes_gb_per_s"])
    assert steps["median"] == pytest.approx(float(np.median(fractions)))
    assert steps["quartiles"][0] <= steps["median"] <= steps["quartiles"][1]
    # per crop: its pooled tokens, one column marker per row of them, start and end markers
    per_crop = load_manifest(demo_artifact).dims.tokens_per_crop
    per_crop += math.isqrt(per_crop) + 2
    assert report["inputs"] == {"kind": "synthetic", "crops": 2,
                                "sequence_tokens": 1 + 2 * per_crop + 8}
    assert report["prefill_tokens"] == 1 + 2 * per_crop + 8
    m = report["machine"]
    assert m["logical_cores"] >= 1 and m["physical_cores"] >= 1
    assert "numpy" in m["libraries"] and "onnxruntime" in m["libraries"]
    assert report["artifact"]["model"] == "demo" and report["backend"] == "ort"
    check_png(out_png)
    table = out_md.read_text()
    assert table in proc.stdout  # the table is printed and written alike
    assert "| **TTFT total** (ms) |" in table and "decode step at context 64" in table
    assert f"{steps['median']:.2f} ({steps['quartiles'][0]:.2f}–" in table


@pytest.mark.parametrize("mode", ["interleaved", "sequential"])
def test_compare_torch_adds_reference_and_speedups(demo_artifact: Path, tmp_path: Path,
                                                   mode: str) -> None:
    pytest.importorskip("torch")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    extra = ["--sequential"] if mode == "sequential" else []
    rc = main([str(demo_artifact), *TINY, *extra, "--compare-torch", "--json", str(out_json),
               "--plot", str(out_png), "--step-pairs", "0"])
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert "bandwidth_fraction_steps" not in report  # --step-pairs 0 skips them
    assert report["settings"]["interleaved"] == (mode == "interleaved")
    check_stack(report, ("16", "64"))
    check_stack(report["torch"], ("16", "64"))
    # Same weights on both sides: the decoder's fp32 initializers are the torch decoder's
    # parameters (the ONNX graph adds a few small constants such as RoPE frequencies).
    assert report["torch"]["weight_bytes"] == pytest.approx(report["weight_bytes"], rel=0.02)
    sp = report["speedup"]
    assert sp["decode"] == pytest.approx(report["decode"]["tokens_per_s"]
                                         / report["torch"]["decode"]["tokens_per_s"])
    assert sp["decode_p50"] == pytest.approx(report["torch"]["decode"]["p50_ms"]
                                             / report["decode"]["p50_ms"])
    assert sp["ttft"] == pytest.approx(report["torch"]["ttft_ms"]["total"]
                                       / report["ttft_ms"]["total"])
    assert set(sp["decode_step_by_context"]) == {"16", "64"}
    # a ratio for every stage both sides timed at >= 0.5 ms (the demo's connector can take less
    # on a fast CPU: which stages qualify depends on the machine, the rule does not)
    timed = {s for s, ms in report["ttft_ms"].items() if s != "total"
             and min(ms, report["torch"]["ttft_ms"][s]) >= 0.5}
    assert set(sp["ttft_stages"]) == timed and "prefill" in timed
    for stage, ratio in sp["ttft_stages"].items():
        assert ratio == pytest.approx(report["torch"]["ttft_ms"][stage]
                                      / report["ttft_ms"][stage])
    check_png(out_png)


def test_image_input_times_the_real_processor(demo_artifact: Path, tmp_path: Path) -> None:
    image = Path(__file__).resolve().parents[2] / "runtime/molmo_runtime/assets/demo.jpg"
    out_json = tmp_path / "r.json"
    rc = main([str(demo_artifact), "--image", str(image), "--runs", "1", "--warmup", "0",
               "--new-tokens", "4", "--contexts", "16", "--context-steps", "2",
               "--bandwidth-mb", "64", "--quiet", "--json", str(out_json)])
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert report["inputs"]["kind"] == "image"
    assert report["ttft_ms"]["preprocess"] > 0  # the processor ran inside the timed region
    # the processor tiled the photo into >= 1 crop plus the overview, with image tokens
    assert report["crops"] >= 2
    # the overview crop's pooled tokens all enter the prompt; the high-res crops add theirs
    # minus the overlap margins (few at the trained demo's 112 px crops)
    per_crop = load_manifest(demo_artifact).dims.tokens_per_crop
    assert report["prefill_tokens"] > per_crop + report["crops"] - 1


@pytest.mark.parametrize("extra, message", [
    (["--contexts", "4096"], "--max-seq-len"),
    (["--new-tokens", "1"], "--new-tokens"),
    (["--crops", "99"], "--crops 99"),
])
def test_bad_settings_fail_before_timing(demo_artifact: Path, extra: list[str], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(demo_artifact), "--synthetic", "--quiet", "--runs", "1"]
    assert main(argv + extra) == 2
    assert message in capsys.readouterr().err


def test_image_with_synthetic_settings_is_refused(demo_artifact: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(demo_artifact), "--image", "x.jpg", "--crops", "3", "--quiet"]) == 2
    assert "--crops and --prompt-tokens shape the --synthetic inputs" in capsys.readouterr().err


def test_missing_artifact_names_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    assert main([str(tmp_path / "nope"), "--quiet"]) == 2
    assert "molmo-export" in capsys.readouterr().err


# -- the pieces -----------------------------------------------------------------------------------

def test_percentiles_are_numpys() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0, 100.0]
    p = percentiles(values)
    assert p["p50_ms"] == pytest.approx(3.5)
    assert p["p90_ms"] == pytest.approx(np.percentile(values, 90))
    assert p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"] <= p["max_ms"] == 100.0
    assert p["min_ms"] == 1.0 and p["mean_ms"] == pytest.approx(115 / 6)


def test_synthetic_layout_matches_the_processor_contract(demo_artifact: Path) -> None:
    manifest = load_manifest(demo_artifact, verify="none")
    inputs = synthetic_inputs(manifest, crops=3, prompt_tokens=10, seed=1)
    assert inputs.arrays is not None
    a = inputs.arrays
    tokens = manifest.special_tokens
    d = manifest.dims
    assert a["images"].shape == (3, d.patches_per_crop, d.patch_dim)
    assert a["images"].dtype == np.float32 and a["image_masks"].dtype == np.float32
    assert a["image_input_idx"].shape == (3, d.tokens_per_crop)
    ids = a["input_ids"]
    assert ids.dtype == np.int64 and ids[0] == tokens["bos"]
    # every image token lands on an <im_patch> and every <im_patch> gets exactly one
    assert (ids[a["image_input_idx"]] == tokens["im_patch"]).all()
    assert (ids == tokens["im_patch"]).sum() == 3 * d.tokens_per_crop
    assert len(np.unique(a["image_input_idx"])) == 3 * d.tokens_per_crop
    prompt = ids[-10:]
    assert ((prompt >= 0) & (prompt < text_id_bound(tokens))).all()


def test_bandwidth_arithmetic() -> None:
    stack = {"decode": {"tokens_per_s": 10.0}}
    out = with_limits(stack, weight_bytes=2_000_000_000, read_gb_per_s=25.0)
    assert out["bandwidth_fraction"] == pytest.approx(0.8)  # 2 GB x 10 /s of 25 GB/s
    assert out["bandwidth_bound_tokens_per_s"] == pytest.approx(12.5)
    # run by run against the probe after each: 2 GB x 10 / 40 GB/s, x 12 / 30, x 8 / 20
    stack["decode_runs_tokens_per_s"] = [10.0, 12.0, 8.0]
    paired = with_limits(stack, 2_000_000_000, 40.0, paired_gb_per_s=[40.0, 30.0, 20.0])
    assert paired["bandwidth_fraction_paired"]["runs"] == pytest.approx([0.5, 0.8, 0.8])
    assert paired["bandwidth_fraction_paired"]["median"] == pytest.approx(0.8)
    assert paired["bandwidth_fraction_paired"]["min"] == pytest.approx(0.5)
    runtime = {"decode": {"tokens_per_s": 9.0}, "ttft_ms": {"total": 100.0, "vision": 50.0,
               "connector": 10.0, "prefill": 40.0, "preprocess": 0.0},
               "decode_step_ms_by_context": {"64": 100.0}}
    ref = {"decode": {"tokens_per_s": 3.0}, "ttft_ms": {"total": 250.0, "vision": 100.0,
           "connector": 50.0, "prefill": 100.0, "preprocess": 0.0},
           "decode_step_ms_by_context": {"64": 400.0}}
    runtime["decode"]["p50_ms"], ref["decode"]["p50_ms"] = 100.0, 350.0
    sp = speedups(runtime, ref)
    assert sp["decode"] == 3.0 and sp["ttft"] == 2.5 and sp["decode_p50"] == 3.5
    assert sp["ttft_stages"] == {"vision": 2.0, "connector": 5.0, "prefill": 2.5}
    assert sp["decode_step_by_context"] == {"64": 4.0}


def test_bandwidth_probe_measures_something() -> None:
    bw = measure_read_bandwidth(threads=2, array_mb=64, reps=2)
    assert 0.1 < bw.read_gb_per_s < 10_000
    assert bw.read_gb_per_s == max(bw.by_method.values())
    assert set(bw.by_method) == {"sum_1_threads", "sum_2_threads", "blas_gemv"}
    # two probes merge to the best of each method
    other = Bandwidth(1.0, {"sum_1_threads": 1e6, "blas_gemv": 0.5}, 64, 2)
    merged = bw.merge(other)
    assert merged.by_method["sum_1_threads"] == 1e6 and merged.read_gb_per_s == 1e6
    assert merged.by_method["blas_gemv"] == bw.by_method["blas_gemv"]
    with pytest.raises(ValueError, match="at least 64 MiB"):
        measure_read_bandwidth(threads=1, array_mb=8)


def _spin(seconds: float) -> threading.Thread:
    """A thread that burns CPU for `seconds`, as a thread pool spins after its call."""
    def spin() -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    t = threading.Thread(target=spin, daemon=True)
    t.start()
    return t


def test_settle_waits_for_spinning_threads_and_refuses_busy_ones() -> None:
    settle()  # whatever ran before this test
    spinner = _spin(0.3)
    waited = settle()
    assert not spinner.is_alive(), "settle returned while a thread of the process still spun"
    assert waited >= 0.2
    spinner = _spin(5.0)
    with pytest.raises(RuntimeError, match="still busy"):
        settle(max_s=0.3)
    spinner.join()


def test_weight_bytes_count_every_initializer(demo_artifact: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    path = demo_artifact / "onnx" / "decoder.onnx"
    model = onnx.load(str(path))  # with the data: count it the slow way
    expected = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert onnx_weight_bytes(path) == expected
    # the LM head alone ([vocab_rows, D] fp32) is part of what a decode step reads
    d = load_manifest(demo_artifact, verify="none").dims
    assert expected > d.vocab_rows * d.d_model * 4


def test_stage_flops_match_torch_flop_counter(demo_artifact: Path) -> None:
    """The closed-form FLOP counts equal what torch's FlopCounterMode counts when the reference
    model runs each stage (matmuls and attention; elementwise ops count in neither)."""
    torch = pytest.importorskip("torch")
    from molmo_bench.flops import stage_flops
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from molmo_export.export.onnx_export import resolve_checkpoint
    from molmo_export.model import MolmoForConditionalGeneration

    manifest = load_manifest(demo_artifact, verify="none")
    model = MolmoForConditionalGeneration.from_pretrained(resolve_checkpoint("demo")).eval()
    crops, tokens = 2, 40
    want = stage_flops(manifest.model_config, crops, tokens)
    d = manifest.dims
    images = torch.randn(crops, d.patches_per_crop, d.patch_dim)
    lm = model.language_model
    counted = {}
    # the math SDPA backend runs attention as bmm, which the counter sees (the fused CPU kernel
    # is invisible to it)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fc:
            features = model.vision(images)
        counted["vision"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            model.connector(features, torch.ones(crops, d.patches_per_crop))
        counted["connector"] = fc.get_total_flops()
        embeds = torch.randn(1, tokens, d.d_model)
        with FlopCounterMode(display=False) as fc:
            hidden, _ = lm.model(embeds, torch.arange(tokens)[None],
                                 torch.ones(1, tokens, dtype=torch.long))
            lm.lm_head(hidden[:, -1])
        counted["prefill"] = fc.get_total_flops()
    for stage, flops in want.items():
        assert flops == pytest.approx(counted[stage], rel=1e-6), stage
