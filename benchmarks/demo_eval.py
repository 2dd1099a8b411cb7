"""The trained demo's held-out task accuracy per target (the tables of docs/demo_model.md).

    python benchmarks/demo_eval.py --work /tmp/demo-eval --json docs/data/demo_eval.json

Exports the `demo` preset (the shipped weights) to ort-fp32, scores it with molmo-eval's code on
the held-out set, scores the fp16 graphs TensorRT would build from (in ONNX Runtime), then
exports ort-int8 and ort-int4 as a user would (bundled calibration set); each quantization's own
task gate scores fp32 and the quantized artifact on the same 600 questions, and its quality
report is read back. The gate's decision is recorded, not enforced (allow_degraded), so a
failing target still shows its numbers. Prints a
markdown table and writes everything, with machine, load and date, as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the artifacts")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--questions", type=int, default=600)
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads")
    args = p.parse_args()

    from molmo_calibration.report import QualityWarning
    from molmo_calibration.shapes.evaluate import evaluate_artifact, evaluate_pipeline
    from molmo_calibration.shapes.fp16 import fp16_pipeline
    from molmo_export.export import export_artifact
    from molmo_runtime.fileio import write_json_atomic

    load_before = os.getloadavg()
    started = time.time()
    fp32 = args.work / "ort-fp32"
    export_artifact("demo", "ort-fp32", fp32, force=True, verify=True, progress=False,
                    log=lambda s: None)
    rows: dict[str, Any] = {"ort-fp32": evaluate_artifact(fp32, args.questions,
                                                          threads=args.threads).to_dict()}
    fp16_work = args.work / "fp16-graphs"
    fp16_work.mkdir(parents=True, exist_ok=True)
    rows["fp16 graphs (ORT)"] = evaluate_pipeline(
        fp16_pipeline(fp32, fp16_work, args.threads), args.questions).to_dict()
    gates: dict[str, Any] = {}
    for target in ("ort-int8", "ort-int4"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", QualityWarning)
            out = export_artifact("demo", target, args.work / target, force=True, verify=False,
                                  allow_degraded=True, progress=False, log=lambda s: None)
        report = json.loads((out / "quality_report.json").read_text())
        rows[target] = report["task"]["quantized"]
        gates[target] = {"passed": report["passed"], "failures": report["failures"],
                         "max_drop": report["task"]["max_drop"],
                         "fp32_same_questions": report["task"]["fp32"]["tasks"],
                         "decoder_top1": report["decoder"]["top1"],
                         "kl_mean": report["decoder"]["kl_mean"]}
    result = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
              "machine": {"cpu": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "platform": platform.platform()},
              "load_avg_1m": {"before": round(load_before[0], 1),
                              "after": round(os.getloadavg()[0], 1)},
              "minutes": round((time.time() - started) / 60, 1),
              "questions": args.questions, "scores": rows, "gates": gates}
    print("| artifact | pointing | counting | colour | well formed | gate |")
    print("|---|---:|---:|---:|---:|---|")
    for name, s in rows.items():
        gate = gates.get(name)
        verdict = "" if gate is None else ("passes" if gate["passed"] else
                                           "fails: " + "; ".join(gate["failures"]))
        t = s["tasks"]
        print(f"| {name} | {t['pointing']:.1%} | {t['counting']:.1%} | {t['colour']:.1%} | "
              f"{s['well_formed']:.1%} | {verdict} |")
    if args.json:
        write_json_atomic(args.json, result)
    print(json.dumps({k: result[k] for k in ("date_utc", "load_avg_1m", "minutes")}))


if __name__ == "__main__":
    main()
