"""Measure how far the reference model is from the golden data, and how far real bugs move it.

The golden-parity tests (test_model_golden.py) assert bounds from molmo_runtime.tolerances; this
script runs the same cases and prints the measured errors instead, relative to each stage's
max |golden| (the unit of the "golden/*" rows), so the bounds can be re-derived on any machine:

    python -m tests.export.parity_spread                      # this CPU, these threads
    OMP_NUM_THREADS=1 python -m tests.export.parity_spread
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        python -m tests.export.parity_spread                  # another CPU's kernels
    python -m tests.export.parity_spread --mutations          # small bugs, for scale

Prints one JSON object: the environment and, per stage, the worst error relative to max |x|.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from tests.export import test_model_golden as golden
from molmo_runtime.tolerances import TABLE


def _run_all(greedy: bool = True) -> dict[str, dict[str, float]]:
    """Every golden case; `greedy` adds generation (which asserts the ids)."""
    golden.RECORD = {}
    try:
        for model_dir, case in golden.CASES:
            golden.test_stages_match_golden(model_dir, case)
            if greedy:
                golden.test_greedy_generation_matches_golden(model_dir, case)
        if greedy:
            golden.test_padded_batch_of_two_matches_golden()
        for case in ("tiny_80x50", "text_only"):
            try:
                golden.test_moe_router_matches_golden(case)
            except AssertionError:  # routed experts changed: only a mutation gets here
                if greedy:
                    raise
        rows = golden.RECORD
    finally:
        golden.RECORD = None
    return {stage: {"max_abs": max(d for d, _ in pairs),
                    "rel": max(d / s for d, s in pairs if s > 0),
                    "bound_rel": TABLE[f"golden/{stage}"].rtol}
            for stage, pairs in sorted(rows.items())}


def _mutate_all(fn: Callable[[Any], None]) -> None:
    golden.load_model.cache_clear()
    for name in ("model", "model_7b_o", "model_moe"):
        fn(golden.load_model(name))


def _text_eps(m: Any) -> None:
    for mod in m.language_model.modules():
        if hasattr(mod, "eps") and not isinstance(mod, torch.nn.LayerNorm):
            mod.eps *= 10


def _vision_eps(m: Any) -> None:
    for mod in m.vision.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.eps *= 10


def _rope(m: Any) -> None:
    text = m.language_model.model
    text.cfg = replace(text.cfg, rope_theta=text.cfg.rope_theta * 2)


def _one_weight(m: Any) -> None:
    with torch.no_grad():
        w = m.language_model.model.layers[0].attn_norm.weight
        w[0] *= 1.01  # one channel of the first decoder norm, +1%


MUTATIONS = {"decoder norm eps x10": _text_eps, "vision LayerNorm eps x10": _vision_eps,
             "RoPE theta x2": _rope, "one norm weight +1%": _one_weight}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mutations", action="store_true", help="also measure small bugs")
    args = p.parse_args()
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY",
                                          "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")}
    out: dict[str, Any] = {"env": env, "torch_capability": torch.backends.cpu.get_cpu_capability(),
                           "threads": torch.get_num_threads(), "stages": _run_all()}
    if args.mutations:
        out["mutations"] = {}
        for name, fn in MUTATIONS.items():
            _mutate_all(fn)
            out["mutations"][name] = {s: r["rel"] for s, r in _run_all(greedy=False).items()}
        golden.load_model.cache_clear()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
