"""The benchmark plot: TTFT stage bars and decode step latency against the context length."""

from __future__ import annotations

import os
from typing import Any

from molmo_runtime.errors import require
from molmo_runtime.fileio import atomic_path

from molmo_bench.report import STAGE_LABELS

COLORS = {"preprocess": "#9e9e9e", "vision": "#1f77b4", "connector": "#ff7f0e",
          "prefill": "#2ca02c"}


def _stacks(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    art = report["artifact"]
    stacks = [(f"{art['target']} ({report['backend']})", report)]
    if report.get("torch") is not None:
        stacks.append(("PyTorch fp32", report["torch"]))
    return stacks


def write_plot(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """PNG with two panels; written atomically."""
    matplotlib: Any = require("matplotlib", "bench", "--plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stacks = _stacks(report)
    fig, (ax_ttft, ax_ctx) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90)
    for row, (name, stack) in enumerate(stacks):
        left = 0.0
        for stage in STAGE_LABELS:
            ms = stack["ttft_ms"][stage]
            ax_ttft.barh(row, ms, left=left, color=COLORS[stage],
                         label=STAGE_LABELS[stage] if row == 0 else None)
            left += ms
        ax_ttft.text(left, row, f" {stack['ttft_ms']['total']:,.0f} ms", va="center",
                     fontsize=8)
    ax_ttft.set_yticks(range(len(stacks)), [n for n, _ in stacks])
    ax_ttft.invert_yaxis()
    ax_ttft.set_xlabel("time to first token (ms, median)")
    ax_ttft.set_title(f"TTFT by stage ({report['prefill_tokens']}-token prefill)", fontsize=10)
    ax_ttft.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                   frameon=False)
    ax_ttft.margins(x=0.22)

    medians = []
    for name, stack in stacks:
        detail = stack["decode_step_by_context"]
        ctx = [int(c) for c in detail]
        p50 = [detail[c]["p50_ms"] for c in detail]
        lo = [detail[c]["p50_ms"] - detail[c]["min_ms"] for c in detail]
        hi = [detail[c]["p90_ms"] - detail[c]["p50_ms"] for c in detail]
        ax_ctx.errorbar(ctx, p50, yerr=[lo, hi], marker="o", capsize=3, label=name)
        medians += p50
    bound = report.get("bandwidth_bound_tokens_per_s")
    if bound:  # a step cannot be faster than reading the runtime's decoder weights once
        limit_ms = 1000.0 / bound
        ax_ctx.axhline(limit_ms, ls="--", color="gray", lw=1,
                       label=f"bandwidth limit, {stacks[0][0]} weights")
        medians.append(limit_ms)
    ax_ctx.set_xscale("log", base=2)
    ax_ctx.set_xticks(ctx, [str(c) for c in ctx])
    if max(medians) > 20 * min(medians):  # stacks an order of magnitude apart: log scale
        ax_ctx.set_yscale("log")
    else:
        ax_ctx.set_ylim(bottom=0)
    ax_ctx.set_xlabel("context length (tokens)")
    ax_ctx.set_ylabel("decode step (ms): median, min–p90")
    ax_ctx.set_title("decode step latency vs context", fontsize=10)
    ax_ctx.legend(fontsize=8, loc="best")
    ax_ctx.grid(alpha=0.3)

    art, m = report["artifact"], report["machine"]
    fig.suptitle(f"molmo-bench {art['model']} {art['target']} — {m['cpu']}, "
                 f"{m['physical_cores']} cores — {report['date_utc'][:10]}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
