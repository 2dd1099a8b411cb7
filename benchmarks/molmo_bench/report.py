"""The benchmark's outputs: one JSON object and a markdown table."""

from __future__ import annotations

from typing import Any

import numpy as np

from molmo_bench.flops import compute_fractions

STAGE_LABELS = {"preprocess": "preprocess", "vision": "vision encoder",
                "connector": "connector", "prefill": "prefill"}


def with_limits(stack: dict[str, Any], weight_bytes: int, read_gb_per_s: float,
                flops: dict[str, float] | None = None, gemm_gflops: float | None = None,
                paired_gb_per_s: list[float] | None = None,
                step_pairs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add the machine-limit figures. Decode: weight bytes read per token x tokens/s / read
    bandwidth (the best probe of the whole benchmark), and, with `paired_gb_per_s` (a probe
    right after each run), run by run against its own probe: on a VM whose neighbours take a
    varying share of the memory bandwidth, the best probe may come from a quieter moment than
    the runs. With `step_pairs` (decode steps, each followed by a probe: step_ms,
    probe_gb_per_s), step by step, the finest pairing there is. TTFT stages: achieved GFLOP/s /
    the measured GEMM rate."""
    tokens_per_s = stack["decode"]["tokens_per_s"]
    stack = dict(stack, weight_bytes=weight_bytes)
    stack["bandwidth_bound_tokens_per_s"] = read_gb_per_s * 1e9 / weight_bytes
    stack["bandwidth_fraction"] = weight_bytes * tokens_per_s / (read_gb_per_s * 1e9)
    if paired_gb_per_s:
        runs = [weight_bytes * r / (gbs * 1e9)
                for r, gbs in zip(stack["decode_runs_tokens_per_s"], paired_gb_per_s)]
        stack["bandwidth_fraction_paired"] = {
            "median": float(np.median(runs)), "min": min(runs), "max": max(runs),
            "runs": runs, "probes_gb_per_s": paired_gb_per_s}
    if step_pairs:
        step_gbs = weight_bytes / (np.asarray(step_pairs["step_ms"]) / 1e3) / 1e9
        fractions = step_gbs / np.asarray(step_pairs["probe_gb_per_s"])
        q1, median, q3 = (float(v) for v in np.percentile(fractions, [25, 50, 75]))
        stack["bandwidth_fraction_steps"] = {
            "median": median, "quartiles": [q1, q3], "pairs": len(fractions),
            "context": step_pairs["context"],
            "decode_gb_per_s_median": float(np.median(step_gbs)),
            "probe_gb_per_s_median": float(np.median(step_pairs["probe_gb_per_s"])),
            "step_ms": list(step_pairs["step_ms"]),
            "probes_gb_per_s": list(step_pairs["probe_gb_per_s"])}
    if flops is not None and gemm_gflops is not None:
        stack["compute_fraction"] = compute_fractions(stack, flops, gemm_gflops)
    return stack


def busy_warnings(machine: dict[str, Any]) -> list[str]:
    """A warning when other work shared the CPU (1-min load above the logical core count)."""
    loads = [lv[0] for lv in (machine.get("load_average_start"), machine.get("load_average_end"))
             if lv]
    cores = machine.get("logical_cores") or 1
    if loads and max(loads) > cores:
        return [(f"the machine was busy (1-min load average up to {max(loads):.1f} on {cores} "
                 "logical cores): other processes shared the CPU, so latencies are inflated and "
                 "noisy; rerun on an idle machine for reference numbers")]
    return []


def speedups(runtime: dict[str, Any], torch: dict[str, Any]) -> dict[str, Any]:
    """> 1 means the runtime is faster than the PyTorch reference."""
    return {
        "decode": runtime["decode"]["tokens_per_s"] / torch["decode"]["tokens_per_s"],
        "decode_p50": torch["decode"]["p50_ms"] / runtime["decode"]["p50_ms"],
        "ttft": torch["ttft_ms"]["total"] / runtime["ttft_ms"]["total"],
        # stages under half a millisecond (synthetic inputs skip preprocessing) have no ratio
        "ttft_stages": {s: torch["ttft_ms"][s] / runtime["ttft_ms"][s]
                        for s in STAGE_LABELS if min(runtime["ttft_ms"][s],
                                                     torch["ttft_ms"][s]) >= 0.5},
        "decode_step_by_context": {
            c: torch["decode_step_ms_by_context"][c] / ms
            for c, ms in runtime["decode_step_ms_by_context"].items()},
    }


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _rows(stack: dict[str, Any]) -> list[str]:
    t, d = stack["ttft_ms"], stack["decode"]
    rows = [_fmt(t["total"])]
    rows += [_fmt(t[s], 2 if t[s] < 10 else 1) for s in STAGE_LABELS]
    rows += [_fmt(d["tokens_per_s"], 2), _fmt(d["tokens_per_s_p50"], 2),
             f"{_fmt(d['p50_ms'])} / {_fmt(d['p90_ms'])} / {_fmt(d['p99_ms'])}"]
    rows += [_fmt(ms, 2) for ms in stack["decode_step_ms_by_context"].values()]
    rows += [_fmt(stack["context_growth"], 2) + "×", _fmt(stack["peak_rss_mb"]),
             _fmt(stack.get("bandwidth_fraction"), 2)]
    paired = stack.get("bandwidth_fraction_paired")
    rows.append(f"{paired['median']:.2f} ({paired['min']:.2f}–{paired['max']:.2f})"
                if paired else "—")
    steps = stack.get("bandwidth_fraction_steps")
    rows.append(f"{steps['median']:.2f} ({steps['quartiles'][0]:.2f}–"
                f"{steps['quartiles'][1]:.2f})" if steps else "—")
    cf = stack.get("compute_fraction", {})
    rows.append(" / ".join(_fmt(cf.get(s), 2) for s in ("vision", "connector", "prefill")))
    return rows


def markdown(report: dict[str, Any]) -> str:
    m, art, inp, st = (report["machine"], report["artifact"], report["inputs"],
                       report["settings"])
    libs = m["libraries"]
    lib_text = ", ".join(f"{k} {libs[k]}" for k in ("onnxruntime", "onnxruntime-gpu", "torch",
                                                  "tensorrt", "numpy") if k in libs)
    gpus = "; ".join(g["name"] for g in m["gpus"]) or "no GPU"
    ctxs = list(report["decode_step_ms_by_context"])
    labels = (["**TTFT total** (ms)"]
              + [f"· {STAGE_LABELS[s]} (ms)" for s in ("preprocess", "vision", "connector")]
              + [f"· prefill, {report['prefill_tokens']} tokens (ms)",
                 "**decode** tokens/s", "decode tokens/s at median latency",
                 "per-token latency p50 / p90 / p99 (ms)"]
              + [f"decode step at context {c} (ms, median)" for c in ctxs]
              + [f"step growth, context {ctxs[-1]} / {ctxs[0]}", "peak RSS (MB)",
                 "bandwidth fraction of decode",
                 "· run by run, each against a probe right after it: median (min–max)",
                 "· step by step, each decode step against a probe right after it: median "
                 "(quartiles)",
                 "compute fraction: vision / connector / prefill"])
    name = f"{art['model']} {art['target']} ({report['backend']})"
    columns = [_rows(report)]
    header = f"| | {name} |"
    rule = "|---|---:|"
    torch = report.get("torch")
    if torch is not None:
        columns.append(_rows(torch))
        header += " PyTorch fp32 (eager) | speedup |"
        rule += "---:|---:|"
        sp = report["speedup"]
        ratio = ([_fmt(sp["ttft"], 2) + "×"]
                 + [_fmt(sp["ttft_stages"].get(s), 2) + "×" if s in sp["ttft_stages"] else "–"
                    for s in STAGE_LABELS]
                 + [_fmt(sp["decode"], 2) + "×", _fmt(sp["decode_p50"], 2) + "×", ""]
                 + [_fmt(v, 2) + "×" for v in sp["decode_step_by_context"].values()]
                 + ["", "", "", "", "", ""])
        columns.append(ratio)
    lines = [f"#### molmo-bench: {name}", "",
             (f"- machine: {m['cpu']}, {m['physical_cores']} physical / {m['logical_cores']} "
              f"logical cores{' (VM)' if m['virtualized'] else ''}, {m['memory_gb']} GB RAM, "
              f"{gpus}; {m['os']}; {lib_text}"),
             (f"- load average (1 min) at start / end: {_load(m, 'load_average_start')} / "
              f"{_load(m, 'load_average_end')}"),
             f"- date: {report['date_utc']}",
             f"- command: `{report['command']}`",
             (f"- inputs: {_inputs_text(inp)}; {st['new_tokens']} new tokens; "
              f"{st['runs']} runs after {st['warmup']} warm-up(s); medians over runs, "
              "percentiles over all decode tokens"),
             *(f"- **warning**: {w}" for w in report.get("warnings", [])),
             "", header, rule]
    for i, label in enumerate(labels):
        lines.append(f"| {label} | " + " | ".join(col[i] for col in columns) + " |")
    bw = report["bandwidth"]
    lines += ["", (f"Read bandwidth {bw['read_gb_per_s']:.1f} GB/s (numpy probe); decoder "
                   f"weights {report['weight_bytes'] / 1e6:,.1f} MB read per token (embedding "
                   "gather excluded) → bandwidth bound "
                   f"{report['bandwidth_bound_tokens_per_s']:,.1f} tokens/s. "
                   f"fp32 GEMM {report['compute']['gemm_gflops']:,.0f} GFLOP/s (numpy probe); "
                   "compute fraction = a stage's matmul FLOPs / its time / that rate.")]
    task = report.get("task")
    if task is not None:
        acc = task["tasks"]
        lines += ["", (f"Task accuracy ({task['questions']} held-out shapes questions, seed "
                       f"{task['heldout_seed']}): pointing {acc['pointing']:.1%}, counting "
                       f"{acc['counting']:.1%}, colour {acc['colour']:.1%}, well formed "
                       f"{task['well_formed']:.1%}.")]
    return "\n".join(lines) + "\n"


def _load(m: dict[str, Any], key: str) -> str:
    value = m.get(key)
    return f"{value[0]:.2f}" if value else "n/a"


def _inputs_text(inp: dict[str, Any]) -> str:
    if inp["kind"] == "synthetic":
        return (f"synthetic, {inp['crops']} crops, {inp['sequence_tokens']}-token sequence "
                "(image tokens included)")
    return f"image {inp['image']}, prompt {inp['prompt']!r}"
